"""Triton kernels of fastpeft (installed as ``fastpeft.kernels``).

* ``runtime.py``: launch helpers (device guard, interpreter check, ``tl.dot`` precision,
  row views of ``x``, outputs);
* ``autotune.py``: tile configs, kernel variants and the one tuner every launcher uses;
* ``tiles.py``: ``@triton.jit`` helpers the kernels share (tile order, row offsets, the K
  loop, epilogues, activations);
* ``lora.py``, ``lora_tma.py``, ``ia3.py``, ``bottleneck.py``, ``multi_lora.py`` (with
  ``multi_lora_meta.py``), ``dora.py`` (DoRA's row norms): ``@triton.jit`` kernels and one
  typed launcher per op;
* ``reference.py``: the pure-PyTorch math of every fused op.

A kernel file imports only public names of the others.
"""
