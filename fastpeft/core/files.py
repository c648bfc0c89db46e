"""Replacing a directory's files as one unit (what ``save_adapter`` writes through).

Each new file is written (and synced) to a temporary beside its target, the current
files are renamed aside, the new ones renamed into place, the old ones deleted; any
error before the last rename undoes the renames done so far and deletes the
temporaries, so the directory is left exactly as it was.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import warnings
from typing import Any, Callable, Dict, List, Sequence, Tuple

__all__ = ["missing_dirs", "replace_files"]


def missing_dirs(path: str) -> List[str]:
    """``path`` and those of its parents that do not exist yet, outermost first."""
    missing = []
    head = os.path.abspath(path)
    while not os.path.isdir(head):
        missing.append(head)
        parent = os.path.dirname(head)
        if parent == head:
            break
        head = parent
    return missing[::-1]


def replace_files(
    directory: str, writers: Dict[str, Callable[[Any], Any]], remove: Sequence[str], last: str
) -> None:
    """Replace the files ``writers`` names (``name -> write(binary file)``) and delete
    those in ``remove``, as one unit: after an error every file is as it was and no
    temporary is left.

    Steps: each new file is written (and synced) to a temporary beside its target; the
    current files are renamed aside; the new ones renamed into place; the old ones
    deleted. ``last`` (the config) goes aside first and comes back last, so that
    whenever a config is present the weights beside it are its own: a process killed
    part-way leaves a directory without a config (which nothing loads), never a config
    with the other save's weights. An error before the last rename undoes the renames
    done so far.
    """
    order = sorted(writers, key=lambda n: n == last)  # the config last in, first out
    staged: Dict[str, str] = {}
    aside: Dict[str, str] = {}
    placed: List[str] = []
    try:
        for name in order:
            staged[name] = _write_temp(directory, name, writers[name])
        for name in order[::-1] + [n for n in remove if n not in writers]:
            if os.path.lexists(os.path.join(directory, name)):
                aside[name] = _move_aside(directory, name)
        for name in order:
            os.replace(staged[name], os.path.join(directory, name))
            del staged[name]
            placed.append(name)
    except BaseException as exc:
        _roll_back(directory, staged, aside, placed, exc, last)
        raise
    for name, old in aside.items():
        try:
            os.unlink(old)
        except OSError as exc:  # the save itself is complete: say what is left behind
            warnings.warn(f"saved, but could not delete the previous {name} kept at {old!r}: {exc}", stacklevel=3)


def _new_file(directory: str, name: str, suffix: str) -> Tuple[int, str]:
    """A new empty file ``.<name>.<random><suffix>`` in ``directory``, open for writing.
    Unlike ``mkstemp``'s 0600 its mode follows the umask, as a plain ``open`` (and
    PEFT's ``save_pretrained``) would make it."""
    while True:
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}{suffix}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue


def _write_temp(directory: str, name: str, write: Callable[[Any], Any]) -> str:
    fd, tmp = _new_file(directory, name, ".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())  # a full disk shows here, before anything is replaced
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def _move_aside(directory: str, name: str) -> str:
    """Rename ``directory/name`` to a new temporary name beside it; that name."""
    fd, old = _new_file(directory, name, ".old")
    os.close(fd)
    try:
        os.replace(os.path.join(directory, name), old)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(old)
        raise
    return old


def _roll_back(
    directory: str, staged: Dict[str, str], aside: Dict[str, str], placed: List[str], error: BaseException,
    last: str,
) -> None:
    """Undo a part-done ``_replace_files``: the new files out, the old ones back (the
    config last), the temporaries deleted. Steps that fail are named on ``error``."""
    failed = []
    for name in placed:
        if name not in aside:
            try:
                os.unlink(os.path.join(directory, name))
            except OSError as exc:
                failed.append(f"remove the new {name} ({exc})")
    for name in sorted(aside, key=lambda n: n == last):
        try:
            os.replace(aside[name], os.path.join(directory, name))
        except OSError as exc:
            failed.append(f"restore {name} from {aside[name]!r} ({exc})")
    for tmp in staged.values():
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    if failed and hasattr(error, "add_note"):
        error.add_note(f"save_adapter could not undo everything in {directory!r}: " + "; ".join(failed))
