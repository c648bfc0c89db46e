"""Model-level (IA)^3 and bottleneck adapters: registration with ``fastpeft.model``.

Importing this module registers the methods ``"IA3"`` and ``"BOTTLENECK"``, so that
``fastpeft.inject``, ``load_adapter``, ``save_adapter``, ``merge``, ``set_adapter``,
``batch_adapters``... work for them exactly as for LoRA (the generic code lives in
``fastpeft.model`` and ``fastpeft.checkpoint``; this file only says how to build a
layer, add an adapter to one, and name the checkpoint tensors).

Checkpoint layouts (``adapter_model.safetensors``, keys under ``base_model.model.``,
no adapter name in the keys, as PEFT):

* (IA)^3, PEFT's own: ``<module path>.ia3_l``, shape ``(out, 1)`` (output scaling) or
  ``(1, in)`` (feed-forward, input scaling), e.g.
  ``base_model.model.model.layers.0.self_attn.k_proj.ia3_l``.
* Bottleneck (no PEFT format exists; AdapterHub's parameter names within one
  adapter): for each adapted output projection at ``<path>``

  ============================================  ==================
  ``<path>.adapter_down.0.weight``              ``(D, features)``
  ``<path>.adapter_down.0.bias``                ``(D,)``
  ``<path>.adapter_up.weight``                  ``(features, D)``
  ``<path>.adapter_up.bias``                    ``(features,)``
  ``<path>.adapter_norm_before.{weight,bias}``  ``(features,)``, only with ``ln_before``
  ``<path>.adapter_norm_after.{weight,bias}``   ``(features,)``, only with ``ln_after``
  ============================================  ==================

  with ``adapter_config.json`` holding ``peft_type: "BOTTLENECK"`` and the
  :class:`~fastpeft.config_adapters.BottleneckConfig` fields. AdapterHub nests the same
  names under ``<path>.adapters.<adapter name>.``; fastpeft leaves the name out so that
  a saved adapter loads under any name.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn

from fastpeft.bottleneck import BottleneckLinear
from fastpeft.config_adapters import BottleneckConfig, IA3Config
from fastpeft.ia3 import IA3Linear
from fastpeft.model import MethodSpec, register_method
from fastpeft.targets import default_ia3_targets, linear_types, named_modules_of

__all__ = ["IA3_METHOD", "BOTTLENECK_METHOD"]


# --------------------------------------------------------------------- (IA)^3


def _ia3_build(path: str, module: nn.Module, config: IA3Config, adapter_name: str, backend: str) -> nn.Module:
    kwargs = dict(
        is_feedforward=config.is_feedforward(path),
        adapter_name=adapter_name,
        init_ia3_weights=config.init_ia3_weights,
        backend=backend,
    )
    if isinstance(module, nn.Linear):
        return IA3Linear.from_linear(module, **kwargs)
    return IA3Linear.from_conv1d(module, **kwargs)  # transformers Conv1D: (in, out) layout


def _ia3_add(path: str, layer: IA3Linear, config: IA3Config, adapter_name: str) -> None:
    if config.is_feedforward(path) != layer.is_feedforward:
        kind = "feed-forward (input scaling)" if layer.is_feedforward else "output scaling"
        raise ValueError(
            f"module {path!r} already holds (IA)^3 adapters in {kind} mode; a second adapter must "
            "treat it the same way (check feedforward_modules)"
        )
    layer.add_adapter(adapter_name, config.init_ia3_weights)


def _ia3_params(model: nn.Module, adapter_name: str, config: IA3Config) -> Dict[str, torch.Tensor]:
    return {
        f"{path}.ia3_l": layer.ia3_l[adapter_name]
        for path, layer in named_modules_of(model, (IA3Linear,))
        if adapter_name in layer.ia3_l
    }


def _ia3_check_shapes(config: IA3Config, source, targets, where: str) -> None:
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


def _ia3_check(config: IA3Config):
    problems = []
    if config.layers_to_transform is not None or config.layers_pattern is not None:
        problems.append("PEFT's (IA)^3 has no layers_to_transform/layers_pattern; list the modules instead")
    return problems


IA3_METHOD = register_method(
    MethodSpec(
        peft_type="IA3",
        config_cls=IA3Config,
        layer_types=(IA3Linear,),
        target_types=linear_types(),
        build_layer=_ia3_build,
        add_to_layer=_ia3_add,
        param_map=_ia3_params,
        check_config=_ia3_check,
        check_shapes=_ia3_check_shapes,
        default_targets=lambda model_type: (
            {"target_modules": found[0], "feedforward_modules": found[1]}
            if (found := default_ia3_targets(model_type))
            else None
        ),
    )
)


# --------------------------------------------------------------------- bottleneck


def _bn_options(config: BottleneckConfig) -> dict:
    return dict(
        bottleneck_size=config.bottleneck_size,
        reduction_factor=config.reduction_factor,
        non_linearity=config.non_linearity,
        scaling=config.scaling,
        ln_before=config.ln_before,
        ln_after=config.ln_after,
        residual_before_ln=config.residual_before_ln,
    )


def _bn_build(path: str, module: nn.Module, config: BottleneckConfig, adapter_name: str, backend: str) -> nn.Module:
    kwargs = dict(_bn_options(config), adapter_name=adapter_name, init_weights=config.init_weights, backend=backend)
    if isinstance(module, nn.Linear):
        return BottleneckLinear.from_linear(module, **kwargs)
    return BottleneckLinear.from_conv1d(module, **kwargs)


def _bn_add(path: str, layer: BottleneckLinear, config: BottleneckConfig, adapter_name: str) -> None:
    layer.add_adapter(adapter_name, **_bn_options(config), init_weights=config.init_weights)


def _bn_params(model: nn.Module, adapter_name: str, config: BottleneckConfig) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    for path, layer in named_modules_of(model, (BottleneckLinear,)):
        if adapter_name in layer.adapters:
            for key, tensor in layer.adapters[adapter_name].state_dict(keep_vars=True).items():
                out[f"{path}.{key}"] = tensor
    return out


def _bn_check_shapes(config: BottleneckConfig, source, targets, where: str) -> None:
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


BOTTLENECK_METHOD = register_method(
    MethodSpec(
        peft_type="BOTTLENECK",
        config_cls=BottleneckConfig,
        layer_types=(BottleneckLinear,),
        target_types=linear_types(),
        build_layer=_bn_build,
        add_to_layer=_bn_add,
        param_map=_bn_params,
        check_shapes=_bn_check_shapes,
    )
)
