"""The methods: one package each (``config``, ``op``, ``layer``, ``method``).

:data:`BUILTIN` lists the methods fastpeft ships; ``fastpeft/__init__.py`` registers
them with :func:`fastpeft.core.method.register_method`.
"""
from fastpeft.methods.adalora.method import ADALORA
from fastpeft.methods.bottleneck.method import BOTTLENECK
from fastpeft.methods.ia3.method import IA3
from fastpeft.methods.llama_adapter.method import ADAPTION_PROMPT
from fastpeft.methods.lora.method import LORA
from fastpeft.methods.prompt.method import P_TUNING, PREFIX_TUNING, PROMPT_TUNING

BUILTIN = (LORA, IA3, BOTTLENECK, ADALORA, ADAPTION_PROMPT, PROMPT_TUNING, P_TUNING, PREFIX_TUNING)

__all__ = ["BUILTIN"]
