"""``AdaLoraLinear``: a drop-in ``nn.Linear`` with AdaLoRA adapters (PEFT's ``SVDLinear``).

Each adapter is an SVD-form update: ``P = lora_B (out, r)``, ``Λ = lora_E (r, 1)``, ``Q
= lora_A (r, in)``, and the layer computes

    y = x W^T + b + (dropout(x) (Q ∘ Λ)^T P^T) * scaling / (ranknum + 1e-5)

with ``scaling = lora_alpha`` (the rank when ``lora_alpha <= 0``) and ``ranknum`` the
rank the adapter was made with (``init_r``; PEFT keeps it through pruning, so the scale
of a pruned adapter stays the trained one). That is a LoRA update with ``A = Q ∘ Λ`` and
``s = scaling / (ranknum + 1e-5)``: the forward is one call of the fused LoRA op
(``fastpeft.methods.lora.op``); ``Q ∘ Λ`` is a tiny ``(r, in)`` product outside it, so
autograd reaches ``lora_A`` and ``lora_E`` through the op's ``lora_A`` gradient.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastpeft.core.dispatch import autocast_cast, autocast_dtype, check_linear_input
from fastpeft.core.batch import BatchPlan, check_rows
from fastpeft.core.linear import AdapterLinear
from fastpeft.methods.adalora.config import RANKNUM_EPS, adalora_scale, adalora_scaling
from fastpeft.methods.lora.multi_op import build_meta, multi_lora_linear, row_slots_for_tokens
from fastpeft.methods.lora.op import lora_linear_unchecked

__all__ = ["AdaLoraAdapter", "AdaLoraLinear", "AdaLoraRows", "RANKNUM_EPS", "fold_E"]


def fold_E(lora_A: torch.Tensor, lora_E: torch.Tensor) -> torch.Tensor:
    """``A ∘ E``: ``A (r, in)`` with each row scaled by its singular value ``E (r, 1)``,
    the ``A`` of the equivalent LoRA adapter (differentiable)."""
    return lora_A * lora_E


class AdaLoraAdapter(nn.Module):
    """One AdaLoRA adapter: ``lora_A (r, in)``, ``lora_E (r, 1)``, ``lora_B (out, r)``.

    ``init_lora_weights`` True: ``E = 0``, ``A, B ~ N(0, 0.02)`` (a no-op adapter, as
    PEFT); False: all three ``~ N(0, 1)`` (PEFT's ``randn``, for tests). ``r`` may be 0
    (a layer pruned away, as PEFT allows). ``ranknum``: the rank the scale divides by.
    """

    def __init__(
        self, in_features: int, out_features: int, r: int, lora_alpha: float, lora_dropout: float = 0.0,
        init_lora_weights: bool = True, ranknum: Optional[float] = None, device=None, dtype=None,
    ) -> None:
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"AdaLoRA rank must be a non-negative integer, got {r!r}")
        self.r, self.lora_alpha = r, lora_alpha
        self.scaling = adalora_scaling(r, lora_alpha)
        self.ranknum = float(r if ranknum is None else ranknum)
        factory = {"device": device, "dtype": dtype}
        A = torch.randn(r, in_features, **factory)
        E = torch.randn(r, 1, **factory)
        B = torch.randn(out_features, r, **factory)
        if init_lora_weights:
            nn.init.zeros_(E)
            nn.init.normal_(A, mean=0.0, std=0.02)
            nn.init.normal_(B, mean=0.0, std=0.02)
        self.lora_A = nn.Parameter(A)
        self.lora_E = nn.Parameter(E)
        self.lora_B = nn.Parameter(B)
        self.dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()

    @property
    def scale(self) -> float:
        """The factor of the low-rank term: ``scaling / (ranknum + 1e-5)``."""
        return adalora_scale(self.scaling, self.ranknum)

    def folded_A(self) -> torch.Tensor:
        """``lora_A ∘ lora_E`` (differentiable): the ``A`` of the equivalent LoRA adapter."""
        return fold_E(self.lora_A, self.lora_E)

    def delta_weight(self) -> torch.Tensor:
        """``B (A ∘ E) * scaling / (ranknum + 1e-5)`` in fp32, shape ``(out, in)``."""
        A, E, B = (t.detach().float() for t in (self.lora_A, self.lora_E, self.lora_B))
        return (B @ fold_E(A, E)) * self.scaling / (self.ranknum + RANKNUM_EPS)

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, ranknum={self.ranknum}"


@dataclass(frozen=True)
class AdaLoraRows:
    """A mixed batch's rows for one AdaLoRA layer: ``row_slot`` ``(B,)`` int32, each
    batch row's position among the layer's adapters (-1: base only; None when no row
    uses an adapter here), for the fused mixed op."""

    num_rows: int
    row_slot: Optional[torch.Tensor]


class AdaLoraLinear(AdapterLinear):
    """Linear layer with AdaLoRA adapters on the fused LoRA op (see the module docstring).

    A mixed batch (eval) is one launch of LoRA's mixed-adapter op: each adapter is a LoRA
    adapter of its current rank with ``A = Q ∘ Λ`` and ``s = scaling / (ranknum + 1e-5)``,
    stacked in slots (eval only, as PEFT's ``adapter_names=``).

    Built with :meth:`wrap` from an ``nn.Linear`` or a GPT-2 ``Conv1D`` (shares its
    tensors). ``backend``: ``"auto"``, ``"triton"`` or ``"torch"``.
    """

    @classmethod
    def wrap(cls, module: nn.Module, *, adapter_name: str = "default", backend: str = "auto",
             **adapter_args) -> "AdaLoraLinear":
        parts, fan_in_fan_out, base_cls = cls.base_parts(module)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init_base(*parts, fan_in_fan_out=fan_in_fan_out, base_cls=base_cls, backend=backend)
        layer.add_adapter(adapter_name, **adapter_args)
        return layer

    def add_adapter(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    init_lora_weights: bool = True, ranknum: Optional[float] = None) -> None:
        """Add an adapter (active if none is); see :class:`AdaLoraAdapter`."""
        self._check_new_name(adapter_name)
        adapter = AdaLoraAdapter(
            self.in_features, self.out_features, r, lora_alpha, lora_dropout, init_lora_weights, ranknum,
            device=self.weight.device, dtype=self.weight.dtype,
        )
        self._added(adapter_name, adapter)

    # ---------------------------------------------------------------- merge

    def _fold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor], sign: float = 1.0
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``W + sign * delta`` (fp32 math, stored in the base dtype, a new tensor)."""
        delta = self.adapters[adapter_name].delta_weight()
        if self.fan_in_fan_out:
            delta = delta.t()
        return (weight.float() + sign * delta).to(weight.dtype), bias

    def _undo_merge(self, adapter_name: str) -> None:
        self._write_base(*self._fold(adapter_name, self.weight.detach(), self.bias, -1.0))

    # ---------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.base_weight(), self.bias
        amp = autocast_dtype(x.device) if isinstance(x, torch.Tensor) else None
        if amp is not None:  # torch.autocast: run in its dtype, as nn.Linear does
            x, weight, bias = autocast_cast(amp, x, weight, bias)
        check_linear_input(x, weight, type(self).__name__)
        if self.__dict__.get("_row_plan") is not None:
            return self._mixed_forward(x)
        name = self.active_adapter
        if name is None or self.merged_adapters:
            return F.linear(x, weight, bias)
        return self._run(x, name, weight, bias, amp)

    def _run(self, x: torch.Tensor, name: str, weight: torch.Tensor, bias: Optional[torch.Tensor],
             amp: Optional[torch.dtype]) -> torch.Tensor:
        """One adapter over all rows of ``x``: the fused LoRA op with ``A = Q ∘ Λ``."""
        adapter = self.adapters[name]
        if adapter.r == 0:  # pruned to nothing: the base alone
            return F.linear(x, weight, bias)
        x_lora = adapter.dropout(x) if self.training and isinstance(adapter.dropout, nn.Dropout) else None
        lora_A, lora_B = adapter.folded_A(), adapter.lora_B
        if amp is not None:
            lora_A, lora_B = autocast_cast(amp, lora_A, lora_B)
        return lora_linear_unchecked(x, weight, bias, lora_A, lora_B, adapter.scale, x_lora, self.backend)

    _CACHES = ("_stack_cache",)

    def _make_row_plan(self, plan: BatchPlan) -> AdaLoraRows:
        index = {name: i for i, name in enumerate(self.adapters)}
        slots = [index.get(name, -1) for name in plan.rows]
        row_slot = None
        if any(s >= 0 for s in slots):
            row_slot = torch.tensor(slots, dtype=torch.int32, device=self.weight.device)
        return AdaLoraRows(len(plan.rows), row_slot)

    def _mixed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each batch row through its own adapter (``None`` or a name this layer does not
        hold: the base only): one fused mixed-op launch (inference only)."""
        if self.training:
            raise RuntimeError(
                "mixed-adapter batches (fastpeft.batch_adapters) run in eval mode only, as PEFT's "
                "adapter_names=: call model.eval() first"
            )
        if self.merged_adapters:
            raise RuntimeError("mixed-adapter batches need unmerged adapters: call fastpeft.unmerge(model) first")
        plan: AdaLoraRows = self.__dict__["_row_plan"]
        check_rows(x, plan.num_rows)
        weight, bias = self.base_weight(), self.bias
        amp = autocast_dtype(x.device)
        if amp is not None:
            x, weight, bias = autocast_cast(amp, x, weight, bias)
        if plan.row_slot is None:
            return F.linear(x, weight, bias)
        lora_A, lora_B, ranks, scalings = self._stacks(x.device)
        meta = build_meta(row_slots_for_tokens(plan.row_slot, x), lora_A.shape[0], check=False)
        return multi_lora_linear(x, weight, bias, lora_A, lora_B, ranks, scalings, meta,
                                 backend=self.backend, check=False)

    def _stacks(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The adapters as LoRA slot stacks (``A ∘ E`` folded, padded to the largest
        rank; each slot's scale), kept while their tensors are unchanged."""
        adapters: List[AdaLoraAdapter] = list(self.adapters.values())
        tensors = [t for a in adapters for t in (a.lora_A, a.lora_E, a.lora_B)]
        key = (tuple(id(t) for t in tensors), tuple(a.scale for a in adapters))

        def build() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
            R = max(1, max(a.r for a in adapters))
            # With autograd on when it is on (a backward through the mixed op reaches A, E,
            # B; a stack holding a graph is never kept), autocast off (own dtypes), as LoRA's.
            with torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else nullcontext():
                A = torch.stack([F.pad(a.folded_A(), (0, 0, 0, R - a.r)) for a in adapters])
                B = torch.stack([F.pad(a.lora_B, (0, R - a.r)) for a in adapters])
            ranks = torch.tensor([a.r for a in adapters], dtype=torch.int32, device=device)
            scalings = torch.tensor([a.scale for a in adapters], dtype=torch.float32, device=device)
            return A, B, ranks, scalings

        return self._kept("_stack_cache", device, key, tensors, build)

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={a.r})" for n, a in self.adapters.items())
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"fan_in_fan_out={self.fan_in_fan_out}, adapters=[{adapters}], active={self.active_adapter!r}, "
            f"backend={self.backend!r}"
        )
