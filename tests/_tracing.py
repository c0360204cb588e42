"""What the trace-context tests share."""

from __future__ import annotations

#: A client's sampled trace context, and another trace's.
TRACE = 0x0AF7651916CD43DD8448EB211C80319C
SPAN = 0xB7AD6B7169203331
PARENT = f"00-{TRACE:032x}-{SPAN:016x}-01"
OTHER = f"00-{TRACE + 1:032x}-{SPAN:016x}-01"


class RequestHeaders:
    """Headers as granian gives them: ``get`` answers the first value of a name, ``get_all``
    every value; ``in`` and ``items`` as the publish handlers read them."""

    def __init__(self, *pairs: tuple[str, str]) -> None:
        self._pairs = pairs

    def get(self, key: str, default: object = None) -> object:
        return next((v for k, v in self._pairs if k == key), default)

    def get_all(self, key: str) -> list[str]:
        return [v for k, v in self._pairs if k == key]

    def __contains__(self, key: object) -> bool:
        return any(k == key for k, _ in self._pairs)

    def keys(self) -> list[str]:
        return list(dict.fromkeys(k for k, _ in self._pairs))

    def values(self) -> list[str]:
        return [v for _, v in self._pairs]

    def items(self) -> list[tuple[str, str]]:
        return list(self._pairs)

    def __len__(self) -> int:
        return len(self._pairs)
