"""Bottleneck adapters: ``config`` (BottleneckConfig), ``op`` (the fused op), ``layer``
(BottleneckAdapter, BottleneckLinear), ``method``."""
