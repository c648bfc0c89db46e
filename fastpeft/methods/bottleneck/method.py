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

    def add_to_layer(self, path: str, layer: BottleneckLinear, config: BottleneckConfig, adapter_name: str) -> None:
        layer.add_adapter(adapter_name, **_options(config))


BOTTLENECK = BottleneckMethod()
