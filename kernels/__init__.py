"""Triton kernels of fastpeft (installed as ``fastpeft.kernels``).

Each kernel file holds ``@triton.jit`` kernels and one typed launcher per kernel;
``reference.py`` holds the pure-PyTorch math of every fused op.
"""
