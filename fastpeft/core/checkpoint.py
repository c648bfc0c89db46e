"""PEFT checkpoints: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``).

Layout, exactly as PEFT's ``save_pretrained`` writes it: the config is the JSON of the
adapter's config (``peft_type`` names the method); tensor keys are the model's module
paths under ``base_model.model.``, without the adapter name, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``; ``modules_to_save``
modules appear under their own path (``base_model.model.lm_head.weight``).

Loading validates everything first (the config, the file, the key set, every shape and
dtype) and only then copies tensors in; any error leaves the model as it was, with no
trace (not even the ``fastpeft_config`` attribute on a model that had none). Saving
replaces the adapter's files in the directory as one unit (``fastpeft.core.files``);
any error leaves the directory as it was, with no temporary files. The keys each method
writes and reads are its own key map (``Method.save_keys`` / ``load_keys`` /
``optional_keys``). This is the one reader of PEFT directories: the serving pool reads
them through :func:`read_adapter` too.

With ``bias="all"`` PEFT spells the bias of a module that another adapter wraps after
the wrapper (``<path>.base_layer.bias``, ``<path>.original_module.bias``); such
checkpoints load, and fastpeft saves every such bias under the module's own path
(``<path>.bias``), as PEFT does for a model holding this adapter alone.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Dict, List, Mapping, Tuple, Union

import torch
import torch.nn as nn

from fastpeft.core.files import missing_dirs, replace_files
from fastpeft.core.inject import inject_with_undo
from fastpeft.core.method import get_method, method_of
from fastpeft.core.modules_to_save import ModulesToSaveWrapper
from fastpeft.core.state import adapter_layers, adapter_tensors, require_adapter

__all__ = [
    "CONFIG_NAME",
    "SAFETENSORS_NAME",
    "BIN_NAME",
    "PREFIX",
    "AdapterCheckpointError",
    "read_adapter_config",
    "read_adapter_weights",
    "read_adapter",
    "strip_prefix",
    "strip_model_prefix",
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


def strip_model_prefix(path: str) -> str:
    """A key or module path without PEFT's ``base_model.model.`` (or ``base_model.``) prefix."""
    for prefix in (PREFIX, "base_model."):
        if path.startswith(prefix):
            return path[len(prefix):]
    return path


def strip_prefix(
    tensors: Mapping[str, Any], where: str, prefix: str = PREFIX, bare: Tuple[str, ...] = ()
) -> Dict[str, Any]:
    """A saved directory's tensors keyed without PEFT's ``base_model.model.`` prefix
    (or the method's ``key_prefix``), which every key must have but the method's
    ``bare`` keys (saved as they are)."""
    bad = [k for k in tensors if k not in bare and not k.startswith(prefix)]
    if bad:
        raise AdapterCheckpointError(
            f"{where}: {len(bad)} key(s) do not start with {prefix!r} as PEFT writes them, e.g. {bad[:3]}"
        )
    return {k if k in bare else k[len(prefix):]: v for k, v in tensors.items()}


def _key_spelling(data: Dict[str, Any]) -> Tuple[str, Tuple[str, ...]]:
    """``(key_prefix, bare_keys)`` of a checkpoint of this config's method (PEFT's
    ``base_model.model.`` for an unknown method: its error comes later, with its name)."""
    try:
        method = get_method(data.get("peft_type"))
    except ValueError:
        return PREFIX, ()
    return method.key_prefix, tuple(method.bare_keys)


def read_adapter(path: PathLike) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """``(config dict, tensors keyed without the prefix)`` of a PEFT adapter directory."""
    data = read_adapter_config(path)
    return data, strip_prefix(read_adapter_weights(path), os.fspath(path), *_key_spelling(data))


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
    files, unknown or unsupported ``peft_type`` or config, targets that match nothing, keys
    or shapes that do not fit, a failure while copying) the model is left exactly as it
    was: the same modules, tensors, flags and modes, and no attribute added.
    """
    where = os.fspath(path)
    data, tensors = read_adapter(path)
    config = get_method(data["peft_type"]).config_cls.from_dict(data)
    # As PEFT's from_pretrained: the saved inference_mode gives way to is_trainable.
    config.inference_mode = not is_trainable

    undo = inject_with_undo(model, config, adapter_name, backend, autocast_adapter_dtype)
    try:
        tensors, targets = _checked_tensors(model, adapter_name, tensors, where)
        _copy_in(model, adapter_name, tensors, targets)
    except BaseException:
        undo()
        raise
    if not is_trainable:
        for t in targets.values():
            if isinstance(t, nn.Parameter):
                t.requires_grad_(False)
        model.eval()
    return model


def _checked_tensors(
    model: nn.Module, adapter_name: str, tensors: Dict[str, torch.Tensor], where: str
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """``(tensors, {key: destination})``: the checkpoint's tensors (respelled where PEFT
    spelled a wrapped module's bias otherwise) and where each goes, after the method's
    own check and the generic one (keys, shapes, dtypes)."""
    config = model.fastpeft_config[adapter_name]
    method = method_of(config)
    targets = adapter_tensors(model, adapter_name, loading=True)
    optional = {k: t for k, t in method.optional_keys(model, adapter_name, config).items() if k not in targets}
    tensors = _respell(tensors, targets, optional, where)
    try:
        method.check_checkpoint(config, tensors, targets, where)
    except ValueError as exc:
        raise AdapterCheckpointError(str(exc)) from None
    extras = {key: optional[key] for key in tensors if key not in targets and key in optional}
    _check_tensors({k: v for k, v in tensors.items() if k not in extras}, targets, where)
    _check_tensors({k: tensors[k] for k in extras}, extras, where)
    return tensors, {**targets, **extras}


def _copy_in(model: nn.Module, adapter_name: str, tensors: Dict[str, torch.Tensor], targets: Dict[str, torch.Tensor]) -> None:
    """Copy the checkpoint in. Tensors that belonged to the model before (e.g. base
    biases with bias="all") are saved first, so that a failure while copying can still
    restore them."""
    fresh = {id(t) for t in _fresh_tensors(model, adapter_name)}
    saved = [(t, t.detach().clone()) for t in targets.values() if id(t) not in fresh]
    try:
        with torch.no_grad():
            for key, dst in targets.items():
                dst.copy_(tensors[key].to(device=dst.device, dtype=dst.dtype))
    except BaseException:
        with torch.no_grad():
            for t, value in saved:
                t.copy_(value)
        raise


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
    source: Dict[str, torch.Tensor], targets: Dict[str, torch.Tensor], optional: Dict[str, torch.Tensor], where: str
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
    out = []
    for _, layer in adapter_layers(model):
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
    config = require_adapter(model, adapter_name)
    method = method_of(config)
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path!r} is a file; save_adapter writes a directory")
    # Own copies: safetensors refuses tensors that share storage (e.g. tied weights).
    tensors = {
        (key if key in method.bare_keys else method.key_prefix + key): t.detach().to("cpu").contiguous().clone()
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
    created = missing_dirs(path)
    try:
        os.makedirs(path, exist_ok=True)
        # The reader prefers safetensors: an older file in the other format would shadow
        # or contradict this save, so it goes in the same step.
        writers = {weights: write_weights, CONFIG_NAME: lambda f: f.write(config_blob)}
        replace_files(path, writers, remove=[stale], last=CONFIG_NAME)
    except BaseException:
        for directory in reversed(created):  # innermost first; only the (empty) ones made here
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        raise
