"""Soft prompts: prompt tuning, P-tuning and prefix tuning (``config``: PEFT's config
classes; ``encoders``: the modules that make the virtual tokens; ``layer``: the hooked
layer that feeds them to the model; ``method``: the three Methods)."""
