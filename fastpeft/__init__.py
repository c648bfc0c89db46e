"""fastpeft: Triton-kernel accelerated parameter-efficient fine-tuning.

Fused kernels for the base matmul plus the low-rank update, drop-in modules, and
Hugging Face PEFT compatible model-level API.
"""
from fastpeft.lora import FastLoRALinear
from fastpeft.ops import lora_linear, resolve_backend

__version__ = "0.1.0"

__all__ = ["FastLoRALinear", "lora_linear", "resolve_backend", "__version__"]
