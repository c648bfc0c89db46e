"""The Method protocol, the registry of methods, and each model's record of its adapters.

A PEFT method (LoRA, (IA)^3, bottleneck adapters; a test's toy method) is one
:class:`Method` registered under its ``peft_type``. The core (inject, state, checkpoint,
batch plans) runs every method through it and imports none. A method says:

* its config class and ``peft_type`` (``config_cls``, ``peft_type``), which configs it
  refuses (``check_config``; ``check_new``: only for new adapters, e.g. an init it
  cannot make but whose saved weights load fine) and its default targets per
  architecture (``default_targets``);
* how it attaches (``attach``, an :class:`Attach`): its layer replaces a leaf module
  (SWAP), replaces a module it keeps inside as ``base_layer`` (WRAP: embeddings,
  attention), or joins the model as a child that registers forward hooks (HOOKS: soft
  prompts, anything at the model's forward). ``find_targets`` names the places,
  ``build_layer`` makes a layer for one, ``add_to_layer`` adds an adapter to a layer it
  made before; inject places layers all or nothing, with undo, for all three;
* its checkpoint key map both ways: ``save_keys`` (model tensors under the keys PEFT
  writes, without ``base_model.model.``) and ``load_keys`` (where each key of a
  checkpoint is copied; by default the same map; keys need not end in ``.weight``),
  ``optional_keys`` (tensors a checkpoint may hold beside those, loaded when present)
  and ``check_checkpoint`` (names the real cause of a mismatch it can explain: a
  config whose rank differs from the tensors', two tensors that do not fit each other);
* which parameters train (``trainable``), training hooks (``extra_loss``: a loss term
  to add, e.g. an orthogonality regulariser; ``on_step``: a per-step callback, e.g. a
  rank allocator; ``loss_in_forward``: the core adds ``extra_loss`` to the model's
  ``outputs.loss``), whether it merges (``merges``) and whether it takes part in mixed
  batches (``mixed_batches``).

:class:`MethodSpec` is the protocol's dataclass form: each field is the method of the
same name (a plain function), for a method that needs no class of its own.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from fastpeft.core.config import AdapterConfig, config_to_plain
from fastpeft.core.targets import find_targets, named_modules_of

__all__ = [
    "Attach",
    "Method",
    "MethodSpec",
    "register_method",
    "get_method",
    "registered_methods",
    "all_layer_types",
    "as_config",
    "adapter_configs",
    "method_of",
]


class Attach(enum.Enum):
    """How a method's layers join a model."""

    SWAP = "swap"    # replace a leaf module (nn.Linear, Conv1D), adopting its tensors
    WRAP = "wrap"    # replace a module, keeping it inside as ``base_layer``
    HOOKS = "hooks"  # add a child at ``hook_site`` that registers forward hooks


