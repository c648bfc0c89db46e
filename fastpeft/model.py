"""Model-level API: inject adapters into a model, switch, merge, unload, mix per row.

Every PEFT method plugs in through one small registry: a ``MethodSpec`` says which
config class reads its ``adapter_config.json``, how to wrap one target module, how to
add a further adapter to an already-wrapped one, and which model tensors make up its
checkpoint (keys exactly as PEFT writes them, without the ``base_model.model.`` prefix).
From that, ``inject``, ``load_adapter``/``save_adapter`` (fastpeft.checkpoint),
``set_adapter``, ``merge``, ``unmerge``, ``unload``, ``delete_adapter`` and
``batch_adapters`` work for every method alike.

Injected layers follow a small protocol (``FastLoRALinear`` is the model):
``adapter_names`` (names it holds), ``set_adapter(name | None)``, ``merge(name)``,
``check_merge(name, check_finite=...)`` (raise ``ValueError`` where ``merge`` would
fail or, with ``check_finite``, give NaN/inf; changes nothing), ``unmerge()``,
``merged``, ``delete_adapter(name)``, ``to_base_module()`` (the plain module, with
merged adapters folded in) and an attribute ``row_adapters`` (``None``, or one adapter
name or ``None`` per batch row).

State kept on the model (plain attributes, not parameters): ``model.fastpeft_config``
(``{adapter_name: config}``) and ``model.fastpeft_active`` (the active adapter name),
both added by the first successful ``inject``/``load_adapter``. A failed call leaves the
model exactly as it was: modules, tensors, flags, modes and attributes.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from fastpeft.config import LORA_INIT_CHOICES, AdapterConfig, LoraConfig, config_to_plain, pattern_key
from fastpeft.lora import POOL_ATTR, FastLoRALinear
from fastpeft.targets import (
    default_lora_targets,
    find_targets,
    linear_types,
    model_type_of,
    named_modules_of,
    replace_modules,
)

__all__ = [
    "MethodSpec",
    "register_method",
    "get_method",
    "registered_methods",
    "as_config",
    "inject",
    "set_adapter",
    "merge",
    "unmerge",
    "unload",
    "delete_adapter",
    "batch_adapters",
    "trainable_parameters",
    "print_trainable_parameters",
    "adapter_tensors",
    "ModulesToSaveWrapper",
    "BASE",
]

#: Row name that PEFT uses for "no adapter" in ``adapter_names=``; ``None`` means the same.
BASE = "__base__"

# build_layer(module_path, target_module, config, adapter_name, backend) -> new module
BuildLayer = Callable[[str, nn.Module, AdapterConfig, str, str], nn.Module]
# add_to_layer(module_path, existing_layer, config, adapter_name) -> None
AddToLayer = Callable[[str, nn.Module, AdapterConfig, str], None]
# param_map(model, adapter_name, config) -> {checkpoint key (no "base_model.model."): live tensor}
ParamMap = Callable[[nn.Module, str, AdapterConfig], Dict[str, torch.Tensor]]


@dataclass(frozen=True)
class MethodSpec:
    """How one PEFT method plugs into the model-level API.

    Attributes:
        peft_type: the ``peft_type`` string of ``adapter_config.json`` (``"LORA"``).
        config_cls: an ``AdapterConfig`` subclass with that ``peft_type``.
        layer_types: the module classes this method injects (for set/merge/unload...).
        target_types: module classes a target may be; anything else matched by
            ``target_modules`` is an error naming the module and its type.
        build_layer: wrap one target module: ``(path, module, config, adapter_name,
            backend) -> new module``. Must not modify ``module`` or the model.
        add_to_layer: add an adapter to an already-injected layer of ``layer_types``:
            ``(path, layer, config, adapter_name) -> None``. Undone with
            ``layer.delete_adapter(adapter_name)``.
        param_map: ``(model, adapter_name, config) -> {key: tensor}``: every tensor of
            this adapter's checkpoint, keyed as PEFT writes it *without* the
            ``base_model.model.`` prefix (e.g. ``"model.layers.0.self_attn.q_proj.lora_A.weight"``),
            the value being the live model tensor to save from / copy into.
            ``modules_to_save`` keys are added by the generic code, not here.
        optional_map: optional, same signature: tensors a checkpoint *may* hold beside
            ``param_map``'s (extras PEFT writes in some cases); loaded when present.
        check_shapes: optional ``(config, source, targets, where) -> None`` (``source``:
            the checkpoint's tensors, ``targets``: ``param_map``'s, both keyed without
            the prefix), run on a checkpoint before the generic shape check: raise
            ``ValueError`` with the real cause of a mismatch the method can name (a
            config whose rank differs from the tensors', two tensors that do not fit
            each other), rather than the generic "other layer sizes".
        check_config: optional ``(config) -> list of problems``; non-empty refuses the
            config (unsupported feature) with those messages.
        default_targets: optional ``(model_type) -> {config field: value}`` filling a
            config whose ``target_modules`` is unset (PEFT's per-architecture defaults);
            None: no default for that model type.
    """

    peft_type: str
    config_cls: type
    layer_types: Tuple[type, ...]
    target_types: Tuple[type, ...]
    build_layer: BuildLayer
    add_to_layer: AddToLayer
    param_map: ParamMap
    check_config: Optional[Callable[[AdapterConfig], List[str]]] = None
    optional_map: Optional[ParamMap] = None
    check_shapes: Optional[Callable[..., None]] = None
    default_targets: Optional[Callable[[Optional[str]], Optional[Dict[str, Any]]]] = None


_METHODS: Dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Register (or replace) the method for ``spec.peft_type``; returns ``spec``."""
    if not isinstance(spec, MethodSpec):
        raise TypeError(f"register_method expects a MethodSpec, got {type(spec).__name__}")
    key = spec.peft_type.upper()
    if getattr(spec.config_cls, "peft_type", None) != key:
        raise ValueError(
            f"{spec.config_cls.__name__}.peft_type is {getattr(spec.config_cls, 'peft_type', None)!r}, "
            f"but the spec registers {key!r}"
        )
    _METHODS[key] = spec
    return spec


def registered_methods() -> List[str]:
    return sorted(_METHODS)


def get_method(peft_type: Any) -> MethodSpec:
    """The registered ``MethodSpec`` for a ``peft_type`` (string or enum)."""
    key = str(getattr(peft_type, "value", peft_type)).upper()
    if key not in _METHODS:
        raise ValueError(
            f"unsupported peft_type {peft_type!r}: fastpeft supports {registered_methods()}"
        )
    return _METHODS[key]


def as_config(config: Any) -> AdapterConfig:
    """A fastpeft config from a fastpeft config, a ``peft`` config object, or a dict."""
    if isinstance(config, AdapterConfig):
        return config
    data = config_to_plain(config)
    if "peft_type" not in data or data["peft_type"] is None:
        raise ValueError("the config has no peft_type; expected e.g. peft_type='LORA'")
    return get_method(data["peft_type"]).config_cls.from_dict(data)


# --------------------------------------------------------------------- model state


def _configs(model: nn.Module) -> Dict[str, AdapterConfig]:
    """The model's ``{adapter name: config}`` (empty when it has none). Reading never
    adds the attribute: only a successful injection does."""
    configs = model.__dict__.get("fastpeft_config")
    return {} if configs is None else configs


def _all_layer_types() -> Tuple[type, ...]:
    return tuple({t for spec in _METHODS.values() for t in spec.layer_types})


def _adapter_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return named_modules_of(model, _all_layer_types() + (ModulesToSaveWrapper,))


def _require_adapter(model: nn.Module, adapter_name: str) -> AdapterConfig:
    configs = _configs(model)
    if adapter_name not in configs:
        raise KeyError(f"the model has no adapter named {adapter_name!r}; it has {sorted(configs)}")
    return configs[adapter_name]


def optional_adapter_tensors(model: nn.Module, adapter_name: str) -> Dict[str, torch.Tensor]:
    """Tensors a checkpoint of this adapter may hold beside ``adapter_tensors`` (same keys
    convention); loaded when present, never saved."""
    config = _require_adapter(model, adapter_name)
    spec = get_method(config.peft_type)
    if spec.optional_map is None:
        return {}
    required = adapter_tensors(model, adapter_name)
    return {k: t for k, t in spec.optional_map(model, adapter_name, config).items() if k not in required}


def adapter_tensors(model: nn.Module, adapter_name: str) -> Dict[str, torch.Tensor]:
    """Every tensor of one adapter's checkpoint, keyed as PEFT saves it (no prefix)."""
    config = _require_adapter(model, adapter_name)
    tensors = dict(get_method(config.peft_type).param_map(model, adapter_name, config))
    for name, wrapper in named_modules_of(model, (ModulesToSaveWrapper,)):
        if adapter_name in wrapper.modules_to_save:
            for key, tensor in wrapper.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                tensors[f"{name}.{key}"] = tensor
    return tensors


# --------------------------------------------------------------------- modules_to_save


class ModulesToSaveWrapper(nn.Module):
    """A module trained in full per adapter (PEFT's ``modules_to_save``).

    ``original_module`` is the frozen original; ``modules_to_save[name]`` a trainable copy
    per adapter (state-dict keys as PEFT's wrapper). The active adapter's copy runs; with
    ``row_adapters`` set each batch row runs through its own adapter's copy.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: Optional[str] = None
        self.row_adapters: Optional[List[Optional[str]]] = None

    @property
    def adapter_names(self) -> List[str]:
        return list(self.modules_to_save.keys())

    def add_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            raise ValueError(f"adapter {adapter_name!r} already exists in this module")
        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[adapter_name] = clone

    def set_adapter(self, adapter_name: Optional[str]) -> None:
        self.active_adapter = adapter_name if adapter_name in self.modules_to_save else None

    def delete_adapter(self, adapter_name: str) -> None:
        del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    # No merging: the copy simply replaces the original.
    merged = False

    def merge(
        self, adapter_name: Optional[str] = None, *, safe_merge: bool = False,
        adapter_names: Optional[Sequence[str]] = None,
    ) -> None:
        return None

    def check_merge(
        self, adapter_name: Optional[str] = None, *, adapter_names: Optional[Sequence[str]] = None,
        check_finite: bool = True,
    ) -> None:
        return None

    def unmerge(self, adapter_name: Optional[str] = None) -> None:
        return None

    def to_base_module(self) -> nn.Module:
        if self.active_adapter is not None:
            return self.modules_to_save[self.active_adapter]
        return self.original_module

    def active_module(self) -> nn.Module:
        """The module that runs now: the active adapter's copy, else the original."""
        return self.modules_to_save[self.active_adapter] if self.active_adapter else self.original_module

    def __getattr__(self, name: str):
        # Attributes the model reads from the wrapped module (``lm_head.weight``, ...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save", "active_adapter"):
                raise
            return getattr(self.active_module(), name)

    def forward(self, *args, **kwargs):
        # Any signature: HF calls some modules (attention, say) with keywords only.
        if self.row_adapters is None:
            return self.active_module()(*args, **kwargs)
        if not args:
            raise ValueError(
                "batch_adapters: a modules_to_save module runs per row only when its input is passed "
                "positionally (as PEFT's adapter_names=); this one got keywords only"
            )
        x, args = args[0], args[1:]
        rows = self.row_adapters
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != len(rows):
            raise ValueError(
                f"batch_adapters got {len(rows)} adapter names but this module's input has batch size "
                f"{x.shape[0] if isinstance(x, torch.Tensor) and x.dim() else 'none'}"
            )
        groups: Dict[Optional[str], List[int]] = {}
        for i, name in enumerate(rows):
            groups.setdefault(name if name in self.modules_to_save else None, []).append(i)
        out = None
        for name, idx in groups.items():
            module = self.original_module if name is None else self.modules_to_save[name]
            index = torch.tensor(idx, device=x.device, dtype=torch.long)
            sub = module(x.index_select(0, index), *args, **kwargs)
            if out is None:
                out = sub.new_empty((x.shape[0], *sub.shape[1:]))
            out.index_copy_(0, index, sub)
        return out


# --------------------------------------------------------------------- inject


class _Undo:
    """Collects the steps that reverse a partly done injection, run newest first."""

    def __init__(self) -> None:
        self.steps: List[Callable[[], None]] = []

    def add(self, step: Callable[[], None]) -> None:
        self.steps.append(step)

    def __call__(self) -> None:
        while self.steps:
            self.steps.pop()()


def _inject(
    model: nn.Module,
    config: AdapterConfig,
    adapter_name: str,
    backend: str,
    for_loading: bool,
    autocast_adapter_dtype: bool = True,
) -> _Undo:
    """Inject one adapter; returns the undo of everything done. All checks come first."""
    spec = get_method(config.peft_type)
    config = _with_task_modules(config)
    if not isinstance(adapter_name, str) or not adapter_name or adapter_name == BASE or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without '.', not {BASE!r}; got {adapter_name!r}")
    if adapter_name in _configs(model):
        raise ValueError(
            f"the model already has an adapter named {adapter_name!r}; pick another name or "
            "fastpeft.delete_adapter(model, name) first"
        )
    problems = spec.check_config(config) if spec.check_config is not None else []
    if problems:
        raise NotImplementedError(f"cannot use this {spec.peft_type} config: " + "; ".join(problems))
    if not for_loading and getattr(config, "init_lora_weights", True) not in LORA_INIT_CHOICES:
        raise NotImplementedError(
            f"init_lora_weights={config.init_lora_weights!r} is not supported for new adapters; "
            f"use one of {LORA_INIT_CHOICES} (saved adapters with any init load fine)"
        )

    adapted_types = _all_layer_types() + (ModulesToSaveWrapper,)
    names = find_targets(
        model,
        config.target_modules,
        config.exclude_modules,
        config.layers_to_transform,
        config.layers_pattern,
        modules_to_save=config.modules_to_save,
        task_type=config.task_type,
        adapted_types=adapted_types,
    )
    modules = dict(model.named_modules())
    # Building freezes the targets' own Parameters (the new layers adopt them): every
    # flag is restored if anything fails.
    flags = [(p, p.requires_grad) for p in model.parameters()]

    def restore_flags() -> None:
        for p, f in flags:
            p.requires_grad_(f)

    try:
        new_modules, existing = _build_targets(modules, adapted_types, spec, names, config, adapter_name, backend)
        save_new, save_existing = _build_saved(modules, adapted_types, config, adapter_name, new_modules)
    except BaseException:
        restore_flags()
        raise

    # New layers take the train/eval mode of the module they replace.
    for name, module in {**new_modules, **save_new}.items():
        module.train(modules[name].training)

    undo = _Undo()
    # Runs last on undo (steps run newest first): every adapter layer gets back the
    # active adapter it had, once every other step (deleted adapters included) is reversed.
    actives = [(layer, layer.active_adapter) for _, layer in _adapter_layers(model)]
    undo.add(lambda: [layer.set_adapter(name) for layer, name in actives])
    undo.add(restore_flags)
    try:
        old = replace_modules(model, {**new_modules, **save_new})
        undo.add(lambda: replace_modules(model, old))
        for name, module in existing:
            spec.add_to_layer(name, module, config, adapter_name)
            undo.add(lambda m=module: m.delete_adapter(adapter_name))
        for wrapper in save_existing:
            wrapper.add_adapter(adapter_name)
            undo.add(lambda w=wrapper: w.delete_adapter(adapter_name))
        # The model's own attributes: set here, and removed again on undo if they were not
        # there before, so that a failed call leaves no trace on the model at all.
        undo.add(_attribute_restorer(model, "fastpeft_config"))
        undo.add(_attribute_restorer(model, "fastpeft_active"))
        configs = model.__dict__.setdefault("fastpeft_config", {})
        configs[adapter_name] = config
        undo.add(lambda: configs.pop(adapter_name, None))
        active = model.__dict__.get("fastpeft_active")
        if active is None or active not in configs:
            model.__dict__["fastpeft_active"] = adapter_name
        _sync_active(model)
        if autocast_adapter_dtype:
            _upcast_adapter(model, adapter_name)
        _mark_trainable(model)
    except BaseException:
        undo()
        raise
    return undo


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


def _build_targets(
    modules: Dict[str, nn.Module],
    adapted_types: Tuple[type, ...],
    spec: MethodSpec,
    names: List[str],
    config: AdapterConfig,
    adapter_name: str,
    backend: str,
) -> Tuple[Dict[str, nn.Module], List[Tuple[str, nn.Module]]]:
    """The method's new layers for ``names`` (built aside; the model untouched but for
    the targets' frozen flags) and the already adapted layers that take one more
    adapter. ``modules``: the model's named modules. Raises on a target it cannot adapt."""
    new_modules: Dict[str, nn.Module] = {}
    existing: List[Tuple[str, nn.Module]] = []
    for name in names:
        module = modules[name]
        if isinstance(module, spec.layer_types):
            if adapter_name in getattr(module, "adapter_names", ()):
                raise ValueError(f"module {name!r} already holds an adapter named {adapter_name!r}")
            existing.append((name, module))
        elif isinstance(module, adapted_types):
            raise ValueError(
                f"module {name!r} is already adapted by another method ({type(module).__name__}); "
                "one module takes adapters of one method only"
            )
        elif isinstance(module, spec.target_types):
            layer = spec.build_layer(name, module, config, adapter_name, backend)
            if hasattr(layer, "adopt_base_of"):
                layer.adopt_base_of(module)  # tied weights stay one Parameter
            new_modules[name] = layer
        else:
            kinds = ", ".join(t.__name__ for t in spec.target_types)
            raise ValueError(
                f"target module {name!r} is a {type(module).__name__}; {spec.peft_type} adapts only {kinds}. "
                "Narrow target_modules (e.g. name the leaf projections) or exclude it"
            )
    return new_modules, existing


def _build_saved(
    modules: Dict[str, nn.Module],
    adapted_types: Tuple[type, ...],
    config: AdapterConfig,
    adapter_name: str,
    new_modules: Dict[str, nn.Module],
) -> Tuple[Dict[str, nn.Module], List[nn.Module]]:
    """``modules_to_save``: new wrappers (built aside) and existing wrappers that take a
    copy for this adapter."""
    save_new: Dict[str, nn.Module] = {}
    save_existing: List[nn.Module] = []
    if config.modules_to_save:
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
            elif name in new_modules or any(
                isinstance(m, adapted_types) or f"{name}.{sub}" in new_modules for sub, m in module.named_modules() if sub
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


def _prefixes(name: str) -> List[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _upcast_adapter(model: nn.Module, adapter_name: str) -> None:
    """As PEFT's ``autocast_adapter_dtype=True``: an adapter's own fp16/bf16 tensors are
    kept in fp32 (stabler training, checkpoints loaded without rounding); the base keeps
    its dtype and the ops cast at their boundary."""
    for _, layer in _adapter_layers(model):
        if isinstance(layer, ModulesToSaveWrapper) or adapter_name not in layer.adapter_names:
            continue
        for t in layer.adapter_parameters(adapter_name):
            if t.dtype in (torch.float16, torch.bfloat16):
                t.data = t.data.float()


def _own_parameters(model: nn.Module, adapter_name: str) -> Dict[int, nn.Parameter]:
    """The parameters an adapter trains: its checkpoint's, except the frozen originals
    of ``modules_to_save`` wrappers (saved with ``bias="all"``, never trained, as PEFT)
    and, for a MiCA adapter (``init_lora_weights="mica"``), ``lora_B``: PEFT trains only
    its ``lora_A``."""
    originals = {
        id(p) for _, w in named_modules_of(model, (ModulesToSaveWrapper,)) for p in w.original_module.parameters()
    }
    init = getattr(_configs(model)[adapter_name], "init_lora_weights", True)
    frozen_suffix = ".lora_B.weight" if isinstance(init, str) and init.lower() == "mica" else None
    return {
        id(t): t
        for key, t in adapter_tensors(model, adapter_name).items()
        if isinstance(t, nn.Parameter) and id(t) not in originals
        and not (frozen_suffix and key.endswith(frozen_suffix))
    }


def _mark_trainable(model: nn.Module) -> None:
    """After an injection, as PEFT: the base is frozen and, among the adapters, only the
    active one trains (unless its config says ``inference_mode``)."""
    per_adapter = {name: _own_parameters(model, name) for name in _configs(model)}
    adapters = {key for params in per_adapter.values() for key in params}
    for p in model.parameters():
        if id(p) not in adapters:
            p.requires_grad_(False)
    active = model.__dict__.get("fastpeft_active")
    if active is not None:
        inference_mode = bool(getattr(_configs(model)[active], "inference_mode", False))
        _train_only(model, active, inference_mode, per_adapter)


def _train_only(
    model: nn.Module,
    adapter_name: str,
    inference_mode: bool,
    per_adapter: Optional[Dict[str, Dict[int, nn.Parameter]]] = None,
) -> None:
    """``adapter_name``'s tensors train (frozen with ``inference_mode``), every other
    adapter's are frozen; tensors shared with it (a trained base bias) follow it.
    ``per_adapter``: each adapter's parameters when the caller already gathered them."""
    if per_adapter is None:
        per_adapter = {name: _own_parameters(model, name) for name in _configs(model)}
    own = per_adapter[adapter_name]
    for name, params in per_adapter.items():
        if name != adapter_name:
            for key, t in params.items():
                if key not in own:
                    t.requires_grad_(False)
    for t in own.values():
        t.requires_grad_(not inference_mode)


def _sync_active(model: nn.Module) -> None:
    active = model.__dict__.get("fastpeft_active")
    for _, layer in _adapter_layers(model):
        layer.set_adapter(active if active in layer.adapter_names else None)


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
    _inject(model, config, adapter_name, backend, for_loading=False, autocast_adapter_dtype=autocast_adapter_dtype)
    return model


def _with_default_targets(model: nn.Module, config: AdapterConfig) -> AdapterConfig:
    """``config`` with PEFT's default targets for this architecture filled in when it
    names none (the filled config is the one saved, as PEFT saves it)."""
    if config.target_modules is not None:
        return config
    spec = get_method(config.peft_type)
    defaults = spec.default_targets(model_type_of(model)) if spec.default_targets is not None else None
    if not defaults:
        return config
    # Fill only what the user left unset (a given feedforward_modules stays, as in PEFT).
    return dataclasses.replace(config, **{k: v for k, v in defaults.items() if getattr(config, k, None) is None})


# --------------------------------------------------------------------- switching


def set_adapter(model: nn.Module, adapter_name: Optional[str], inference_mode: bool = False) -> None:
    """Make ``adapter_name`` the active adapter everywhere; ``None``: run the base model.

    As PEFT's ``set_adapter``: a merged model is unmerged first (with a warning: the
    merged weights hold another adapter); the active adapter's tensors become trainable
    (frozen with ``inference_mode=True``) and every other adapter's are frozen; ``None``
    leaves the flags as they are.
    """
    if adapter_name is not None:
        _require_adapter(model, adapter_name)
    if any(getattr(layer, "merged", False) for _, layer in _adapter_layers(model)):
        warnings.warn("switching adapters on a merged model: unmerging it first", stacklevel=2)
        unmerge(model)
    if adapter_name is not None:
        _train_only(model, adapter_name, inference_mode)
    model.__dict__["fastpeft_active"] = adapter_name
    _sync_active(model)


def active_adapter(model: nn.Module) -> Optional[str]:
    return model.__dict__.get("fastpeft_active")


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
    _require_adapter(model, name)
    layers = [
        (path, layer) for path, layer in _adapter_layers(model)
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
    for _, layer in _adapter_layers(model):
        layer.unmerge()
    return model


def unload(model: nn.Module, merge_adapter: bool = True, *, safe_merge: bool = False) -> nn.Module:
    """Merge the active adapter (unless ``merge_adapter=False``) and put the plain modules
    back: the result has no fastpeft layers (PEFT's ``merge_and_unload``/``unload``).
    ``modules_to_save`` modules are replaced by the active adapter's trained copy.
    ``safe_merge``: as in :func:`merge`; a merge that fails leaves the model as it was
    (nothing merged, nothing unloaded)."""
    if merge_adapter and active_adapter(model) is not None:
        merge(model, safe_merge=safe_merge)
    layers = _adapter_layers(model)
    # Outermost first is not needed: adapted layers are never nested.
    replace_modules(model, {name: layer.to_base_module() for name, layer in layers})
    model.__dict__.pop("fastpeft_config", None)
    model.__dict__.pop("fastpeft_active", None)
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove one adapter from every layer (unmerging it first where merged)."""
    _require_adapter(model, adapter_name)
    for _, layer in _adapter_layers(model):
        if adapter_name in layer.adapter_names:
            layer.delete_adapter(adapter_name)
    configs = _configs(model)
    del configs[adapter_name]
    if active_adapter(model) == adapter_name:
        # As PEFT: the first remaining adapter becomes active, and trainable (unless it
        # was loaded for inference).
        successor = next(iter(configs), None)
        model.__dict__["fastpeft_active"] = successor
        if successor is not None:
            _train_only(model, successor, bool(getattr(configs[successor], "inference_mode", False)))
    _sync_active(model)


def adapter_names(model: nn.Module) -> List[str]:
    return list(_configs(model))


# --------------------------------------------------------------------- mixed batches


def _attached_pools(model: nn.Module) -> List[Any]:
    """The ``AdapterPool`` of every layer a pool serves (serving), one entry per layer."""
    return [slots.pool for slots in (getattr(m, POOL_ATTR, None) for m in model.modules()) if slots is not None]


def _layer_and_pool_adapters(model: nn.Module) -> set:
    """Adapter names the model's layers hold (injected or built by hand) and those
    loaded in an ``AdapterPool`` attached to them (serving)."""
    names: set = set()
    for module in model.modules():
        if module is not model and hasattr(module, "row_adapters"):
            names.update(getattr(module, "adapter_names", ()))
    for pool in _attached_pools(model):
        names.update(pool.adapters)
    return names


@contextlib.contextmanager
def batch_adapters(model: nn.Module, names: Sequence[Optional[str]]) -> Iterator[nn.Module]:
    """Within the block, batch row ``i`` runs through adapter ``names[i]`` (``None`` or
    ``"__base__"``: the base model), as PEFT's ``model(..., adapter_names=names)``. Names
    may be the model's own adapters or those loaded in an attached ``AdapterPool``.

    Eval mode only (dropout per row is not defined); adapters must be unmerged.
    Gradients flow through a mixed batch (to the inputs and each row's adapter, e.g.
    for per-row losses or inspection), eager and under ``torch.compile``. Every adapter
    layer's previous state is restored on exit, errors included.
    Pool adapters the batch uses are in use until it ends (not evicted; unloading
    them raises).
    """
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise TypeError(f"batch_adapters expects a list with one adapter name (or None) per row, got {names!r}")
    if len(names) == 0:
        raise ValueError("batch_adapters needs at least one row name")
    known = set(_configs(model)) | _layer_and_pool_adapters(model)
    rows: List[Optional[str]] = []
    for name in names:
        if name is None or name == BASE:
            rows.append(None)
        elif isinstance(name, str) and name in known:
            rows.append(name)
        else:
            raise ValueError(
                f"batch_adapters: unknown adapter {name!r}; the model has {sorted(known)} "
                f"(use None or {BASE!r} for the base model)"
            )
    layers = [m for _, m in model.named_modules() if hasattr(m, "row_adapters") and m is not model]
    if not layers:
        raise ValueError("batch_adapters: the model has no adapter layers (inject or load an adapter first)")
    training = [type(m).__name__ for m in layers if m.training]
    if model.training or training:
        raise RuntimeError(
            "batch_adapters (mixed adapters per row) runs in eval mode only, as PEFT's adapter_names=: "
            "call model.eval() first"
        )
    if any(getattr(m, "merged", False) for m in layers):
        raise RuntimeError("batch_adapters needs unmerged adapters: call fastpeft.unmerge(model) first")
    previous = [(m, m.row_adapters) for m in layers]
    with contextlib.ExitStack() as in_use:
        for pool in {id(p): p for p in _attached_pools(model)}.values():
            pool.touch(rows)  # their LRU order follows use, whoever runs the batch
            # The layers take the rows' slots once, at the start: no slot of the batch may
            # be freed or reused before it ends.
            in_use.enter_context(pool.in_use(rows))
        try:
            for m in layers:
                m.row_adapters = list(rows)
            yield model
        finally:
            for m, prev in previous:
                m.row_adapters = prev


# --------------------------------------------------------------------- counts


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


# --------------------------------------------------------------------- LoRA


def _lora_build(name: str, module: nn.Module, config: LoraConfig, adapter_name: str, backend: str) -> nn.Module:
    r, alpha = config.rank_and_alpha(name)
    init = config.init_lora_weights if config.init_lora_weights in LORA_INIT_CHOICES else True
    kwargs = dict(
        r=r,
        lora_alpha=alpha,
        lora_dropout=config.lora_dropout,
        use_rslora=config.use_rslora,
        adapter_name=adapter_name,
        init_lora_weights=init,
        lora_bias=config.lora_bias,
        backend=backend,
    )
    if isinstance(module, nn.Linear):
        # As PEFT: fan_in_fan_out=True on an nn.Linear is a config mistake it corrects.
        return FastLoRALinear.from_linear(module, **kwargs)
    # transformers Conv1D: always fan_in_fan_out, whatever the config says (as PEFT).
    return FastLoRALinear.from_conv1d(module, **kwargs)


def _lora_add(name: str, layer: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    r, alpha = config.rank_and_alpha(name)
    init = config.init_lora_weights if config.init_lora_weights in LORA_INIT_CHOICES else True
    layer.add_adapter(
        adapter_name, r, alpha, config.lora_dropout, config.use_rslora, init, lora_bias=config.lora_bias
    )


def _lora_param_map(model: nn.Module, adapter_name: str, config: LoraConfig) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    for name, layer in named_modules_of(model, (FastLoRALinear,)):
        if adapter_name not in layer.adapter_names:
            continue
        out[f"{name}.lora_A.weight"] = layer.lora_A_weights[adapter_name]
        out[f"{name}.lora_B.weight"] = layer.lora_B_weights[adapter_name]
        if adapter_name in layer.lora_B_biases:
            out[f"{name}.lora_B.bias"] = layer.lora_B_biases[adapter_name]
        if config.bias == "lora_only" and layer.bias is not None:
            out[f"{name}.base_layer.bias"] = layer.bias
    if config.bias == "all":
        out.update(_all_biases(model, adapter_name))
    return out


def _all_biases(model: nn.Module, adapter_name: str) -> Dict[str, torch.Tensor]:
    """Every bias of the model, keyed as PEFT saves them with ``bias="all"`` when this
    adapter is the model's only one: the layers it adapts hold theirs under
    ``base_layer``, its ``modules_to_save`` wrappers under ``original_module`` and
    ``modules_to_save`` (beside the copy's own keys, added by ``adapter_tensors``), and
    every other module under its own path, whether or not another adapter wraps it now.
    So the file does not depend on which other adapters happen to be loaded; the other
    spellings PEFT writes for those (``<path>.base_layer.bias``,
    ``<path>.original_module.bias``) load too (``fastpeft.checkpoint``).
    """
    out: Dict[str, torch.Tensor] = {}
    wrappers = named_modules_of(model, (ModulesToSaveWrapper,))
    layers = named_modules_of(model, _all_layer_types())
    for name, wrapper in wrappers:
        if adapter_name in wrapper.modules_to_save:
            # The original's biases and this adapter's copy's, with PEFT's removal of the
            # adapter name (only right before the last part: nested keys keep it).
            for key, tensor in _module_biases(wrapper.original_module).items():
                out[f"{name}.original_module.{key}"] = tensor
            for key, tensor in _module_biases(wrapper.modules_to_save[adapter_name]).items():
                out[_without_adapter_name(f"{name}.modules_to_save.{adapter_name}.{key}", adapter_name)] = tensor
        else:
            # Another adapter's wrapper: the module as if unwrapped (the original runs).
            for key, tensor in _module_biases(wrapper.original_module).items():
                out[f"{name}.{key}"] = tensor
    for name, layer in layers:
        if layer.bias is not None:
            own = isinstance(layer, FastLoRALinear) and adapter_name in layer.adapter_names
            out[f"{name}.base_layer.bias" if own else f"{name}.bias"] = layer.bias
    # Anything inside an adapter layer (other adapters' tensors) or a wrapper is done above.
    done = [n for n, _ in wrappers] + [n for n, _ in layers]
    for key, tensor in _module_biases(model).items():
        if not any(key.startswith(d + ".") for d in done):
            out[key] = tensor
    return out


def _module_biases(module: nn.Module) -> Dict[str, torch.Tensor]:
    """``{"<path>.bias": tensor}`` for each submodule's own ``bias`` (a parameter, or a
    persistent buffer), as PEFT picks them from the state dict (``"bias"`` at the root)."""
    out: Dict[str, torch.Tensor] = {}
    for name, sub in module.named_modules():
        bias = sub._parameters.get("bias")
        if bias is None and "bias" in sub._buffers and "bias" not in sub._non_persistent_buffers_set:
            bias = sub._buffers["bias"]
        if isinstance(bias, torch.Tensor):
            out[f"{name}.bias" if name else "bias"] = bias
    return out


def _lora_optional_map(model: nn.Module, adapter_name: str, config: LoraConfig) -> Dict[str, torch.Tensor]:
    """PEFT's ``bias="lora_only"`` saves (and trains) the base bias of every LoRA layer
    of the model, other adapters' included, as ``<path>.base_layer.bias``: such keys for
    modules this adapter does not adapt are accepted and loaded into that module's bias
    (what PEFT does when the model holds those other adapters too)."""
    if config.bias != "lora_only":
        return {}
    out: Dict[str, torch.Tensor] = {}
    inside = [n for n, _ in _adapter_layers(model)]  # other adapters' own modules are no targets
    for name, module in named_modules_of(model, linear_types() + (FastLoRALinear,)):
        if isinstance(module, FastLoRALinear) and adapter_name in module.adapter_names:
            continue
        if any(name.startswith(p + ".") for p in inside):
            continue
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            out[f"{name}.base_layer.bias"] = bias
    return out


def _without_adapter_name(key: str, adapter_name: str) -> str:
    """PEFT's rule for dropping the adapter name from a state-dict key."""
    if key.endswith(f".{adapter_name}"):
        return key[: -len(adapter_name) - 1]
    head, _, suffix = key.rpartition(".")
    if head.endswith(f".{adapter_name}"):
        head = head[: -len(adapter_name) - 1]
    return f"{head}.{suffix}"


def _lora_check_shapes(
    config: LoraConfig, source: Dict[str, torch.Tensor], targets: Dict[str, torch.Tensor], where: str
) -> None:
    """Name the real cause when a layer's ``lora_A``/``lora_B`` do not fit: A and B of
    different ranks (they do not belong together), or a rank other than the one the
    config (``r``, or its ``rank_pattern`` entry) gives this module. Sizes that differ
    from the layer's are left to the generic check (another base model)."""
    for key, dst_a in targets.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = key[: -len(".lora_A.weight")]
        key_b = f"{path}.lora_B.weight"
        A, B = source.get(key), source.get(key_b)
        if key_b not in targets or not isinstance(A, torch.Tensor) or not isinstance(B, torch.Tensor):
            continue
        if A.dim() != 2 or B.dim() != 2:
            raise ValueError(
                f"{where}: {path}: lora_A and lora_B must be 2-D, got shapes {tuple(A.shape)} and {tuple(B.shape)}"
            )
        rank_a, rank_b = A.shape[0], B.shape[1]
        if rank_a != rank_b:
            raise ValueError(
                f"{where}: {key} has shape {tuple(A.shape)} (rank {rank_a}) but {key_b} has shape "
                f"{tuple(B.shape)} (rank {rank_b}): the two tensors do not belong together (a damaged or "
                "mixed-up checkpoint)"
            )
        r = dst_a.shape[0]
        fits = A.shape[1] == dst_a.shape[1] and B.shape[0] == targets[key_b].shape[0]
        if rank_a != r and fits:
            pattern = pattern_key(config.rank_pattern, path)
            if pattern is not None:
                said = f"rank_pattern[{pattern!r}] = {r} for this module"
            elif config.rank_pattern:
                said = f"r={r} (no rank_pattern entry matches this module)"
            else:
                said = f"r={r}"
            raise ValueError(
                f"{where}: {path}: lora_A/lora_B have rank {rank_a} but adapter_config.json says {said}: "
                "the config and the weights do not belong together"
            )


def _lora_check(config: LoraConfig) -> List[str]:
    return config.unsupported()


register_method(
    MethodSpec(
        peft_type="LORA",
        config_cls=LoraConfig,
        layer_types=(FastLoRALinear,),
        target_types=linear_types(),
        build_layer=_lora_build,
        add_to_layer=_lora_add,
        param_map=_lora_param_map,
        optional_map=_lora_optional_map,
        check_shapes=_lora_check_shapes,
        check_config=_lora_check,
        default_targets=lambda model_type: (
            {"target_modules": targets} if (targets := default_lora_targets(model_type)) else None
        ),
    )
)
