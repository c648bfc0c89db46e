"""PEFT checkpoints: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``).

Layout, exactly as PEFT's ``save_pretrained`` writes it: the config is the JSON of the
adapter's config (``peft_type`` names the method); tensor keys are the model's module
paths under ``base_model.model.``, without the adapter name, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``; ``modules_to_save``
modules appear under their own path (``base_model.model.lm_head.weight``).

Loading validates everything first (the config, the file, the key set, every shape and
dtype) and only then copies tensors in; any error leaves the model as it was, with no
trace (not even the ``fastpeft_config`` attribute on a model that had none). Saving
replaces the adapter's files in the directory as one unit; any error leaves the
directory as it was, with no temporary files.

With ``bias="all"`` PEFT spells the bias of a module that another adapter wraps after
the wrapper (``<path>.base_layer.bias``, ``<path>.original_module.bias``); such
checkpoints load, and fastpeft saves every such bias under the module's own path
(``<path>.bias``), as PEFT does for a model holding this adapter alone.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import warnings
from typing import Any, Callable, Dict, List, Sequence, Tuple, Union

import torch
import torch.nn as nn

from fastpeft.model import _inject, _require_adapter, adapter_tensors, get_method, optional_adapter_tensors

__all__ = [
    "CONFIG_NAME",
    "SAFETENSORS_NAME",
    "BIN_NAME",
    "PREFIX",
    "AdapterCheckpointError",
    "read_adapter_config",
    "read_adapter_weights",
    "load_adapter",
    "save_adapter",
]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

PathLike = Union[str, "os.PathLike[str]"]


class AdapterCheckpointError(ValueError):
    """An adapter directory that cannot be loaded into this model (the message says why)."""


def _dir(path: PathLike) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"adapter directory {path!r} does not exist")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{path!r} is a file; pass the adapter directory that holds {CONFIG_NAME}")
    return path


def read_adapter_config(path: PathLike) -> Dict[str, Any]:
    """The parsed ``adapter_config.json`` of an adapter directory."""
    path = _dir(path)
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path!r} has no {CONFIG_NAME}: not a PEFT adapter directory")
    try:
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterCheckpointError(f"{file!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise AdapterCheckpointError(f"{file!r} must hold a JSON object, got {type(data).__name__}")
    if not data.get("peft_type"):
        raise AdapterCheckpointError(f"{file!r} has no peft_type (expected e.g. \"LORA\")")
    data.pop("runtime_config", None)  # runtime-only, as PEFT ignores it
    return data


def read_adapter_weights(path: PathLike) -> Dict[str, torch.Tensor]:
    """All tensors of an adapter directory (safetensors preferred, else the ``.bin``),
    on the CPU. A damaged or truncated file raises ``AdapterCheckpointError``."""
    path = _dir(path)
    st_file = os.path.join(path, SAFETENSORS_NAME)
    bin_file = os.path.join(path, BIN_NAME)
    if os.path.isfile(st_file):
        from safetensors.torch import load_file

        try:
            tensors = load_file(st_file, device="cpu")
        except Exception as exc:  # SafetensorError, OSError, ... : all mean "bad file"
            raise AdapterCheckpointError(
                f"cannot read {st_file!r}: the file is corrupted or truncated ({type(exc).__name__}: {exc})"
            ) from None
    elif os.path.isfile(bin_file):
        try:
            tensors = torch.load(bin_file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterCheckpointError(
                f"cannot read {bin_file!r}: the file is corrupted, truncated or not a tensor dict "
                f"({type(exc).__name__}: {exc})"
            ) from None
    else:
        raise FileNotFoundError(f"{path!r} has neither {SAFETENSORS_NAME} nor {BIN_NAME}")
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise AdapterCheckpointError(f"the weights in {path!r} are not a dict of named tensors")
    return tensors


def _strip_prefix(tensors: Dict[str, torch.Tensor], where: str) -> Dict[str, torch.Tensor]:
    bad = [k for k in tensors if not k.startswith(PREFIX)]
    if bad:
        raise AdapterCheckpointError(
            f"{where}: {len(bad)} key(s) do not start with {PREFIX!r} as PEFT writes them, e.g. {bad[:3]}"
        )
    return {k[len(PREFIX):]: v for k, v in tensors.items()}


def _list(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _check_tensors(
    source: Dict[str, torch.Tensor], targets: Dict[str, torch.Tensor], where: str
) -> None:
    missing = set(targets) - set(source)
    unexpected = set(source) - set(targets)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_list(unexpected)}")
        raise AdapterCheckpointError(
            f"{where} does not fit this model ({'; '.join(parts)}); is it an adapter for another base "
            "model or made with a different config?"
        )
    for key, dst in targets.items():
        src = source[key]
        if tuple(src.shape) != tuple(dst.shape):
            raise AdapterCheckpointError(
                f"{where}: {key} has shape {tuple(src.shape)} but the model expects {tuple(dst.shape)}; "
                "the adapter was made for a base model with other layer sizes"
            )
        if dst.is_floating_point() and not src.is_floating_point():
            raise AdapterCheckpointError(f"{where}: {key} has dtype {src.dtype}, expected a floating-point tensor")
        if not dst.is_floating_point() and src.is_floating_point():
            raise AdapterCheckpointError(f"{where}: {key} has dtype {src.dtype}, but the model holds {dst.dtype}")
        if src.is_complex() != dst.is_complex():
            raise AdapterCheckpointError(f"{where}: {key} has dtype {src.dtype}, the model holds {dst.dtype}")


def load_adapter(
    model: nn.Module,
    path: PathLike,
    adapter_name: str = "default",
    *,
    is_trainable: bool = False,
    backend: str = "auto",
    autocast_adapter_dtype: bool = True,
) -> nn.Module:
    """Load a PEFT adapter directory into ``model`` (a plain transformers/torch model,
    or one that already holds fastpeft adapters) under ``adapter_name``; returns the model.

    As ``peft.PeftModel.from_pretrained``: the first adapter becomes active; with
    ``is_trainable=False`` (the default) the adapter is frozen and the model put in
    eval mode; ``autocast_adapter_dtype`` keeps an fp16/bf16 model's adapter in fp32, as
    PEFT does. Everything is checked before any tensor is copied: on any error (missing
    files, unknown or unsupported ``peft_type``, DoRA, targets that match nothing, keys
    or shapes that do not fit, a failure while copying) the model is left exactly as it
    was: the same modules, tensors, flags and modes, and no attribute added.
    """
    where = os.fspath(path)
    data = read_adapter_config(path)
    spec = get_method(data["peft_type"])
    config = spec.config_cls.from_dict(data)
    # As PEFT's from_pretrained: the saved inference_mode gives way to is_trainable.
    config.inference_mode = not is_trainable
    tensors = _strip_prefix(read_adapter_weights(path), where)

    undo = _inject(model, config, adapter_name, backend, for_loading=True, autocast_adapter_dtype=autocast_adapter_dtype)
    try:
        targets = adapter_tensors(model, adapter_name)
        optional = optional_adapter_tensors(model, adapter_name)
        tensors = _respell(tensors, targets, optional, where)
        if spec.check_shapes is not None:
            try:
                spec.check_shapes(model.fastpeft_config[adapter_name], tensors, targets, where)
            except ValueError as exc:
                raise AdapterCheckpointError(str(exc)) from None
        extras = {key: optional[key] for key in tensors if key not in targets and key in optional}
        _check_tensors({k: v for k, v in tensors.items() if k not in extras}, targets, where)
        _check_tensors({k: tensors[k] for k in extras}, extras, where)
        to_copy = {**targets, **extras}
        # Tensors that belonged to the model before (e.g. base biases with bias="all")
        # are saved so that a failure while copying can still restore them.
        fresh = {id(t) for t in _fresh_tensors(model, adapter_name)}
        saved = [(t, t.detach().clone()) for t in to_copy.values() if id(t) not in fresh]
        try:
            with torch.no_grad():
                for key, dst in to_copy.items():
                    dst.copy_(tensors[key].to(device=dst.device, dtype=dst.dtype))
        except BaseException:
            with torch.no_grad():
                for t, value in saved:
                    t.copy_(value)
            raise
    except BaseException:
        undo()
        raise
    if not is_trainable:
        for t in targets.values():
            if isinstance(t, nn.Parameter):
                t.requires_grad_(False)
        model.eval()
    return model


def _bias_spellings(key: str) -> List[str]:
    """Other keys under which PEFT saves the bias ``key`` (``<path>.bias``) when the
    module was wrapped in the model it saved from: ``<path>.base_layer.bias`` (a LoRA
    layer of another adapter) and ``<prefix>.original_module.<rest>.bias`` (inside a
    ``modules_to_save`` wrapper of another adapter)."""
    parts = key.split(".")
    if parts[-1] != "bias":
        return []
    out = [".".join(parts[:-1] + ["base_layer", "bias"])]
    out += [".".join(parts[:i] + ["original_module"] + parts[i:]) for i in range(1, len(parts))]
    return out


def _respell(
    source: Dict[str, torch.Tensor],
    targets: Dict[str, torch.Tensor],
    optional: Dict[str, torch.Tensor],
    where: str,
) -> Dict[str, torch.Tensor]:
    """``source`` with the biases PEFT spelled for a wrapped module renamed to the key
    this model expects (see ``_bias_spellings``): which spelling PEFT writes depends on
    the other adapters loaded when it saved, not on the adapter itself."""
    out = dict(source)
    for key in targets:
        if key in out:
            continue
        found = [k for k in _bias_spellings(key) if k in out and k not in targets and k not in optional]
        if len(found) > 1:
            raise AdapterCheckpointError(f"{where}: the bias {key} is given more than once, as {found}")
        if found:
            out[key] = out.pop(found[0])
    return out


def _fresh_tensors(model: nn.Module, adapter_name: str):
    """Tensors created for this adapter (its own weights and modules_to_save copies)."""
    from fastpeft.model import ModulesToSaveWrapper, _adapter_layers

    out = []
    for _, layer in _adapter_layers(model):
        if isinstance(layer, ModulesToSaveWrapper):
            if adapter_name in layer.modules_to_save:
                out.extend(layer.modules_to_save[adapter_name].state_dict(keep_vars=True).values())
            continue
        if adapter_name in getattr(layer, "adapter_names", ()):
            out.extend(layer.adapter_parameters(adapter_name))
    return out


def save_adapter(
    model: nn.Module, path: PathLike, adapter_name: str = "default", *, safe_serialization: bool = True
) -> None:
    """Write ``adapter_name`` as a PEFT adapter directory that ``peft.PeftModel.from_pretrained``
    and ``fastpeft.load_adapter`` load.

    All or nothing: the adapter's files (``adapter_config.json`` and the weights; an
    older weights file of the other format is removed) are replaced as one unit. On any
    error the directory is left exactly as it was (a directory this call created is
    removed again) and no temporary file remains. Other files in the directory (a
    README, a trainer's state) are left alone.
    """
    config = _require_adapter(model, adapter_name)
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path!r} is a file; save_adapter writes a directory")
    # Own copies: safetensors refuses tensors that share storage (e.g. tied weights).
    tensors = {
        PREFIX + key: t.detach().to("cpu").contiguous().clone()
        for key, t in adapter_tensors(model, adapter_name).items()
    }
    data = config.to_dict()
    if not data.get("base_model_name_or_path"):
        name = getattr(getattr(model, "config", None), "_name_or_path", None)
        data["base_model_name_or_path"] = name or None
    data["inference_mode"] = True
    config_blob = json.dumps(data, indent=2, sort_keys=True).encode()
    if safe_serialization:
        from safetensors.torch import save

        blob = save(tensors, metadata={"format": "pt"})
        weights, write_weights, stale = SAFETENSORS_NAME, (lambda f: f.write(blob)), BIN_NAME
    else:
        weights, write_weights, stale = BIN_NAME, (lambda f: torch.save(tensors, f)), SAFETENSORS_NAME
    created = _missing_dirs(path)
    try:
        os.makedirs(path, exist_ok=True)
        # The reader prefers safetensors: an older file in the other format would shadow
        # or contradict this save, so it goes in the same step.
        _replace_files(path, {weights: write_weights, CONFIG_NAME: lambda f: f.write(config_blob)}, remove=[stale])
    except BaseException:
        for directory in reversed(created):  # innermost first; only the (empty) ones made here
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        raise


def _missing_dirs(path: str) -> List[str]:
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


def _replace_files(directory: str, writers: Dict[str, Callable[[Any], Any]], remove: Sequence[str]) -> None:
    """Replace the files ``writers`` names (``name -> write(binary file)``) and delete
    those in ``remove``, as one unit: after an error every file is as it was and no
    temporary is left.

    Steps: each new file is written (and synced) to a temporary beside its target; the
    current files are renamed aside; the new ones renamed into place; the old ones
    deleted. ``CONFIG_NAME`` goes aside first and comes back last, so that whenever a
    config is present the weights beside it are its own: a process killed part-way
    leaves a directory without a config (which nothing loads), never a config with the
    other save's weights. An error before the last rename undoes the renames done so far.
    """
    order = sorted(writers, key=lambda n: n == CONFIG_NAME)  # the config last in, first out
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
        _roll_back(directory, staged, aside, placed, exc)
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
    directory: str, staged: Dict[str, str], aside: Dict[str, str], placed: List[str], error: BaseException
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
    for name in sorted(aside, key=lambda n: n == CONFIG_NAME):
        try:
            os.replace(aside[name], os.path.join(directory, name))
        except OSError as exc:
            failed.append(f"restore {name} from {aside[name]!r} ({exc})")
    for tmp in staged.values():
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    if failed and hasattr(error, "add_note"):
        error.add_note(f"save_adapter could not undo everything in {directory!r}: " + "; ".join(failed))
