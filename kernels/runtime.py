"""Launch helpers shared by every launcher: where to launch, whether the interpreter runs
the kernels, the ``tl.dot`` precision, how the rows of ``x`` are addressed, and outputs.

Nothing here launches a kernel; every function is plain PyTorch on tensor metadata.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import triton
from triton.runtime.jit import JITFunction

__all__ = [
    "Rows",
    "as_2d",
    "capturing",
    "cdiv",
    "check_interpretable",
    "input_precision",
    "interpreter_active",
    "k_splits",
    "lora_in_fp32",
    "next_power_of_2",
    "on_device",
    "output_for",
    "rows_view",
    "sm_count",
]


# Host-side integer helpers. triton.cdiv and triton.next_power_of_2 are constexpr
# functions in triton 3.6: a call from Python unwraps its arguments and costs ~2 us, and a
# launch needs several; these are the same integer math.


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ``b`` (as ``triton.cdiv``)."""
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n``; 0 for ``n <= 0`` (as ``triton.next_power_of_2``)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def k_splits(K: int, split_k: int, block_k: int) -> Tuple[int, int]:
    """``(k_per_split, splits)``: K cut into at most ``split_k`` chunks of whole
    ``block_k`` tiles, none of them left without K columns."""
    k_per_split = cdiv(cdiv(K, max(1, split_k)), block_k) * block_k
    return k_per_split, cdiv(K, k_per_split)


def on_device(t: torch.Tensor):
    """Launch on ``t``'s GPU: Triton launches on the *current* CUDA device, which need not
    be the tensors' one (a model spread over GPUs with ``device_map``)."""
    if t.is_cuda and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


_SM_COUNT: Dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (cached by device index): the
    programs of a persistent grid, and what split-K tries to fill."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = _SM_COUNT.get(index)
    if count is None:
        count = _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return count


def capturing() -> bool:
    """True inside a CUDA-graph capture, where timing (it synchronizes) is forbidden."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@triton.jit
def _probe():
    """Never launched: whether ``@triton.jit`` made it a compiled or an interpreted function."""
    pass


def interpreter_active() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1``).

    Triton reads the flag when ``@triton.jit`` wraps a function (at import), so what counts
    is whether the kernels became interpreted functions; checking an object (``_probe``,
    wrapped at the same import as every kernel) also keeps launches free of environment
    lookups.
    """
    return not isinstance(_probe, JITFunction)


def check_interpretable(dtype: torch.dtype) -> None:
    """Raise when the kernels would compute inputs of ``dtype`` wrong: the Triton
    interpreter's ``tl.dot`` has no bfloat16 (it multiplies the raw bits), so under
    ``TRITON_INTERPRET=1`` a bf16 kernel returns garbage without any error."""
    if dtype == torch.bfloat16 and interpreter_active():
        raise RuntimeError(
            "the Triton kernels cannot run bfloat16 under the Triton interpreter (TRITON_INTERPRET=1): "
            "its tl.dot has no bf16 support and would return wrong numbers. Use backend='auto' or "
            "backend='torch' (the PyTorch reference), fp16/fp32 inputs, or a CUDA GPU without TRITON_INTERPRET"
        )


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for inputs of ``dtype``: fp32 follows PyTorch's own
    matmul setting (ieee under "highest", else tf32), as a drop-in for nn.Linear must."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def lora_in_fp32(x_dtype: torch.dtype, adapter_dtype: torch.dtype) -> bool:
    """Whether the LoRA branch keeps fp32 range for inputs of ``x_dtype``: adapters kept
    in another dtype than a 16-bit input (PEFT's fp32 adapters on a half model).

    PEFT runs that branch in the adapters' dtype (``lora_B(lora_A(x.to(A.dtype)))``), so
    its ``x A^T`` never rounds to fp16, where it would overflow (``|x A^T| > 65504``)
    although ``y`` is finite. The kernels then keep ``xa`` in fp32 and run the branch's
    dots in tf32 (fp16's 10 mantissa bits, fp32's range; see ``tiles.lora_dot``).
    """
    return x_dtype != torch.float32 and adapter_dtype != x_dtype


class Rows(NamedTuple):
    """The rows of an input ``x`` (``(..., K)``) as two row strides, without a copy.

    Row ``m`` (of ``M``, the leading dims flattened) starts at
    ``(m // m_inner) * stride_m0 + (m % m_inner) * stride_m1``; its elements are
    ``stride_k`` apart. ``x`` is the input itself, or an ``(M, K)`` copy when its leading
    dims need three or more strides.
    """

    x: torch.Tensor
    M: int
    m_inner: int
    stride_m0: int
    stride_m1: int
    stride_k: int


def rows_view(x: torch.Tensor) -> Rows:
    """Describe the rows of ``x`` as :class:`Rows`. Leading dims that merge without a copy
    are merged; only an input whose leading dims need three or more strides (a permuted
    4-D tensor, say) is copied, since no kernel here takes three."""
    K = x.shape[-1]
    if x.is_contiguous():  # the common case, without the general walk over dims below
        M = x.numel() // K if K else math.prod(x.shape[:-1])
        return Rows(x, M, max(M, 1), 0, K, 1)
    dims = [(s, st) for s, st in zip(x.shape[:-1], x.stride()[:-1]) if s != 1]
    merged: List[List[int]] = []
    for size, stride in dims:
        if merged and merged[-1][1] == stride * size:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    M = math.prod(x.shape[:-1])
    if len(merged) == 0:
        return Rows(x, M, max(M, 1), 0, 0, x.stride(-1))
    if len(merged) == 1:
        return Rows(x, M, merged[0][0], 0, merged[0][1], x.stride(-1))
    if len(merged) == 2:
        return Rows(x, M, merged[1][0], merged[0][1], merged[1][1], x.stride(-1))
    x2 = x.reshape(M, K)
    return Rows(x2, M, max(M, 1), 0, x2.stride(0), x2.stride(1))


def as_2d(rows: Rows, K: int) -> Optional[torch.Tensor]:
    """``x`` as an ``(M, K)`` view with one row stride, or None when its rows need two."""
    if rows.m_inner != rows.M and rows.stride_m0 != rows.m_inner * rows.stride_m1:
        return None
    # M <= 1 has no row stride of its own: any stride addresses the one row.
    row_stride = rows.stride_m1 if rows.M > 1 else K * rows.stride_k
    return torch.as_strided(rows.x, (rows.M, K), (row_stride, rows.stride_k))


def output_for(x: torch.Tensor, N: int, out: Optional[torch.Tensor]) -> torch.Tensor:
    """The output of a launcher: ``out`` once checked (contiguous, ``x``'s dtype, shape
    ``(..., N)`` over ``x``'s leading dims), or a new such tensor."""
    shape = (*x.shape[:-1], N)
    if out is None:
        return torch.empty(shape, device=x.device, dtype=x.dtype)
    if out.shape != shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {shape}")
    return out
