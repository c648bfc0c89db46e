"""A model's adapters once injected: switch, merge, unload, delete, train, mix per row.

Everything here works through the Method protocol (``fastpeft.core.method``) and the
layer protocol (``fastpeft.core.layer``), for every method alike. State kept on the model
(plain attributes, not parameters): ``model.fastpeft_config`` (``{adapter_name:
config}``) and ``model.fastpeft_active`` (the active adapter name).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from fastpeft.core.batch import BatchPlan, provided_for, providers_of
from fastpeft.core.config import AdapterConfig
from fastpeft.core.layer import PlanReader
from fastpeft.core.method import adapter_configs, all_layer_types, method_of
from fastpeft.core.modules_to_save import ModulesToSaveWrapper
from fastpeft.core.targets import named_modules_of, replace_modules

__all__ = [
    "BASE",
    "adapter_layers",
    "require_adapter",
    "adapter_tensors",
    "set_adapter",
    "active_adapter",
    "adapter_names",
    "merge",
    "unmerge",
    "unload",
    "delete_adapter",
    "batch_adapters",
    "trainable_parameters",
    "print_trainable_parameters",
    "adapter_loss",
    "adapter_step",
    "install_loss_hook",
]

#: Row name that PEFT uses for "no adapter" in ``adapter_names=``; ``None`` means the same.
BASE = "__base__"


def adapter_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(path, layer)`` of every adapter layer and ``modules_to_save`` wrapper."""
    return named_modules_of(model, all_layer_types() + (ModulesToSaveWrapper,))


def require_adapter(model: nn.Module, adapter_name: str) -> AdapterConfig:
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise KeyError(f"the model has no adapter named {adapter_name!r}; it has {sorted(configs)}")
    return configs[adapter_name]


def adapter_tensors(model: nn.Module, adapter_name: str, *, loading: bool = False) -> Dict[str, torch.Tensor]:
    """Every tensor of one adapter's checkpoint, keyed as PEFT saves it (no prefix): the
    method's key map (``load_keys`` when ``loading``, else ``save_keys``) plus the
    ``modules_to_save`` copies."""
    config = require_adapter(model, adapter_name)
    method = method_of(config)
    key_map = method.load_keys if loading else method.save_keys
    tensors = dict(key_map(model, adapter_name, config))
    for name, wrapper in named_modules_of(model, (ModulesToSaveWrapper,)):
        if adapter_name in wrapper.modules_to_save:
            for key, tensor in wrapper.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                tensors[f"{name}.{key}"] = tensor
    return tensors


# --------------------------------------------------------------------- trainability


def own_parameters(model: nn.Module, adapter_name: str) -> Dict[int, nn.Parameter]:
    """The parameters an adapter trains: its method's (``Method.trainable``) and its
    ``modules_to_save`` copies, never the frozen originals of the wrappers (a method may
    save them, e.g. biases with LoRA's ``bias="all"``, but PEFT never trains them)."""
    config = adapter_configs(model)[adapter_name]
    wrappers = named_modules_of(model, (ModulesToSaveWrapper,))
    originals = {id(p) for _, w in wrappers for p in w.original_module.parameters()}
    params = list(method_of(config).trainable(model, adapter_name, config))
    for _, wrapper in wrappers:
        if adapter_name in wrapper.modules_to_save:
            params += list(wrapper.modules_to_save[adapter_name].parameters())
    return {id(p): p for p in params if id(p) not in originals}


def mark_trainable(model: nn.Module) -> None:
    """After an injection, as PEFT: the base is frozen and, among the adapters, only the
    active one trains (unless its config says ``inference_mode``)."""
    per_adapter = {name: own_parameters(model, name) for name in adapter_configs(model)}
    adapters = {key for params in per_adapter.values() for key in params}
    for p in model.parameters():
        if id(p) not in adapters:
            p.requires_grad_(False)
    active = model.__dict__.get("fastpeft_active")
    if active is not None:
        inference_mode = bool(getattr(adapter_configs(model)[active], "inference_mode", False))
        train_only(model, active, inference_mode, per_adapter)


