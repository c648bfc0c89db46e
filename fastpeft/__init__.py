"""fastpeft: Triton-kernel accelerated parameter-efficient fine-tuning.

Fused kernels for the base matmul plus the low-rank update, drop-in modules, and
Hugging Face PEFT compatible model-level API. Layers: ``fastpeft.core`` (knows no
method) -> ``fastpeft.methods.<method>`` -> ``fastpeft.serving`` and this API.
"""
from fastpeft.core.checkpoint import load_adapter, save_adapter
from fastpeft.core.config import AdapterConfig
from fastpeft.core.dispatch import resolve_backend
from fastpeft.core.inject import inject
from fastpeft.core.method import MethodSpec, register_method
from fastpeft.core.state import (
    active_adapter,
    adapter_names,
    batch_adapters,
    delete_adapter,
    merge,
    print_trainable_parameters,
    set_adapter,
    trainable_parameters,
    unload,
    unmerge,
)
from fastpeft.methods import BUILTIN
from fastpeft.methods.adalora.allocator import orthogonal_regularization, update_and_allocate
from fastpeft.methods.adalora.config import AdaLoraConfig
from fastpeft.methods.adalora.layer import AdaLoraLinear
from fastpeft.methods.bottleneck.config import BottleneckConfig
from fastpeft.methods.bottleneck.layer import BottleneckAdapter, BottleneckLinear
from fastpeft.methods.bottleneck.op import bottleneck_linear
from fastpeft.methods.ia3.config import IA3Config
from fastpeft.methods.ia3.layer import IA3Linear
from fastpeft.methods.ia3.op import ia3_linear
from fastpeft.methods.llama_adapter.config import AdaptionPromptConfig
from fastpeft.methods.llama_adapter.layer import AdaptedAttention
from fastpeft.methods.lora.config import LoraConfig
from fastpeft.methods.lora.layer import FastLoRALinear
from fastpeft.methods.lora.multi_op import multi_lora_linear
from fastpeft.methods.lora.op import lora_linear
from fastpeft.methods.prompt.config import (
    PrefixTuningConfig, PromptEncoderConfig, PromptEncoderReparameterizationType, PromptTuningConfig, PromptTuningInit,
)
from fastpeft.peft_model import FastPeftModel, get_peft_model
from fastpeft.serving.engine import GenerationOutput, ServingEngine
from fastpeft.serving.pool import AdapterError, AdapterPool, PoolFullError
from fastpeft.tuning import pretune

for _method in BUILTIN:
    register_method(_method)
del _method

__version__ = "0.1.0"

__all__ = ["FastLoRALinear", "lora_linear", "resolve_backend", "pretune", "__version__"]
__all__ += [
    "AdapterConfig", "LoraConfig", "MethodSpec", "register_method", "inject", "load_adapter", "save_adapter",
    "set_adapter", "active_adapter", "adapter_names", "merge", "unmerge", "unload", "delete_adapter",
    "batch_adapters", "trainable_parameters", "print_trainable_parameters",
]
__all__ += [
    "IA3Linear", "IA3Config", "ia3_linear", "BottleneckAdapter", "BottleneckLinear", "BottleneckConfig",
    "bottleneck_linear",
]
__all__ += ["AdaptionPromptConfig", "AdaptedAttention"]
__all__ += [
    "PromptTuningConfig", "PromptTuningInit", "PromptEncoderConfig", "PromptEncoderReparameterizationType",
    "PrefixTuningConfig",
]
__all__ += ["multi_lora_linear", "AdapterPool", "ServingEngine", "GenerationOutput", "AdapterError", "PoolFullError"]
__all__ += ["FastPeftModel", "get_peft_model"]
__all__ += ["AdaLoraConfig", "AdaLoraLinear", "update_and_allocate", "orthogonal_regularization"]
