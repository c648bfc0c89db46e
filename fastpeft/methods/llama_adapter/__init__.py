"""LLaMA-Adapter (Zhang et al., 2023): adaption prompts with zero-initialised gated
attention in the top layers, PEFT's ``ADAPTION_PROMPT`` method."""