def train_only(
    model: nn.Module,
    adapter_name: str,
    inference_mode: bool,
    per_adapter: Optional[Dict[str, Dict[int, nn.Parameter]]] = None,
) -> None:
    """``adapter_name``'s tensors train (frozen with ``inference_mode``), every other
    adapter's are frozen; tensors shared with it (a trained base bias) follow it.
    ``per_adapter``: each adapter's parameters when the caller already gathered them."""
    if per_adapter is None:
        per_adapter = {name: own_parameters(model, name) for name in adapter_configs(model)}
    own = per_adapter[adapter_name]
    for name, params in per_adapter.items():
        if name != adapter_name:
            for key, t in params.items():
                if key not in own:
                    t.requires_grad_(False)
    for t in own.values():
        t.requires_grad_(not inference_mode)


def upcast_adapter(model: nn.Module, adapter_name: str) -> None:
    """As PEFT's ``autocast_adapter_dtype=True``: an adapter's own fp16/bf16 tensors are
    kept in fp32 (stabler training, checkpoints loaded without rounding); the base keeps
    its dtype and the ops cast at their boundary."""
    for _, layer in adapter_layers(model):
        if isinstance(layer, ModulesToSaveWrapper) or adapter_name not in layer.adapter_names:
            continue
        for t in layer.adapter_parameters(adapter_name):
            if t.dtype in (torch.float16, torch.bfloat16):
                t.data = t.data.float()


def trainable_parameters(model: nn.Module) -> Tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared tensors counted once)."""
    seen = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print the counts as PEFT's ``print_trainable_parameters`` does."""
    trainable, total = trainable_parameters(model)
    pct = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")


def adapter_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """The active adapter's method's extra training-loss term (``Method.extra_loss``,
    e.g. an orthogonal regulariser); None when it has none. Add it to the loss."""
    name = active_adapter(model)
    if name is None:
        return None
    config = require_adapter(model, name)
    return method_of(config).extra_loss(model, name, config)


def _add_adapter_loss(model: nn.Module, args, output):
    """Forward hook: the active adapter's ``adapter_loss`` joins ``output.loss`` when the
    model returns a loss tensor (as PEFT's ``AdaLoraModel.forward`` adds its regulariser)."""
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        extra = adapter_loss(model)
        if extra is not None:
            output.loss = loss + extra
    return output


def install_loss_hook(model: nn.Module, method) -> Optional[Callable[[], None]]:
    """Register :func:`_add_adapter_loss` on ``model`` once, if ``method`` asks for it
    (``Method.loss_in_forward``; other methods' models are never touched); returns the
    undo of the registration (None when nothing was registered)."""
    if not method.loss_in_forward:
        return None
    if model.__dict__.get("fastpeft_loss_hook") is not None:
        return None
    handle = model.register_forward_hook(_add_adapter_loss)
    model.__dict__["fastpeft_loss_hook"] = handle

    def undo() -> None:
        handle.remove()
        model.__dict__.pop("fastpeft_loss_hook", None)

    return undo


def adapter_step(model: nn.Module, global_step: int) -> None:
    """Run the active adapter's method's per-step callback (``Method.on_step``, e.g. a
    rank allocator); call it once per optimizer step."""
    name = active_adapter(model)
    if name is not None:
        config = require_adapter(model, name)
        method_of(config).on_step(model, name, config, global_step)


# --------------------------------------------------------------------- switching


def sync_active(model: nn.Module) -> None:
    """Every layer's active adapter follows the model's (None where a layer lacks it)."""
    active = model.__dict__.get("fastpeft_active")
    for _, layer in adapter_layers(model):
        layer.set_adapter(active if active in layer.adapter_names else None)


