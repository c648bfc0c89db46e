"""Inject an adapter into a model: all or nothing, with undo.

``inject`` asks the config's method (``fastpeft.core.method``) where its layers go and
how to build them, builds every new layer aside (the model untouched), then places them
(a swapped leaf, a wrapped module or a hooked child: ``Attach``), adds the adapter to
layers the method placed before, wraps ``modules_to_save``, records the config and sets
the trainable flags. Every step registers its reversal; an error anywhere runs them all
(newest first) and the model is left exactly as it was. ``fastpeft.core.checkpoint``
injects through the same path and keeps the undo until the tensors are copied in.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Tuple

import torch.nn as nn

from fastpeft.core.config import AdapterConfig
from fastpeft.core.linear import AdapterLinear
from fastpeft.core.method import Attach, Method, adapter_configs, all_layer_types, as_config, method_of
from fastpeft.core.modules_to_save import ModulesToSaveWrapper
from fastpeft.core.state import BASE, adapter_layers, install_loss_hook, mark_trainable, sync_active, upcast_adapter
from fastpeft.core.targets import model_type_of, replace_modules

__all__ = ["Undo", "inject", "inject_with_undo"]


class Undo:
    """Collects the steps that reverse a partly done injection, run newest first."""

    def __init__(self) -> None:
        self.steps: List[Callable[[], None]] = []

    def add(self, step: Callable[[], None]) -> None:
        self.steps.append(step)

    def __call__(self) -> None:
        while self.steps:
            self.steps.pop()()


def inject(
    model: nn.Module,
    config: Any,
    adapter_name: str = "default",
    *,
    backend: str = "auto",
    autocast_adapter_dtype: bool = True,
) -> nn.Module:
    """Add an adapter to ``model`` in place and return the model.

    ``config``: a fastpeft config (``fp.LoraConfig``), a ``peft`` config, or its dict.
    Each target module is replaced by the method's layer (a layer already adapted by
    the same method gets one more named adapter), every other parameter is frozen
    (``modules_to_save`` copies and, per ``bias``, biases stay trainable). The first
    adapter becomes the active one; later ones are added inactive (``set_adapter``).
    All or nothing: on any error the model is left exactly as it was (the same modules,
    tensors, flags and modes, each layer's active adapter, and no attribute added).
    ``autocast_adapter_dtype`` (PEFT's default, True): on an fp16/bf16 model the adapter's
    own tensors are kept in fp32.
    """
    config = _with_default_targets(model, as_config(config))
    method = method_of(config)
    _refuse(method, config)
    problems = method.check_new(config)
    if problems:
        raise NotImplementedError(f"cannot create a new {method.peft_type} adapter: " + "; ".join(problems))
    inject_with_undo(model, config, adapter_name, backend, autocast_adapter_dtype)
    return model


def inject_with_undo(
    model: nn.Module, config: AdapterConfig, adapter_name: str, backend: str, autocast_adapter_dtype: bool = True
) -> Undo:
    """Inject one adapter; returns the undo of everything done. All checks come first."""
    method = method_of(config)
    config = _with_task_modules(config)
    if not isinstance(adapter_name, str) or not adapter_name or adapter_name == BASE or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without '.', not {BASE!r}; got {adapter_name!r}")
    if adapter_name in adapter_configs(model):
        raise ValueError(
            f"the model already has an adapter named {adapter_name!r}; pick another name or "
            "fastpeft.delete_adapter(model, name) first"
        )
    _refuse(method, config)

    adapted_types = all_layer_types() + (ModulesToSaveWrapper,)
    paths = method.find_targets(model, config, adapted_types)
    modules = dict(model.named_modules())
    # Building freezes the targets' own Parameters (swapped layers adopt them): every
    # flag is restored if anything fails.
    flags = [(p, p.requires_grad) for p in model.parameters()]

    def restore_flags() -> None:
        for p, f in flags:
            p.requires_grad_(f)

    try:
        new_layers, existing = _build_targets(model, modules, adapted_types, method, paths, config, adapter_name, backend)
        save_new, save_existing = _build_saved(modules, adapted_types, config, adapter_name, new_layers)
    except BaseException:
        restore_flags()
        raise

    # New layers take the train/eval mode of the module they replace (or of the model).
    for name, module in {**new_layers, **save_new}.items():
        module.train(modules.get(name, model).training)

    undo = Undo()
    # Runs last on undo (steps run newest first): every adapter layer gets back the
    # active adapter it had, once every other step (deleted adapters included) is reversed.
    actives = [(layer, layer.active_adapter) for _, layer in adapter_layers(model)]
    undo.add(lambda: [layer.set_adapter(name) for layer, name in actives])
    undo.add(restore_flags)
    try:
        _place(model, {**new_layers, **save_new}, undo)
        for name, layer in existing:
            method.add_to_layer(name, layer, config, adapter_name)
            undo.add(lambda m=layer: m.delete_adapter(adapter_name))
        for wrapper in save_existing:
            wrapper.add_adapter(adapter_name)
            undo.add(lambda w=wrapper: w.delete_adapter(adapter_name))
        _record(model, config, adapter_name, undo)
        unhook = install_loss_hook(model, method)
        if unhook is not None:
            undo.add(unhook)
        if autocast_adapter_dtype:
            upcast_adapter(model, adapter_name)
        mark_trainable(model)
    except BaseException:
        undo()
        raise
    return undo


def _record(model: nn.Module, config: AdapterConfig, adapter_name: str, undo: Undo) -> None:
    """Keep the config on the model; the first adapter becomes the active one. The
    model's own attributes are set here and removed again on undo if they were not there
    before, so that a failed call leaves no trace on the model at all."""
    undo.add(_attribute_restorer(model, "fastpeft_config"))
    undo.add(_attribute_restorer(model, "fastpeft_active"))
    configs = model.__dict__.setdefault("fastpeft_config", {})
    configs[adapter_name] = config
    undo.add(lambda: configs.pop(adapter_name, None))
    active = model.__dict__.get("fastpeft_active")
    if active is None or active not in configs:
        model.__dict__["fastpeft_active"] = adapter_name
    sync_active(model)


def _attribute_restorer(model: nn.Module, name: str) -> Callable[[], None]:
    """A step that puts ``model.__dict__[name]`` back as it is now: the same object, or
    no attribute at all."""
    missing = object()
    before = model.__dict__.get(name, missing)

    def restore() -> None:
        if before is missing:
            model.__dict__.pop(name, None)
        else:
            model.__dict__[name] = before

    return restore


def _refuse(method: Method, config: AdapterConfig) -> None:
    problems = method.check_config(config)
    if problems:
        raise NotImplementedError(f"cannot use this {method.peft_type} config: " + "; ".join(problems))


def _place(model: nn.Module, layers: Dict[str, nn.Module], undo: Undo) -> None:
    """Put new layers at their paths (replacing the module there, or as a new child for
    a hooked layer) and let each attach itself (hooks); registers the undo."""
    old = replace_modules(model, layers, add=True)
    undo.add(lambda: replace_modules(model, old, add=True))
    for layer in layers.values():
        undo.add(layer.detach)
        layer.attach(model)


def _build_targets(
    model: nn.Module,
    modules: Dict[str, nn.Module],
    adapted_types: Tuple[type, ...],
    method: Method,
    paths: List[str],
    config: AdapterConfig,
    adapter_name: str,
    backend: str,
) -> Tuple[Dict[str, nn.Module], List[Tuple[str, nn.Module]]]:
    """The method's new layers for ``paths`` (built aside; the model untouched but for
    the targets' frozen flags) and the layers it placed before that take one more
    adapter. ``modules``: the model's named modules. Raises on a target it cannot adapt."""
    new_layers: Dict[str, nn.Module] = {}
    existing: List[Tuple[str, nn.Module]] = []
    for name in paths:
        module = modules.get(name)
        if isinstance(module, method.layer_types):
            if adapter_name in module.adapter_names:
                raise ValueError(f"module {name!r} already holds an adapter named {adapter_name!r}")
            existing.append((name, module))
        elif isinstance(module, adapted_types):
            raise ValueError(
                f"module {name!r} is already adapted by another method ({type(module).__name__}); "
                "one module takes adapters of one method only"
            )
        elif method.attach is Attach.HOOKS:
            if module is not None:
                raise ValueError(f"{method.peft_type} hooks in at {name!r}, which the model already uses")
            new_layers[name] = method.build_layer(name, model, config, adapter_name, backend)
        elif isinstance(module, method.target_types):
            _check_nothing_adapted_inside(name, module, adapted_types)
            layer = method.build_layer(name, module, config, adapter_name, backend)
            if method.attach is Attach.SWAP and isinstance(layer, AdapterLinear):
                layer.adopt_base_of(module)  # tied weights stay one Parameter
            new_layers[name] = layer
        else:
            kinds = ", ".join(t.__name__ for t in method.target_types)
            raise ValueError(
                f"target module {name!r} is a {type(module).__name__}; {method.peft_type} adapts only {kinds}. "
                "Narrow target_modules (e.g. name the leaf projections) or exclude it"
            )
    return new_layers, existing


def _check_nothing_adapted_inside(name: str, module: nn.Module, adapted_types: Tuple[type, ...]) -> None:
    """A wrapped module must not hold adapter layers: adapted layers never nest."""
    inner = [sub for sub, m in module.named_modules() if sub and isinstance(m, adapted_types)]
    if inner:
        raise ValueError(
            f"target module {name!r} holds adapter layers ({', '.join(inner[:3])}); adapt it before "
            "adapting modules inside it, or narrow target_modules"
        )


def _build_saved(
    modules: Dict[str, nn.Module],
    adapted_types: Tuple[type, ...],
    config: AdapterConfig,
    adapter_name: str,
    new_layers: Dict[str, nn.Module],
) -> Tuple[Dict[str, nn.Module], List[nn.Module]]:
    """``modules_to_save``: new wrappers (built aside) and existing wrappers that take a
    copy for this adapter."""
    save_new: Dict[str, nn.Module] = {}
    save_existing: List[nn.Module] = []
    if not config.modules_to_save:
        return save_new, save_existing
    for name, module in modules.items():
        # PEFT's rule: a plain suffix match on the module path.
        if not name or not any(name.endswith(m) for m in config.modules_to_save):
            continue
        if any(isinstance(modules.get(p), adapted_types) or p in save_new for p in _prefixes(name)):
            continue  # inside an adapted layer, a wrapper, or a module already chosen
        if isinstance(module, ModulesToSaveWrapper):
            save_existing.append(module)
        elif isinstance(module, adapted_types):
            raise ValueError(f"modules_to_save names {name!r}, which is already adapted ({type(module).__name__})")
        elif name in new_layers or any(
            isinstance(m, adapted_types) or f"{name}.{sub}" in new_layers for sub, m in module.named_modules() if sub
        ):
            raise ValueError(
                f"modules_to_save names {name!r}, which holds adapter layers (or targets of this adapter): "
                "a module is either trained in full or adapted; narrow modules_to_save or target_modules"
            )
        else:
            wrapper = ModulesToSaveWrapper(module)
            wrapper.add_adapter(adapter_name)
            save_new[name] = wrapper
    # The task heads PEFT adds itself (classifier, score, ...) may be absent: only a
    # list that names more than those must match something.
    task_heads = _task_heads(config)
    if not save_new and not save_existing and any(m not in task_heads for m in config.modules_to_save):
        raise ValueError(f"modules_to_save={config.modules_to_save!r} matched no module of the model")
    return save_new, save_existing


def _prefixes(name: str) -> List[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


# PEFT's task models train (and save) the task head in full: its SEQ_CLS and TOKEN_CLS
# models add "classifier" and "score" to modules_to_save, QUESTION_ANS "qa_outputs".
_TASK_MODULES_TO_SAVE = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def _task_heads(config: AdapterConfig) -> Tuple[str, ...]:
    return _TASK_MODULES_TO_SAVE.get(str(config.task_type or "").upper(), ())


def _with_task_modules(config: AdapterConfig) -> AdapterConfig:
    """``config`` with its task's head added to ``modules_to_save``, as PEFT does (the
    filled config is the one kept and saved)."""
    heads = _task_heads(config)
    current = list(config.modules_to_save or [])
    missing = [h for h in heads if h not in current]
    if not missing:
        return config
    return dataclasses.replace(config, modules_to_save=current + missing)


def _with_default_targets(model: nn.Module, config: AdapterConfig) -> AdapterConfig:
    """``config`` with PEFT's default targets for this architecture filled in when it
    names none (the filled config is the one saved, as PEFT saves it)."""
    if config.target_modules is not None:
        return config
    defaults = method_of(config).default_targets(model_type_of(model))
    if not defaults:
        return config
    # Fill only what the user left unset (a given feedforward_modules stays, as in PEFT).
    return dataclasses.replace(config, **{k: v for k, v in defaults.items() if getattr(config, k, None) is None})
