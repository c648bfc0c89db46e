"""AdaLoRA as a Method: attachment, PEFT's checkpoint keys, what trains, training hooks.

Checkpoint keys (PEFT's, without ``base_model.model.``), per adapted layer at ``<path>``:
``<path>.lora_A (r, in)``, ``<path>.lora_E (r, 1)``, ``<path>.lora_B (out, r)`` (no
``.weight``). With a ``rank_pattern`` the saved tensors hold only the kept triplets (the
rows of A and E, the columns of B where the mask is True), as PEFT saves them; a layer is
built at that pruned rank when its config carries a ``rank_pattern`` (loading, or a
new adapter given one), with the scale of ``init_r`` (PEFT's ``ranknum``). Legacy
``<path>.ranknum`` keys of old PEFT files are accepted and ignored (``ranknum`` is always
``init_r``).
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from fastpeft.core import targets as core_targets
from fastpeft.core.method import Method
from fastpeft.core.targets import linear_types
from fastpeft.methods.adalora.config import AdaLoraConfig, layer_rank, pattern_path, pattern_paths
from fastpeft.methods.adalora.layer import AdaLoraLinear
from fastpeft.methods.adalora import allocator

__all__ = ["AdaLoraMethod", "ADALORA", "parse_adalora_key"]

# ``<path>.lora_A`` as PEFT saves it, or ``<path>.lora_A.<adapter>`` as a live PEFT
# model's state dict holds it (E and B alike); the legacy ``<path>.ranknum`` likewise.
_ADALORA_KEY = re.compile(r"^(?P<path>.+)\.(?P<part>lora_[AEB]|ranknum)(?:\.(?P<adapter>[^.]+))?$")


def parse_adalora_key(key: str) -> Optional[Tuple[str, str, Optional[str]]]:
    """``(layer path, "lora_A" / "lora_E" / "lora_B" / "ranknum", adapter-name segment or
    None)`` of an AdaLoRA checkpoint key (the key map read backwards; ``ranknum``: a
    legacy key, ignored on load); None for any other key."""
    m = _ADALORA_KEY.match(key)
    return None if m is None else (m.group("path"), m.group("part"), m.group("adapter"))


# AdaLoRA's default targets per ``model_type`` (a few of PEFT's); with peft installed its
# own table is used.
ADALORA_DEFAULTS: Dict[str, List[str]] = {
    **{t: ["q_proj", "v_proj"] for t in ("llama", "gemma", "gemma2", "gptj", "gpt_neo")},
    "gpt2": ["c_attn"], "bert": ["query", "value"], "t5": ["q", "k", "v", "o", "wi", "wo"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}


class AdaLoraMethod(Method):
    peft_type = "ADALORA"
    config_cls = AdaLoraConfig
    layer_types = (AdaLoraLinear,)
    target_types = linear_types()
    loss_in_forward = True  # the orthogonal regulariser joins outputs.loss, as PEFT's forward

    def check_config(self, config: AdaLoraConfig) -> List[str]:
        return config.unsupported()

    def default_targets(self, model_type: Optional[str]) -> Optional[Dict[str, Any]]:
        table = core_targets.peft_table("TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING")
        found = (table if table is not None else ADALORA_DEFAULTS).get(model_type) if model_type else None
        targets = list(found) if found else None
        return {"target_modules": targets} if targets else None

    # ---------------------------------------------------------------- attaching

    def find_targets(self, model: nn.Module, config: AdaLoraConfig, adapted_types: Tuple[type, ...]) -> List[str]:
        """PEFT's target rules; a ``rank_pattern`` must name only these modules, each with
        ``init_r`` entries (PEFT fails half-way on either; here nothing changes)."""
        paths = super().find_targets(model, config, adapted_types)
        found = set(paths)
        for key, mask in (config.rank_pattern or {}).items():
            path = pattern_path(key, "")
            if path not in found:
                raise ValueError(
                    f"rank_pattern names {key!r}, but the config's target_modules adapt no module {path!r} in "
                    "this model: the rank_pattern belongs to another model or config"
                )
            if len(mask) != config.init_r:
                raise ValueError(
                    f"rank_pattern[{key!r}] has {len(mask)} entries but init_r is {config.init_r}: "
                    "the mask must say, for each of the init_r triplets, whether it is kept"
                )
        return paths

    @staticmethod
    def _layer_args(path: str, config: AdaLoraConfig, adapter_name: str) -> Dict[str, Any]:
        return dict(r=layer_rank(config, adapter_name, path), lora_alpha=config.lora_alpha,
                    lora_dropout=config.lora_dropout,
                    init_lora_weights=bool(config.init_lora_weights), ranknum=float(config.init_r))

    def build_layer(self, path: str, module: nn.Module, config: AdaLoraConfig, adapter_name: str,
                    backend: str) -> nn.Module:
        return AdaLoraLinear.wrap(module, adapter_name=adapter_name, backend=backend,
                                  **self._layer_args(path, config, adapter_name))

    def add_to_layer(self, path: str, layer: AdaLoraLinear, config: AdaLoraConfig, adapter_name: str) -> None:
        layer.add_adapter(adapter_name, **self._layer_args(path, config, adapter_name))

    # ---------------------------------------------------------------- checkpoint

    def live_keys(self, model: nn.Module, adapter_name: str) -> Dict[str, torch.Tensor]:
        """The adapter's own tensors under PEFT's keys (``lora_A``, ``lora_E``, ``lora_B``)."""
        return Method.save_keys(self, model, adapter_name, None)

    def save_keys(self, model: nn.Module, adapter_name: str, config: AdaLoraConfig) -> Dict[str, torch.Tensor]:
        """As PEFT writes them: pruned to the ``rank_pattern``'s kept triplets where the
        layer still holds all ``init_r`` (a model trained with masking)."""
        out = self.live_keys(model, adapter_name)
        for path, mask in pattern_paths(config, adapter_name).items():
            A = out.get(f"{path}.lora_A")
            if A is None or A.shape[0] != len(mask) or sum(mask) == len(mask):
                continue
            keep = torch.tensor(mask, dtype=torch.bool, device=A.device)
            for key, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
                t = out[f"{path}.{key}"].detach()
                out[f"{path}.{key}"] = t[keep] if dim == 0 else t[:, keep]
        return out

    def load_keys(self, model: nn.Module, adapter_name: str, config: AdaLoraConfig) -> Dict[str, torch.Tensor]:
        return self.live_keys(model, adapter_name)

    def optional_keys(self, model: nn.Module, adapter_name: str, config: AdaLoraConfig) -> Dict[str, torch.Tensor]:
        """Older PEFT releases saved ``<path>.ranknum`` (always ``init_r``): accepted and
        dropped (copied into a throw-away tensor)."""
        return {f"{path}.ranknum": torch.zeros(1) for path, layer in self.layers(model)
                if adapter_name in layer.adapter_names}

    def check_checkpoint(
        self, config: AdaLoraConfig, source: Dict[str, torch.Tensor], targets: Dict[str, torch.Tensor], where: str
    ) -> None:
        """Name the cause when a layer's A, E, B do not fit each other or the config's
        rank (``init_r``, or the kept triplets of its ``rank_pattern`` entry)."""
        for key, dst in targets.items():
            if not key.endswith(".lora_A"):
                continue
            path = key[: -len(".lora_A")]
            A, E, B = (source.get(f"{path}.{k}") for k in ("lora_A", "lora_E", "lora_B"))
            if not all(isinstance(t, torch.Tensor) for t in (A, E, B)):
                continue  # missing keys: the generic check names them
            if A.dim() != 2 or B.dim() != 2 or tuple(E.shape) != (A.shape[0], 1) or B.shape[1] != A.shape[0]:
                raise ValueError(
                    f"{where}: {path}: lora_A {tuple(A.shape)}, lora_E {tuple(E.shape)} and lora_B "
                    f"{tuple(B.shape)} do not fit together (AdaLoRA needs A (r, in), E (r, 1), B (out, r)): "
                    "a damaged or mixed-up checkpoint"
                )
            r = dst.shape[0]
            if A.shape[0] != r and A.shape[1] == dst.shape[1] and B.shape[0] == targets[f"{path}.lora_B"].shape[0]:
                raise ValueError(
                    f"{where}: {path}: the tensors have rank {A.shape[0]} but adapter_config.json gives this "
                    f"module rank {r} (init_r={config.init_r}"
                    f"{', and its rank_pattern' if config.rank_pattern else ', no rank_pattern'}): "
                    "the config and the weights do not belong together"
                )

    # ---------------------------------------------------------------- training

    def trainable(self, model: nn.Module, adapter_name: str, config: AdaLoraConfig) -> List[nn.Parameter]:
        return [t for t in self.live_keys(model, adapter_name).values() if isinstance(t, nn.Parameter)]

    def extra_loss(self, model: nn.Module, adapter_name: str, config: AdaLoraConfig) -> Optional[torch.Tensor]:
        """PEFT's orthogonal regulariser, for the adapter being trained (not one loaded
        for inference, which PEFT's model has no trainable adapter for)."""
        if config.inference_mode:
            return None
        return allocator.orthogonal_regularization(model, adapter_name)

    def on_step(self, model: nn.Module, adapter_name: str, config: AdaLoraConfig, global_step: int) -> None:
        allocator.update_and_allocate(model, global_step, adapter_name)


ADALORA = AdaLoraMethod()