def set_adapter(model: nn.Module, adapter_name: Optional[str], inference_mode: bool = False) -> None:
    """Make ``adapter_name`` the active adapter everywhere; ``None``: run the base model.

    As PEFT's ``set_adapter``: a merged model is unmerged first (with a warning: the
    merged weights hold another adapter); the active adapter's tensors become trainable
    (frozen with ``inference_mode=True``) and every other adapter's are frozen; ``None``
    leaves the flags as they are.
    """
    if adapter_name is not None:
        require_adapter(model, adapter_name)
    if any(getattr(layer, "merged", False) for _, layer in adapter_layers(model)):
        warnings.warn("switching adapters on a merged model: unmerging it first", stacklevel=2)
        unmerge(model)
    if adapter_name is not None:
        train_only(model, adapter_name, inference_mode)
    model.__dict__["fastpeft_active"] = adapter_name
    sync_active(model)


def active_adapter(model: nn.Module) -> Optional[str]:
    return model.__dict__.get("fastpeft_active")


def adapter_names(model: nn.Module) -> List[str]:
    return list(adapter_configs(model))


def merge(model: nn.Module, adapter_name: Optional[str] = None, *, safe_merge: bool = False) -> nn.Module:
    """Fold ``adapter_name`` (default: the active adapter) into the base weights of every
    layer that holds it. Outputs are unchanged; ``unmerge`` undoes it.

    All layers or none: every layer is checked before any weight changes (an adapter
    that cannot merge, e.g. ``lora_bias`` over a layer without bias, raises and merges
    nothing). ``safe_merge=True`` (PEFT's option) also computes each layer's merged
    weights on a copy first and raises ``ValueError`` naming the layer if any holds NaN
    or inf (a broken adapter, or one that overflows the weights' dtype); the model is
    then left exactly as it was, every layer unmerged.
    """
    name = adapter_name if adapter_name is not None else active_adapter(model)
    if name is None:
        raise ValueError("no adapter is active and none was named: nothing to merge")
    method = method_of(require_adapter(model, name))
    if not method.merges:
        raise ValueError(
            f"{method.peft_type} adapters cannot be merged into the base weights; keep them unmerged, "
            "or unload the model without merging (fastpeft.unload(model, merge_adapter=False))"
        )
    layers = [
        (path, layer) for path, layer in adapter_layers(model)
        if name in layer.adapter_names and not isinstance(layer, ModulesToSaveWrapper)
    ]
    for path, layer in layers:
        try:
            # With safe_merge each layer's result is computed twice (checked here, then
            # merged): one layer's copy in memory at a time, never the whole model's.
            layer.check_merge(name, check_finite=safe_merge)
        except ValueError as exc:
            raise ValueError(f"layer {path!r}: {exc}") from None
    done = []
    try:
        for _, layer in layers:
            layer.merge(name)
            done.append(layer)
    except BaseException:
        for layer in done:
            layer.unmerge(name)  # only this adapter: earlier merges stay
        raise
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo every merge in every layer."""
    for _, layer in adapter_layers(model):
        layer.unmerge()
    return model


def unload(model: nn.Module, merge_adapter: bool = True, *, safe_merge: bool = False) -> nn.Module:
    """Merge the active adapter (unless ``merge_adapter=False``) and put the plain modules
    back: the result has no fastpeft layers (PEFT's ``merge_and_unload``/``unload``).
    ``modules_to_save`` modules are replaced by the active adapter's trained copy; layers
    that joined through hooks leave with their hooks. ``safe_merge``: as in
    :func:`merge`; a merge that fails leaves the model as it was (nothing merged, nothing
    unloaded)."""
    if merge_adapter and active_adapter(model) is not None:
        merge(model, safe_merge=safe_merge)
    layers = adapter_layers(model)  # never nested: inject refuses to adapt inside a layer
    for _, layer in layers:
        layer.detach()
    replace_modules(model, {name: layer.to_base_module() for name, layer in layers}, add=True)
    model.__dict__.pop("fastpeft_config", None)
    model.__dict__.pop("fastpeft_active", None)
    hook = model.__dict__.pop("fastpeft_loss_hook", None)
    if hook is not None:
        hook.remove()
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove one adapter from every layer (unmerging it first where merged)."""
    require_adapter(model, adapter_name)
    for _, layer in adapter_layers(model):
        if adapter_name in layer.adapter_names:
            layer.delete_adapter(adapter_name)
    configs = adapter_configs(model)
    del configs[adapter_name]
    if active_adapter(model) == adapter_name:
        # As PEFT: the first remaining adapter becomes active, and trainable (unless it
        # was loaded for inference).
        successor = next(iter(configs), None)
        model.__dict__["fastpeft_active"] = successor
        if successor is not None:
            train_only(model, successor, bool(getattr(configs[successor], "inference_mode", False)))
    sync_active(model)


# --------------------------------------------------------------------- mixed batches


def _plan_readers(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if m is not model and isinstance(m, PlanReader)]


def _row_names(model: nn.Module, names: Sequence[Optional[str]], readers: List[nn.Module]) -> List[Optional[str]]:
    """``names`` checked against the adapters the model, its layers (injected or built
    by hand) and its providers (an attached ``AdapterPool``) know; BASE becomes None."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise TypeError(f"batch_adapters expects a list with one adapter name (or None) per row, got {names!r}")
    if len(names) == 0:
        raise ValueError("batch_adapters needs at least one row name")
    configs = adapter_configs(model)
    known = set(configs).union(*(m.adapter_names for m in readers))
    for provider in providers_of(model):
        known.update(provider.served())
    rows: List[Optional[str]] = []
    for name in names:
        if name is None or name == BASE:
            rows.append(None)
        elif isinstance(name, str) and name in known:
            if name in configs and not method_of(configs[name]).mixed_batches:
                raise ValueError(f"batch_adapters: adapter {name!r} ({configs[name].peft_type}) does not run in mixed batches")
            rows.append(name)
        else:
            raise ValueError(
                f"batch_adapters: unknown adapter {name!r}; the model has {sorted(known)} "
                f"(use None or {BASE!r} for the base model)"
            )
    return rows


@contextlib.contextmanager
def batch_adapters(model: nn.Module, names: Sequence[Optional[str]]) -> Iterator[nn.Module]:
    """Within the block, batch row ``i`` runs through adapter ``names[i]`` (``None`` or
    ``"__base__"``: the base model), as PEFT's ``model(..., adapter_names=names)``. Names
    may be the model's own adapters or those of a provider (an attached ``AdapterPool``).

    One :class:`~fastpeft.core.batch.BatchPlan` is built and set on every adapter layer.
    Eval mode only (dropout per row is not defined); adapters must be unmerged.
    Gradients flow through a mixed batch (to the inputs and each row's adapter, e.g. for
    per-row losses or inspection), eager and under ``torch.compile``. Pool adapters the
    batch uses stay loaded (not evicted; unloading them raises) until it ends. Every
    layer's previous plan is restored on exit, errors included.
    """
    readers = _plan_readers(model)
    rows = _row_names(model, names, readers)
    if not readers:
        raise ValueError("batch_adapters: the model has no adapter layers (inject or load an adapter first)")
    if model.training or any(m.training for m in readers):
        raise RuntimeError(
            "batch_adapters (mixed adapters per row) runs in eval mode only, as PEFT's adapter_names=: "
            "call model.eval() first"
        )
    if any(getattr(m, "merged", False) for m in readers):
        raise RuntimeError("batch_adapters needs unmerged adapters: call fastpeft.unmerge(model) first")
    with provided_for(model, tuple(rows)) as provided:
        plan = BatchPlan(rows, provided)
        previous = [(m, m.batch_plan) for m in readers]
        try:
            for m in readers:
                m.batch_plan = plan
            yield model
        finally:
            for m, prev in previous:
                m.batch_plan = prev
