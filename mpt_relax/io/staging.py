"""Writing an output directory so that nothing is ever lost or half-written.

:func:`publish_directory` is the one way mpt_relax writes an output directory (a built artifact,
a converted checkpoint). The rules it enforces:

- The output is written into a staging directory ``.<name>.tmp-<pid>-<hex>`` beside it and
  renamed into place only when complete; any error, Ctrl-C or SIGTERM removes the staging
  directory and leaves the output as it was.
- Only a directory that is recognisably an earlier output of ours (the caller's ``is_ours``
  test, e.g. "holds mpt-config.json"), or an empty one, is ever replaced. A regular file, a
  symbolic link, or any other directory is refused with one line before any work, and checked
  again just before the rename.
- The output may not overlap the input (``protect``): neither equal to it, inside it, nor
  containing it.
- Staging directories left by a process that was killed (SIGKILL, power loss) are recognised
  by their name (the pid in it is no longer running) and removed by the next run for the same
  output. Nothing else is ever deleted.
- New directories get the umask's permissions, like any ``mkdir``.

Imports only the standard library and :mod:`mpt_relax.errors` (the converter uses it without TVM).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from mpt_relax.errors import MPTRelaxError
from mpt_relax.interrupts import raise_if_stopped, terminate_as_interrupt


class OutputError(MPTRelaxError):
    """An output path that must not be written or replaced; nothing was changed."""


def _staging_pattern(final: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(final.name)}\.(?:tmp|old)-(\d+)-[0-9a-f]{{8}}")


def staging_path(final: Path, kind: str = "tmp") -> Path:
    """``.<name>.<kind>-<pid>-<8 hex>`` beside ``final`` (kind: tmp = being written, old = being replaced)."""
    return final.with_name(f".{final.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def clean_stale(final: Path) -> list[Path]:
    """Remove the staging directories of ``final`` whose process no longer runs; returns them."""
    final = Path(final)
    pattern, removed = _staging_pattern(final), []
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not _alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_output(final: Path, is_ours: Callable[[Path], bool], what: str, protect: Iterable[Path] = ()) -> None:
    """Raise :class:`OutputError` unless ``final`` may be (re)placed by a new ``what``.

    Allowed: nothing there, an empty directory, or a directory ``is_ours`` recognises.
    """
    final = Path(final)
    real = Path(os.path.realpath(final))
    for other in protect:
        if other is not None and _overlap(real, Path(os.path.realpath(other))):
            raise OutputError(f"the output {final} overlaps the input {other}; choose an output directory outside it")
    if final.is_symlink():
        raise OutputError(f"the output {final} is a symbolic link; give the directory itself, or remove the link")
    if not final.exists():
        return
    if not final.is_dir():
        raise OutputError(f"the output {final} exists and is not a directory; refusing to replace it "
                          "(choose another output or remove it yourself)")
    if any(final.iterdir()) and not is_ours(final):
        raise OutputError(f"the output {final} is a non-empty directory that is not {what}; refusing to replace it "
                          "(choose another output or remove it yourself)")


@contextlib.contextmanager
def publish_directory(
    final: str | Path,
    *,
    is_ours: Callable[[Path], bool],
    what: str,
    protect: Iterable[Path] = (),
    durable: bool = False,
) -> Iterator[Path]:
    """Yield an empty staging directory; on success it becomes ``final`` by renames.

    ``is_ours(path)``: whether an existing directory may be replaced; ``what``: how the message
    names such a directory ("an mpt_relax artifact"); ``protect``: input paths the output must
    not overlap; ``durable``: fsync the files and the directory entries before and after the
    rename. SIGTERM / SIGHUP are handled like Ctrl-C for the duration (see :mod:`mpt_relax.interrupts`).
    """
    final = Path(final)
    protect = [Path(p) for p in protect if p is not None]
    check_output(final, is_ours, what, protect)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final)
    with terminate_as_interrupt():
        tmp = staging_path(final)
        try:
            # inside the try: a Ctrl-C that lands just after the directory is made removes it too
            tmp.mkdir()  # the umask's mode, not mkdtemp's 0700
            yield tmp
            raise_if_stopped()  # a signal whose exception native code swallowed publishes nothing
            check_output(final, is_ours, what, protect)  # it may have changed while we worked
            if durable:
                _fsync_tree(tmp)
            _swap(tmp, final)
            if durable:
                _fsync_dir(final.parent)
        finally:
            _remove(tmp)


def _remove(tmp: Path, tries: int = 20) -> None:
    """Delete a staging directory, again while something still writes into it (an interrupted
    build's linker child may finish its file after a first delete)."""
    for _ in range(tries):
        if not tmp.exists():
            return
        shutil.rmtree(tmp, ignore_errors=True)
        time.sleep(0.1)


def _swap(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first, restored if the
    rename fails and deleted after it succeeded."""
    old = None
    if final.exists():
        old = staging_path(final, "old")
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(directory: Path) -> None:
    """Flush every file in ``directory`` (flat) and its entry list to disk."""
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
