"""AdaLoRA (Zhang et al., 2023): SVD-form LoRA adapters with rank allocation."""