class Method:
    """Base class of the methods: the protocol, with the defaults most methods keep."""

    peft_type: str = ""
    config_cls: type = AdapterConfig
    attach: Attach = Attach.SWAP
    layer_types: Tuple[type, ...] = ()
    target_types: Tuple[type, ...] = ()  # SWAP/WRAP: what a target may be
    hook_site: str = ""  # HOOKS: the child's name on the model
    merges: bool = True
    mixed_batches: bool = True
    # The core adds ``extra_loss`` to ``outputs.loss`` whenever the model returns a loss
    # (a forward hook on the model, as PEFT's AdaLoraModel.forward does); otherwise the
    # training loop adds ``core.state.adapter_loss(model)`` itself.
    loss_in_forward: bool = False
    # What a checkpoint's keys start with: PEFT writes tuners' tensors (and
    # modules_to_save copies) under ``base_model.model.``; prompt learning writes its
    # ``prompt_embeddings`` bare (``bare_keys``) and its modules_to_save under ``base_model.``.
    key_prefix: str = "base_model.model."
    bare_keys: Tuple[str, ...] = ()

    # ---------------------------------------------------------------- configuration

    def check_config(self, config: AdapterConfig) -> List[str]:
        """Problems that refuse ``config`` (features this method cannot run)."""
        return []

    def check_new(self, config: AdapterConfig) -> List[str]:
        """Problems that refuse ``config`` for a new adapter only (``inject``; a saved
        adapter's weights replace whatever the init would make)."""
        return []

    def default_targets(self, model_type: Optional[str]) -> Optional[Dict[str, Any]]:
        """Config fields to fill when ``target_modules`` is unset (None: no default)."""
        return None

    # ---------------------------------------------------------------- attaching

    def find_targets(self, model: nn.Module, config: AdapterConfig, adapted_types: Tuple[type, ...]) -> List[str]:
        """Paths where the layers go: PEFT's ``target_modules`` rules (SWAP, WRAP), or
        the hook site (HOOKS)."""
        if self.attach is Attach.HOOKS:
            return [self.hook_site]
        return find_targets(
            model, config.target_modules, config.exclude_modules, config.layers_to_transform,
            config.layers_pattern, modules_to_save=config.modules_to_save, task_type=config.task_type,
            adapted_types=adapted_types,
        )

    def build_layer(self, path: str, module: nn.Module, config: AdapterConfig, adapter_name: str,
                    backend: str) -> nn.Module:
        """A new layer for the target at ``path`` (HOOKS: ``module`` is the model). Must
        not modify ``module`` or the model."""
        raise NotImplementedError

    def add_to_layer(self, path: str, layer: nn.Module, config: AdapterConfig, adapter_name: str) -> None:
        """Add an adapter to a layer of ``layer_types`` (undone by ``layer.delete_adapter``)."""
        raise NotImplementedError

    def layers(self, model: nn.Module) -> List[Tuple[str, nn.Module]]:
        """``(path, layer)`` of this method's layers in ``model``."""
        return named_modules_of(model, self.layer_types)

    # ---------------------------------------------------------------- checkpoint

    def layer_keys(self, layer: nn.Module, adapter_name: str) -> Dict[str, torch.Tensor]:
        """One layer's tensors of one adapter, keyed by what follows the layer's path in
        a checkpoint key. Default: the adapter module's state dict."""
        return dict(layer.adapters[adapter_name].state_dict(keep_vars=True))

    def save_keys(self, model: nn.Module, adapter_name: str, config: AdapterConfig) -> Dict[str, torch.Tensor]:
        """Every tensor of one adapter's checkpoint, keyed as PEFT writes it without
        ``base_model.model.`` (``modules_to_save`` keys are added by the core)."""
        out: Dict[str, torch.Tensor] = {}
        for path, layer in self.layers(model):
            if adapter_name in layer.adapter_names:
                out.update({f"{path}.{key}": t for key, t in self.layer_keys(layer, adapter_name).items()})
        return out

    def load_keys(self, model: nn.Module, adapter_name: str, config: AdapterConfig) -> Dict[str, torch.Tensor]:
        """Where each checkpoint key is copied on load (live model tensors)."""
        return self.save_keys(model, adapter_name, config)

    def optional_keys(self, model: nn.Module, adapter_name: str, config: AdapterConfig) -> Dict[str, torch.Tensor]:
        """Tensors a checkpoint *may* hold beside ``load_keys``' (extras PEFT writes in
        some cases), keyed and loaded the same way when present; never saved."""
        return {}

    def check_checkpoint(
        self, config: AdapterConfig, source: Dict[str, torch.Tensor], targets: Dict[str, torch.Tensor], where: str
    ) -> None:
        """Run on a checkpoint's tensors (``source``) against ``load_keys``' (``targets``),
        both keyed without the prefix, before the generic shape check: raise
        ``ValueError`` naming the real cause of a mismatch the method can explain, rather
        than the generic "other layer sizes"."""

    # ---------------------------------------------------------------- training

    def trainable(self, model: nn.Module, adapter_name: str, config: AdapterConfig) -> List[nn.Parameter]:
        """The parameters an adapter trains (``modules_to_save`` copies are added by the
        core). Default: the Parameters among its checkpoint tensors."""
        return [t for t in self.save_keys(model, adapter_name, config).values() if isinstance(t, nn.Parameter)]

    def extra_loss(self, model: nn.Module, adapter_name: str, config: AdapterConfig) -> Optional[torch.Tensor]:
        """A term to add to the training loss (None: nothing)."""
        return None

    def on_step(self, model: nn.Module, adapter_name: str, config: AdapterConfig, global_step: int) -> None:
        """Called once per optimizer step by ``fastpeft.core.state.adapter_step``."""


