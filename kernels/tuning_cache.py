"""The tuner's picks on disk, so that a process does not pay again for what another timed.

One JSON file, ``tuning.json`` under the cache directory (``$FASTPEFT_CACHE``, else
``$XDG_CACHE_HOME/fastpeft``, else ``~/.cache/fastpeft``; ``FASTPEFT_CACHE=off``
disables it)::

    {"format": 1,
     "entries": {"[\"lora\", \"NVIDIA H200\", \"triton 3.6.0\", \"torch.bfloat16\", ..., 4096]":
                 {"type": "KernelConfig", "block_m": 128, ...}}}

An entry's key is the launcher's tuner key (kernel name, device index, dtypes, shapes, M
bucket, ...) with the device index replaced by the device's name and the Triton version
added: a pick is reused on the same card model with the same compiler, never on another.
A stored pick is used only when it is still one of the launcher's candidates (a newer
fastpeft may have dropped it); otherwise the tuner times again and rewrites the entry.

The file is read once per process (lazily, at the first tuner miss on a GPU) and
rewritten atomically (a temporary file in the same directory, then ``os.replace``) after
merging with what other processes wrote meanwhile. A corrupt or unreadable file is
ignored with a warning; an unwritable directory only costs the persistence.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Hashable, Optional, Sequence

import torch
import triton

__all__ = ["CACHE_ENV", "FILE_NAME", "cache_path", "device_name", "disk_key", "encode", "lookup", "store"]

CACHE_ENV = "FASTPEFT_CACHE"
FILE_NAME = "tuning.json"
_FORMAT = 1
_OFF = ("0", "off", "none", "false")


def cache_path() -> Optional[Path]:
    """The tuning file now (read from the environment on each call), None when disabled."""
    where = os.environ.get(CACHE_ENV)
    if where is not None and where.strip().lower() in _OFF:
        return None
    if not where:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        where = os.path.join(base, "fastpeft")
    return Path(where) / FILE_NAME


_NAMES: Dict[int, Optional[str]] = {}


def device_name(index: Any) -> Optional[str]:
    """The CUDA device's name for a tuner key's device index; None when there is no such
    device (CPU tensors: index None), so that nothing is persisted for it."""
    if not isinstance(index, int) or isinstance(index, bool):
        return None
    if index not in _NAMES:
        ok = torch.cuda.is_available() and 0 <= index < torch.cuda.device_count()
        _NAMES[index] = torch.cuda.get_device_name(index) if ok else None
    return _NAMES[index]


def _portable(value: Any) -> Any:
    """``value`` as JSON data; raises TypeError for what has no stable text form."""
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_portable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"no portable form for {type(value).__name__}")


def disk_key(key: Hashable) -> Optional[str]:
    """The file's key for a tuner key ``(kernel name, device index, *parts)``: the device
    name and Triton version in place of the index; None when the key is not of that form,
    names no CUDA device, or holds parts without a stable text form."""
    if not isinstance(key, tuple) or len(key) < 2 or not isinstance(key[0], str):
        return None
    name = device_name(key[1])
    if name is None:
        return None
    try:
        return json.dumps([key[0], name, f"triton {triton.__version__}", *_portable(key[2:])])
    except TypeError:
        return None


def encode(variant: Any) -> Optional[Dict[str, Any]]:
    """A variant as JSON data (a dataclass: its type name and fields), None otherwise."""
    if dataclasses.is_dataclass(variant) and not isinstance(variant, type):
        return {"type": type(variant).__name__, **dataclasses.asdict(variant)}
    return None


class _File:
    """The tuning file's entries, read once; written merged with the file's current ones."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: Optional[Dict[str, Any]] = None
        self.writable = True

    def read(self) -> Dict[str, Any]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            warnings.warn(f"fastpeft: cannot read the tuning cache {self.path} ({exc}); tuning from scratch")
            return {}
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("entries"), dict):
                raise ValueError(f"not a format-{_FORMAT} tuning file")
        except ValueError as exc:
            warnings.warn(f"fastpeft: ignoring the corrupt tuning cache {self.path} ({exc}); it will be rewritten")
            return {}
        return data["entries"]

    def get(self, dkey: str) -> Any:
        if self.entries is None:
            self.entries = self.read()
        return self.entries.get(dkey)

    def put(self, dkey: str, value: Dict[str, Any]) -> None:
        merged = self.read()  # what other processes wrote since this one read the file
        merged.update(self.entries or {})
        merged[dkey] = value
        self.entries = merged
        if not self.writable:
            return
        try:
            _atomic_write_text(self.path, json.dumps({"format": _FORMAT, "entries": merged}, indent=1, sort_keys=True))
        except OSError as exc:
            self.writable = False
            warnings.warn(f"fastpeft: cannot write the tuning cache {self.path} ({exc}); picks stay in this process")


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


_FILES: Dict[Path, _File] = {}


def _file() -> Optional[_File]:
    path = cache_path()
    if path is None:
        return None
    if path not in _FILES:
        _FILES[path] = _File(path)
    return _FILES[path]


def lookup(key: Hashable, candidates: Sequence[Any]) -> Any:
    """The stored pick for ``key`` if it is one of ``candidates`` (that candidate), else None."""
    dkey = disk_key(key)
    f = _file() if dkey is not None else None
    stored = f.get(dkey) if f is not None else None
    if stored is None:
        return None
    for cand in candidates:
        value = encode(cand)
        if value is not None and json.loads(json.dumps(value)) == stored:  # as JSON reads it back
            return cand
    return None


def store(key: Hashable, variant: Any) -> None:
    """Persist the tuner's pick for ``key`` (nothing for keys or variants without a
    portable form)."""
    dkey, value = disk_key(key), encode(variant)
    f = _file() if dkey is not None and value is not None else None
    if f is not None:
        f.put(dkey, value)
