"""LoRA as a Method: how its layers attach, its checkpoint keys, what trains.

Checkpoint keys (PEFT's, without ``base_model.model.``), per adapted layer at ``<path>``:
``<path>.lora_A.weight (r, in)``, ``<path>.lora_B.weight (out, r)`` and, with
``lora_bias``, ``<path>.lora_B.bias (out,)``; with ``bias="lora_only"`` the adapted
layers' base biases (``<path>.base_layer.bias``), with ``bias="all"`` every bias of the
model, as PEFT saves them; with DoRA (``use_dora``) ``<path>.lora_magnitude_vector (out,)``
(PEFT's saved spelling; a live PEFT model holds it as
``lora_magnitude_vector.<adapter>.weight``). A MiCA adapter (``init_lora_weights="mica"``) trains only its
``lora_A``, as in PEFT; inits fastpeft cannot make load fine but are refused for new
adapters (``check_new``).
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from fastpeft.core.config import pattern_key
from fastpeft.core.method import Method, all_layer_types
from fastpeft.core.modules_to_save import ModulesToSaveWrapper
from fastpeft.core import targets as core_targets
from fastpeft.core.targets import linear_types, named_modules_of
from fastpeft.methods.lora.config import LORA_INIT_CHOICES, LoraConfig
from fastpeft.methods.lora.layer import FastLoRALinear

__all__ = ["LoraMethod", "LORA", "default_lora_targets", "parse_lora_key"]

# Default targets per transformers ``model_type`` when a config leaves ``target_modules``
# unset, as PEFT chooses them (tests/test_peft_config.py checks every entry against the
# installed peft). With peft installed, its own table is used, covering more models.
LORA_DEFAULTS: Dict[str, List[str]] = {
    **{t: ["q_proj", "v_proj"] for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "opt")},
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "t5": ["q", "v"],
    **{t: ["query_key_value"] for t in ("gpt_neox", "falcon", "bloom")},
}


def default_lora_targets(model_type: Optional[str]) -> Optional[List[str]]:
    """PEFT's default LoRA ``target_modules`` for a ``model_type`` (None: no default)."""
    table = core_targets.peft_table("TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING") or LORA_DEFAULTS
    found = table.get(model_type) if model_type else None
    return list(found) if found else None


class LoraMethod(Method):
    peft_type = "LORA"
    config_cls = LoraConfig
    layer_types = (FastLoRALinear,)
    target_types = linear_types()

    def check_config(self, config: LoraConfig) -> List[str]:
        return config.unsupported()

    def check_new(self, config: LoraConfig) -> List[str]:
        if config.init_lora_weights in LORA_INIT_CHOICES:
            return []
        return [
            f"init_lora_weights={config.init_lora_weights!r} is not supported for new adapters; "
            f"use one of {LORA_INIT_CHOICES} (saved adapters with any init load fine)"
        ]

    def default_targets(self, model_type: Optional[str]) -> Optional[Dict[str, Any]]:
        targets = default_lora_targets(model_type)
        return {"target_modules": targets} if targets else None

    @staticmethod
    def _layer_args(path: str, config: LoraConfig) -> Dict[str, Any]:
        r, alpha = config.rank_and_alpha(path)
        # An init fastpeft cannot make (a loaded adapter's): its weights replace these.
        init = config.init_lora_weights if config.init_lora_weights in LORA_INIT_CHOICES else True
        return dict(r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout, use_rslora=config.use_rslora,
                    init_lora_weights=init, lora_bias=config.lora_bias, use_dora=config.use_dora)

    def build_layer(self, path: str, module: nn.Module, config: LoraConfig, adapter_name: str,
                    backend: str) -> nn.Module:
        # A Conv1D is always fan_in_fan_out and an nn.Linear never, whatever the config
        # says (PEFT corrects that config mistake too).
        return FastLoRALinear.wrap(module, adapter_name=adapter_name, backend=backend, **self._layer_args(path, config))

    def add_to_layer(self, path: str, layer: FastLoRALinear, config: LoraConfig, adapter_name: str) -> None:
        layer.add_adapter(adapter_name, **self._layer_args(path, config))

    def layer_keys(self, layer: FastLoRALinear, adapter_name: str) -> Dict[str, torch.Tensor]:
        adapter = layer.adapters[adapter_name]
        keys = {"lora_A.weight": adapter.lora_A, "lora_B.weight": adapter.lora_B}
        if adapter.lora_bias is not None:
            keys["lora_B.bias"] = adapter.lora_bias
        if adapter.lora_magnitude_vector is not None:
            keys["lora_magnitude_vector"] = adapter.lora_magnitude_vector
        return keys

    def save_keys(self, model: nn.Module, adapter_name: str, config: LoraConfig) -> Dict[str, torch.Tensor]:
        out = super().save_keys(model, adapter_name, config)
        if config.bias == "lora_only":
            for path, layer in self.layers(model):
                if adapter_name in layer.adapter_names and layer.bias is not None:
                    out[f"{path}.base_layer.bias"] = layer.bias
        elif config.bias == "all":
            out.update(_all_biases(model, adapter_name))
        return out

    def optional_keys(self, model: nn.Module, adapter_name: str, config: LoraConfig) -> Dict[str, torch.Tensor]:
        """PEFT's ``bias="lora_only"`` saves (and trains) the base bias of every LoRA
        layer of the model, other adapters' included, as ``<path>.base_layer.bias``: such
        keys for modules this adapter does not adapt are accepted and loaded into that
        module's bias (what PEFT does when the model holds those other adapters too)."""
        if config.bias != "lora_only":
            return {}
        out: Dict[str, torch.Tensor] = {}
        inside = [n for n, _ in named_modules_of(model, all_layer_types() + (ModulesToSaveWrapper,))]
        for name, module in named_modules_of(model, linear_types() + (FastLoRALinear,)):
            if isinstance(module, FastLoRALinear) and adapter_name in module.adapter_names:
                continue
            if any(name.startswith(p + ".") for p in inside):  # other adapters' own modules are no targets
                continue
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                out[f"{name}.base_layer.bias"] = bias
        return out

    def check_checkpoint(
        self, config: LoraConfig, source: Dict[str, torch.Tensor], targets: Dict[str, torch.Tensor], where: str
    ) -> None:
        _check_ranks(config, source, targets, where)
        _check_magnitudes(config, source, targets, where)

    def trainable(self, model: nn.Module, adapter_name: str, config: LoraConfig) -> List[nn.Parameter]:
        params = super().trainable(model, adapter_name, config)
        if config.is_mica():  # PEFT trains only lora_A of a MiCA adapter
            frozen = {id(layer.adapters[adapter_name].lora_B) for _, layer in self.layers(model)
                      if adapter_name in layer.adapter_names}
            params = [p for p in params if id(p) not in frozen]
        return params


