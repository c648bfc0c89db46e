"""fastpeft: Triton-kernel accelerated parameter-efficient fine-tuning.

Fused kernels for the base matmul plus the low-rank update, drop-in modules, and
Hugging Face PEFT compatible model-level API.
"""
from fastpeft.lora import FastLoRALinear
from fastpeft.ops import lora_linear, resolve_backend
from fastpeft.config import AdapterConfig, LoraConfig
from fastpeft.model import (
    MethodSpec,
    active_adapter,
    adapter_names,
    batch_adapters,
    delete_adapter,
    inject,
    merge,
    print_trainable_parameters,
    register_method,
    set_adapter,
    trainable_parameters,
    unload,
    unmerge,
)
from fastpeft.checkpoint import load_adapter, save_adapter
# (IA)^3 and bottleneck adapters; importing adapters_model registers "IA3" and "BOTTLENECK".
from fastpeft.ia3 import IA3Linear
from fastpeft.bottleneck import BottleneckAdapter, BottleneckLinear
from fastpeft.config_adapters import BottleneckConfig, IA3Config
from fastpeft.ops_adapters import bottleneck_linear, ia3_linear
import fastpeft.adapters_model  # noqa: F401,E402
from fastpeft.ops_multi import multi_lora_linear
from fastpeft.serving import AdapterError, AdapterPool, GenerationOutput, PoolFullError, ServingEngine

__version__ = "0.1.0"

__all__ = ["FastLoRALinear", "lora_linear", "resolve_backend", "__version__"]
__all__ += [
    "AdapterConfig", "LoraConfig", "MethodSpec", "register_method", "inject", "load_adapter", "save_adapter",
    "set_adapter", "active_adapter", "adapter_names", "merge", "unmerge", "unload", "delete_adapter",
    "batch_adapters", "trainable_parameters", "print_trainable_parameters",
]
__all__ += [
    "IA3Linear", "IA3Config", "ia3_linear", "BottleneckAdapter", "BottleneckLinear", "BottleneckConfig",
    "bottleneck_linear",
]
__all__ += ["multi_lora_linear", "AdapterPool", "ServingEngine", "GenerationOutput", "AdapterError", "PoolFullError"]
