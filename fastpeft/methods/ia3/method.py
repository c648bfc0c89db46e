"""(IA)^3 as a Method.

Checkpoint keys, PEFT's own (without ``base_model.model.``): ``<module path>.ia3_l``,
shape ``(out, 1)`` (output scaling) or ``(1, in)`` (feed-forward, input scaling), e.g.
``model.layers.0.self_attn.k_proj.ia3_l``: the default key map of the Method protocol
(each adapter module's state dict under its layer's path).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from fastpeft.core.method import Method
from fastpeft.core import targets as core_targets
from fastpeft.core.targets import linear_types
from fastpeft.methods.ia3.config import IA3Config
from fastpeft.methods.ia3.layer import IA3Linear

__all__ = ["IA3Method", "IA3", "default_ia3_targets"]

# (IA)^3 defaults per transformers ``model_type``: (target_modules, feedforward_modules),
# as PEFT chooses them; with peft installed its own tables are used.
IA3_DEFAULTS: Dict[str, Tuple[List[str], List[str]]] = {
    **{t: (["k_proj", "v_proj", "down_proj"], ["down_proj"]) for t in ("llama", "mistral")},
    **{t: (["q_proj", "v_proj", "down_proj"], ["down_proj"]) for t in ("qwen2", "qwen3", "gemma", "gemma2")},
    "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "t5": (["k", "v", "wo"], ["wo"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
}


def default_ia3_targets(model_type: Optional[str]) -> Optional[Tuple[List[str], List[str]]]:
    """PEFT's default (IA)^3 ``(target_modules, feedforward_modules)`` for a ``model_type``."""
    if not model_type:
        return None
    targets = core_targets.peft_table("TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING")
    feedforward = core_targets.peft_table("TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING")
    if targets is not None and feedforward is not None:
        if model_type in targets and model_type in feedforward:
            return list(targets[model_type]), list(feedforward[model_type])
        return None
    found = IA3_DEFAULTS.get(model_type)
    return (list(found[0]), list(found[1])) if found else None


class IA3Method(Method):
    peft_type = "IA3"
    config_cls = IA3Config
    layer_types = (IA3Linear,)
    target_types = linear_types()

    def check_config(self, config: IA3Config) -> List[str]:
        if config.layers_to_transform is not None or config.layers_pattern is not None:
            return ["PEFT's (IA)^3 has no layers_to_transform/layers_pattern; list the modules instead"]
        return []

    def check_checkpoint(self, config: IA3Config, source: Dict[str, torch.Tensor],
                         targets: Dict[str, torch.Tensor], where: str) -> None:
        """An ``ia3_l`` shaped for the other scaling mode: name the config's
        ``feedforward_modules`` (not another base model) as the cause."""
        for key, dst in targets.items():
            src = source.get(key)
            if not isinstance(src, torch.Tensor) or tuple(src.shape) == tuple(dst.shape) or dst.dim() != 2:
                continue
            if tuple(src.shape) == tuple(dst.shape)[::-1]:
                path = key[: -len(".ia3_l")]
                said, other = (
                    ("feed-forward (input scaling, (1, in))", "output scaling")
                    if dst.shape[0] == 1 else ("output scaling ((out, 1))", "feed-forward (input scaling)")
                )
                raise ValueError(
                    f"{where}: {key} has shape {tuple(src.shape)}, made for {other}, but the config's "
                    f"feedforward_modules make {path} {said}: the config and the weights do not belong together"
                )

    def default_targets(self, model_type: Optional[str]) -> Optional[Dict[str, Any]]:
        found = default_ia3_targets(model_type)
        return {"target_modules": found[0], "feedforward_modules": found[1]} if found else None

    def build_layer(self, path: str, module: nn.Module, config: IA3Config, adapter_name: str,
                    backend: str) -> nn.Module:
        return IA3Linear.wrap(module, config.is_feedforward(path), adapter_name=adapter_name,
                              init_ia3_weights=config.init_ia3_weights, backend=backend)

    def add_to_layer(self, path: str, layer: IA3Linear, config: IA3Config, adapter_name: str) -> None:
        if config.is_feedforward(path) != layer.is_feedforward:
            kind = "feed-forward (input scaling)" if layer.is_feedforward else "output scaling"
            raise ValueError(
                f"module {path!r} already holds (IA)^3 adapters in {kind} mode; a second adapter must "
                "treat it the same way (check feedforward_modules)"
            )
        layer.add_adapter(adapter_name, config.init_ia3_weights)


IA3 = IA3Method()