def _all_biases(model: nn.Module, adapter_name: str) -> Dict[str, torch.Tensor]:
    """Every bias of the model, keyed as PEFT saves them with ``bias="all"`` when this
    adapter is the model's only one: the layers it adapts hold theirs under
    ``base_layer``, its ``modules_to_save`` wrappers under ``original_module`` and
    ``modules_to_save`` (beside the copy's own keys, added by ``adapter_tensors``), and
    every other module under its own path, whether or not another adapter wraps it now.
    So the file does not depend on which other adapters happen to be loaded; the other
    spellings PEFT writes for those (``<path>.base_layer.bias``,
    ``<path>.original_module.bias``) load too (``fastpeft.core.checkpoint``).
    """
    out: Dict[str, torch.Tensor] = {}
    wrappers = named_modules_of(model, (ModulesToSaveWrapper,))
    layers = named_modules_of(model, all_layer_types())
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
        if getattr(layer, "bias", None) is not None:
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


def _check_ranks(
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


def _check_magnitudes(
    config: LoraConfig, source: Dict[str, torch.Tensor], targets: Dict[str, torch.Tensor], where: str
) -> None:
    """A DoRA magnitude vector must hold one entry per output feature of its layer; a
    checkpoint with magnitudes the config does not ask for (or the reverse) is named."""
    for key, dst in targets.items():
        if not key.endswith(".lora_magnitude_vector"):
            continue
        m = source.get(key)
        if isinstance(m, torch.Tensor) and tuple(m.shape) != tuple(dst.shape):
            raise ValueError(
                f"{where}: {key} (DoRA magnitude) has shape {tuple(m.shape)} but its layer has "
                f"{dst.shape[0]} output features, so it needs shape ({dst.shape[0]},): a damaged checkpoint "
                "or one made for another base model"
            )
    stray = [k for k in source if k.endswith(".lora_magnitude_vector") and k not in targets]
    if stray and not config.use_dora:
        raise ValueError(
            f"{where}: the checkpoint holds DoRA magnitude vectors ({stray[0]!r}, ...) but adapter_config.json "
            "says use_dora=False: the config and the weights do not belong together"
        )


def _without_adapter_name(key: str, adapter_name: str) -> str:
    """PEFT's rule for dropping the adapter name from a state-dict key."""
    if key.endswith(f".{adapter_name}"):
        return key[: -len(adapter_name) - 1]
    head, _, suffix = key.rpartition(".")
    if head.endswith(f".{adapter_name}"):
        head = head[: -len(adapter_name) - 1]
    return f"{head}.{suffix}"


LORA = LoraMethod()

# --------------------------------------------------------------------- reading keys back

# ``<path>.lora_A.weight`` as PEFT saves it, or ``<path>.lora_A.<adapter>.weight`` as a
# live PEFT model's state dict holds it; DoRA's ``<path>.lora_magnitude_vector`` (saved) or
# ``<path>.lora_magnitude_vector.<adapter>.weight`` (live).
_LORA_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_MAGNITUDE_KEY = re.compile(r"^(?P<path>.+)\.lora_magnitude_vector(?:\.(?P<adapter>[^.]+)\.weight)?$")


def parse_lora_key(key: str) -> Optional[Tuple[str, str, Optional[str]]]:
    """``(layer path, "A", "B" or "M" (DoRA's magnitude), adapter-name segment or None)``
    of a LoRA layer's checkpoint key (the key map read backwards); None for any other key."""
    m = _LORA_KEY.match(key)
    if m is not None:
        return m.group("path"), m.group("ab"), m.group("adapter")
    m = _MAGNITUDE_KEY.match(key)
    return None if m is None else (m.group("path"), "M", m.group("adapter"))
