"""Hatch build hook: compile the optional C accelerator ``broker/codecs/_lazy.c``.

``broker.codecs.lazy`` uses the extension when it is importable and its own Python classes
otherwise, so the build never fails for want of it: if compiling fails for any reason (no C
compiler, no Python headers, a Windows machine without the distutils-style ``CC``), the
hook prints one warning line and the install goes on without it.

* ``pip install -e .`` (the editable wheel): the module is compiled in place, next to
  ``_lazy.c`` (the path is in ``.gitignore``), where the editable ``.pth`` finds it;
* ``pip wheel .`` / ``pip install .``: it is compiled into a temporary folder and added to
  the wheel, which is then tagged for this interpreter and platform.

The compiler and flags are the ones this Python was built with (``sysconfig``), overridden
by ``CC``, ``CFLAGS``, ``LDSHARED`` and ``LDFLAGS`` from the environment as distutils did.
``BROKER_NO_C_EXTENSION=1`` skips the extension; ``BROKER_REQUIRE_C_EXTENSION=1`` makes a
failed compile fail the build (for CI, where the accelerator must be there).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = Path("broker", "codecs", "_lazy.c")
MODULE = "_lazy"
COMPILE_TIMEOUT_S = 300


class ExtensionError(Exception):
    """The extension could not be compiled; the message says why, on one line."""


def _config(name: str) -> str:
    value = sysconfig.get_config_var(name)
    return value if isinstance(value, str) else ""


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in {"", "0"}


def _run(command: list[str]) -> None:
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise ExtensionError(f"{command[0]}: {e}") from e
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip().splitlines() or [""]
        first_error = next((line for line in output if "error" in line), output[0])
        raise ExtensionError(f"{command[0]} exited with {done.returncode}: {first_error}")


def compile_extension(source: Path, target: Path) -> None:
    """Compile ``source`` into the extension module file ``target`` (replaced atomically)."""
    default_cc = _config("CC")
    cc = os.environ.get("CC") or default_cc
    ldshared = os.environ.get("LDSHARED") or _config("LDSHARED")
    if not cc or not ldshared:
        raise ExtensionError("this Python has no C compiler configuration (sysconfig CC)")
    if "CC" in os.environ and "LDSHARED" not in os.environ and ldshared.startswith(default_cc):
        ldshared = os.environ["CC"] + ldshared[len(default_cc) :]
    paths = sysconfig.get_paths()
    includes = sorted({paths["include"], paths["platinclude"]})
    if not (Path(paths["include"]) / "Python.h").is_file():
        raise ExtensionError(f"Python.h not found in {paths['include']} (install python3-dev)")
    cflags = [
        *shlex.split(_config("CFLAGS")),
        *shlex.split(_config("CCSHARED")),
        *shlex.split(os.environ.get("CFLAGS", "")),
    ]
    ldflags = shlex.split(os.environ.get("LDFLAGS", ""))
    with tempfile.TemporaryDirectory(prefix="broker-ext-") as work:
        obj = Path(work, f"{MODULE}.o")
        built = Path(work, target.name)
        _run(
            [
                *shlex.split(cc),
                *cflags,
                *(f"-I{include}" for include in includes),
                "-c",
                str(source),
                "-o",
                str(obj),
            ]
        )
        _run([*shlex.split(ldshared), str(obj), *ldflags, "-o", str(built)])
        # A new file, then a rename: a process that has the old module loaded keeps it.
        staged = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(built, staged)
        os.replace(staged, target)


class CustomBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    """Compiles ``broker/codecs/_lazy.c`` for the wheel and the editable install."""

    PLUGIN_NAME = "custom"
    #: Where a regular wheel build compiles the module (removed when the wheel is written).
    _build_dir: str | None = None

    def _in_place(self) -> Path:
        return Path(self.root, SOURCE).with_name(MODULE + _config("EXT_SUFFIX"))

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        """Compile the extension: in place for ``editable``, into the wheel for ``standard``."""
        if self.target_name != "wheel":
            return
        if _flag("BROKER_NO_C_EXTENSION"):
            if version == "editable":
                self._in_place().unlink(missing_ok=True)
            self.app.display_info("broker: BROKER_NO_C_EXTENSION is set, pure-Python codecs")
            return
        source = Path(self.root, SOURCE)
        if version == "editable":
            target = self._in_place()
        else:
            self._build_dir = tempfile.mkdtemp(prefix="broker-wheel-")
            target = Path(self._build_dir, self._in_place().name)
        try:
            if not _config("EXT_SUFFIX"):
                raise ExtensionError("this Python reports no extension suffix (EXT_SUFFIX)")
            compile_extension(source, target)
        except Exception as e:  # whatever went wrong, the install goes on without it
            self._remove_build_dir()
            if _flag("BROKER_REQUIRE_C_EXTENSION"):
                raise
            if version == "editable":  # a module built from older source would be used
                self._in_place().unlink(missing_ok=True)
            self.app.display_warning(
                f"broker: C accelerator not built ({e}); using the pure-Python codecs wrapper"
            )
            return
        if version != "editable":
            build_data["force_include"][str(target)] = SOURCE.with_name(target.name).as_posix()
            build_data["pure_python"] = False
            build_data["infer_tag"] = True

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        """Remove the temporary folder of a regular wheel build."""
        self._remove_build_dir()

    def _remove_build_dir(self) -> None:
        if self._build_dir is not None:
            shutil.rmtree(self._build_dir, ignore_errors=True)
            self._build_dir = None

    def clean(self, versions: list[str]) -> None:
        """``hatch build --clean``: remove the module compiled in place."""
        self._in_place().unlink(missing_ok=True)