def _no_problems(config: AdapterConfig) -> List[str]:
    return []


def _no_defaults(model_type: Optional[str]) -> Optional[Dict[str, Any]]:
    return None


@dataclass(frozen=True)
class MethodSpec(Method):
    """A leaf-swapping method given as functions (the protocol's dataclass form).

    ``build_layer(path, module, config, adapter_name, backend)``, ``add_to_layer(path,
    layer, config, adapter_name)``, ``check_config(config)`` and
    ``default_targets(model_type)`` are the :class:`Method` methods of the same name;
    ``param_map(model, adapter_name, config)`` is the checkpoint key map (both ways).
    """

    # field(): required, though Method's class attributes and methods of these names
    # would otherwise become their defaults.
    peft_type: str = field()
    config_cls: type = field()
    layer_types: Tuple[type, ...] = field()
    target_types: Tuple[type, ...] = field()
    build_layer: Callable[..., nn.Module] = field()
    add_to_layer: Callable[..., None] = field()
    param_map: Callable[[nn.Module, str, AdapterConfig], Dict[str, torch.Tensor]] = field()
    check_config: Callable[[AdapterConfig], List[str]] = _no_problems
    default_targets: Callable[[Optional[str]], Optional[Dict[str, Any]]] = _no_defaults
    merges: bool = True
    mixed_batches: bool = True

    def save_keys(self, model: nn.Module, adapter_name: str, config: AdapterConfig) -> Dict[str, torch.Tensor]:
        return dict(self.param_map(model, adapter_name, config))


# --------------------------------------------------------------------- registry

_METHODS: Dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Register (or replace) the method for ``method.peft_type``; returns it."""
    if not isinstance(method, Method):
        raise TypeError(f"register_method expects a Method (or MethodSpec), got {type(method).__name__}")
    key = method.peft_type.upper()
    if getattr(method.config_cls, "peft_type", None) != key:
        raise ValueError(
            f"{method.config_cls.__name__}.peft_type is {getattr(method.config_cls, 'peft_type', None)!r}, "
            f"but the method registers {key!r}"
        )
    if method.attach is Attach.HOOKS and not method.hook_site:
        raise ValueError(f"method {key!r} attaches through hooks but names no hook_site")
    _METHODS[key] = method
    return method


def registered_methods() -> List[str]:
    return sorted(_METHODS)


def get_method(peft_type: Any) -> Method:
    """The registered method for a ``peft_type`` (string or enum)."""
    key = str(getattr(peft_type, "value", peft_type)).upper()
    if key not in _METHODS:
        raise ValueError(f"unsupported peft_type {peft_type!r}: fastpeft supports {registered_methods()}")
    return _METHODS[key]


def all_layer_types() -> Tuple[type, ...]:
    """The layer classes of every registered method."""
    return tuple({t: None for method in _METHODS.values() for t in method.layer_types})


def as_config(config: Any) -> AdapterConfig:
    """A fastpeft config from a fastpeft config, a ``peft`` config object, or a dict."""
    if isinstance(config, AdapterConfig):
        return config
    data = config_to_plain(config)
    if "peft_type" not in data or data["peft_type"] is None:
        raise ValueError("the config has no peft_type; expected e.g. peft_type='LORA'")
    return get_method(data["peft_type"]).config_cls.from_dict(data)


# --------------------------------------------------------------------- a model's adapters


def adapter_configs(model: nn.Module) -> Dict[str, AdapterConfig]:
    """``{adapter name: config}`` of the adapters injected into ``model``, in the order
    they were added (a plain attribute ``model.fastpeft_config``, not a parameter; empty
    when it has none). Reading never adds the attribute: only a successful injection does."""
    configs = model.__dict__.get("fastpeft_config")
    return {} if configs is None else configs


def method_of(config: AdapterConfig) -> Method:
    return get_method(config.peft_type)
