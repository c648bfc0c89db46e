"""LLaMA-Adapter (Zhang et al., 2023): adaption prompts with zero-initialised gated
attention in the top layers, PEFT's ``ADAPTION_PROMPT`` method (``config``: the config;
``op``: the math; ``layer``: the wrapped attention; ``method``: the Method).

No Triton kernel: the adapter attention (over ``adapter_len`` prompt tokens, gated and
added to the attention output) stays in PyTorch until a fused kernel is measured faster
on a GPU; none has been measured.
"""
