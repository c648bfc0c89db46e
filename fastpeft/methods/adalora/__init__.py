"""AdaLoRA (Zhang et al., 2023): SVD-form LoRA adapters with rank allocation.

``fastpeft.serving`` serves AdaLoRA adapters from the ``AdapterPool`` with this package's
rules (``config.layer_rank``, ``config.adalora_scale``, ``layer.fold_E``,
``method.parse_adalora_key``): each layer a LoRA adapter of its current rank."""
