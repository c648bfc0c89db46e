"""LoRA: ``config`` (LoraConfig), ``op`` (the fused op), ``multi_op`` (mixed-adapter op),
``stacks`` (slot stacks for mixed batches), ``layer`` (FastLoRALinear), ``method``."""
