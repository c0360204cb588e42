"""What the trace-context tests share."""

from __future__ import annotations


class RequestHeaders:
    """Headers as granian gives them: ``get`` answers the first value of a name, ``get_all``
    every value."""

    def __init__(self, *pairs: tuple[str, str]) -> None:
        self._pairs = pairs

    def get(self, key: str, default: object = None) -> object:
        return next((v for k, v in self._pairs if k == key), default)

    def get_all(self, key: str) -> list[str]:
        return [v for k, v in self._pairs if k == key]

    def __len__(self) -> int:
        return len(self._pairs)
