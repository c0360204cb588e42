"""The codecs' optional C module (``broker/codecs/_lazy.c``, built by ``hatch_build.py``),
when it may be used: the one place that reads ``BROKER_PURE_PYTHON``."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

__all__ = ["accelerator"]


def accelerator() -> ModuleType | None:
    """``broker.codecs._lazy`` when it is built and ``BROKER_PURE_PYTHON`` is not set (to a
    value other than ``0``); ``None`` otherwise, and callers use their Python code. Read from
    the environment, not a setting: callers choose once, when they are imported, before any
    settings object exists."""
    if os.environ.get("BROKER_PURE_PYTHON", "") not in {"", "0"}:
        return None
    try:  # import_module, not ``from broker.codecs import``: it honours sys.modules
        return importlib.import_module("broker.codecs._lazy")
    except ImportError:  # not built (no C compiler at install time)
        return None
