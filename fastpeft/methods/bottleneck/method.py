"""Bottleneck adapters as a Method.

Checkpoint layout (no PEFT format exists; AdapterHub's parameter names within one
adapter), for each adapted output projection at ``<path>``, keys under
``base_model.model.``:

============================================  ==================
``<path>.adapter_down.0.weight``              ``(D, features)``
``<path>.adapter_down.0.bias``                ``(D,)``
``<path>.adapter_up.weight``                  ``(features, D)``
``<path>.adapter_up.bias``                    ``(features,)``
``<path>.adapter_norm_before.{weight,bias}``  ``(features,)``, only with ``ln_before``
``<path>.adapter_norm_after.{weight,bias}``   ``(features,)``, only with ``ln_after``
============================================  ==================

with ``adapter_config.json`` holding ``peft_type: "BOTTLENECK"`` and the
:class:`~fastpeft.methods.bottleneck.config.BottleneckConfig` fields: the default key
map of the Method protocol (each adapter module's state dict under its layer's path).
AdapterHub nests the same names under ``<path>.adapters.<adapter name>.``; fastpeft
leaves the name out so that a saved adapter loads under any name. Bottleneck adapters
are non-linear: they never merge.
"""
from __future__ import annotations

from typing import Any, Dict

import torch
import torch.nn as nn

from fastpeft.core.method import Method
from fastpeft.core.targets import linear_types
from fastpeft.methods.bottleneck.config import BottleneckConfig
from fastpeft.methods.bottleneck.layer import BottleneckLinear

__all__ = ["BottleneckMethod", "BOTTLENECK"]


def _options(config: BottleneckConfig) -> Dict[str, Any]:
    return dict(
        bottleneck_size=config.bottleneck_size,
        reduction_factor=config.reduction_factor,
        non_linearity=config.non_linearity,
        scaling=config.scaling,
        ln_before=config.ln_before,
        ln_after=config.ln_after,
        residual_before_ln=config.residual_before_ln,
        init_weights=config.init_weights,
    )


class BottleneckMethod(Method):
    peft_type = "BOTTLENECK"
    config_cls = BottleneckConfig
    layer_types = (BottleneckLinear,)
    target_types = linear_types()
    merges = False

    def build_layer(self, path: str, module: nn.Module, config: BottleneckConfig, adapter_name: str,
                    backend: str) -> nn.Module:
        if isinstance(module, nn.Linear):
            return BottleneckLinear.from_linear(module, adapter_name=adapter_name, backend=backend, **_options(config))
        return BottleneckLinear.from_conv1d(module, adapter_name=adapter_name, backend=backend, **_options(config))

    def check_checkpoint(self, config: BottleneckConfig, source: Dict[str, torch.Tensor],
                         targets: Dict[str, torch.Tensor], where: str) -> None:
        """A bottleneck width other than the config's (``bottleneck_size``, or the features
        over ``reduction_factor``), or a down- and up-projection of different widths: name
        that, not another base model."""
        for key, dst in targets.items():
            if not key.endswith(".adapter_down.0.weight"):
                continue
            path = key[: -len(".adapter_down.0.weight")]
            down, up = source.get(key), source.get(f"{path}.adapter_up.weight")
            if not isinstance(down, torch.Tensor) or not isinstance(up, torch.Tensor) or down.dim() != 2 or up.dim() != 2:
                continue
            if down.shape[0] != up.shape[1]:
                raise ValueError(
                    f"{where}: {key} has shape {tuple(down.shape)} (width {down.shape[0]}) but {path}.adapter_up.weight "
                    f"has shape {tuple(up.shape)} (width {up.shape[1]}): the two do not belong together"
                )
            width, features = dst.shape
            if down.shape[0] != width and down.shape[1] == features and up.shape[0] == features:
                said = (
                    f"bottleneck_size={config.bottleneck_size}" if config.bottleneck_size is not None
                    else f"reduction_factor={config.reduction_factor} (out_features {features} // {config.reduction_factor})"
                )
                raise ValueError(
                    f"{where}: {key} has shape {tuple(down.shape)}, a bottleneck width of {down.shape[0]}, but "
                    f"adapter_config.json gives {width} ({said}): the config and the weights do not belong together"
                )

    def add_to_layer(self, path: str, layer: BottleneckLinear, config: BottleneckConfig, adapter_name: str) -> None:
        layer.add_adapter(adapter_name, **_options(config))


BOTTLENECK = BottleneckMethod()
