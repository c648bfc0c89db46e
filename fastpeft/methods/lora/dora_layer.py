"""DoRA in ``FastLoRALinear``: the magnitude vector, its norms, forward, merge, mixed batches.

A DoRA adapter is a :class:`~fastpeft.methods.lora.layer.LoraAdapter` with a
``lora_magnitude_vector`` ``m`` (``(out,)``, PEFT's name), initialised to the row norms
``||W + s B A||`` of the weight it adapts. :class:`DoraLayerMixin` gives the layer what
DoRA adds to LoRA (the math is in ``fastpeft.methods.lora.dora``):

* the norms ``||W + s B A||`` (one kernel reading ``W`` once), kept in eval mode with the
  scale ``c = m / norm`` while ``W``, ``A``, ``B`` and ``m`` are unchanged (``TensorStamp``,
  as the layer's other caches), recomputed on every training forward;
* merge ``W' = c (W + s B A)`` (the norm taken on the weight it is merged into, kept on
  the adapter for the unmerge ``W = W' / c - s B A``, as PEFT keeps it);
* mixed batches: a ``(S, N)`` table of ``c`` per slot (ones for LoRA slots) that the
  mixed kernel applies in its epilogue.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastpeft.methods.lora.dora import dora_linear_unchecked, dora_scale, dora_weight_norm, multi_dora_linear
from fastpeft.methods.lora.multi_op import multi_lora_linear

__all__ = ["DoraLayerMixin", "DORA_CACHES"]

DORA_CACHES = ("_dora_norm_cache", "_dora_scale_cache", "_dora_table_cache")


class DoraLayerMixin:
    """DoRA for a LoRA layer (``FastLoRALinear``; see the module docstring)."""

    def is_dora(self, adapter_name: str) -> bool:
        return getattr(self.adapters[adapter_name], "lora_magnitude_vector", None) is not None

    def _init_magnitude(self, adapter_name: str) -> None:
        """``m = ||W + s B A||`` per output row, as PEFT initialises it."""
        adapter = self.adapters[adapter_name]
        with torch.no_grad():
            norm = self.dora_weight_norm(adapter_name)
            adapter.lora_magnitude_vector.copy_(norm.to(adapter.lora_magnitude_vector.dtype))

    def dora_weight_norm(self, adapter_name: str) -> torch.Tensor:
        """``||W + s B A||`` per output row of one DoRA adapter (fp32, detached); kept
        for the next forward in eval mode."""
        adapter = self.adapters[adapter_name]

        def build() -> torch.Tensor:
            return dora_weight_norm(self.base_weight(), adapter.lora_A, adapter.lora_B, adapter.scaling, self.backend)

        if self.training:
            return build()
        tensors = [self.weight, adapter.lora_A, adapter.lora_B]
        return self._kept("_dora_norm_cache", adapter_name, (adapter.scaling, self.fan_in_fan_out), tensors, build)

    def _dora_forward(
        self, adapter_name: str, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
        lora_A: torch.Tensor, lora_B: torch.Tensor, x_lora: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """The active DoRA adapter's forward (``weight``, ``bias``, ``lora_A``,
        ``lora_B``: as ``forward`` cast them under autocast)."""
        adapter = self.adapters[adapter_name]
        m = adapter.lora_magnitude_vector
        norm = self.dora_weight_norm(adapter_name)
        scale = None
        needs_grad = torch.is_grad_enabled() and m.requires_grad
        if not self.training and not needs_grad:
            tensors = [self.weight, adapter.lora_A, adapter.lora_B, m]
            scale = self._kept(
                "_dora_scale_cache", adapter_name, (adapter.scaling, self.fan_in_fan_out), tensors,
                lambda: dora_scale(m.detach(), norm).contiguous(),
            )
        return dora_linear_unchecked(
            x, weight, bias, lora_A, lora_B, adapter.scaling, m, norm, x_lora, self.backend, mag_scale=scale
        )

    # ---------------------------------------------------------------- merge

    def merge(self, adapter_name=None, **kwargs) -> None:
        """As ``AdapterLinear.merge``; a DoRA adapter keeps the norm it was merged with."""
        self.__dict__["_dora_pending"] = {}
        try:
            super().merge(adapter_name, **kwargs)
            for name, norm in self.__dict__["_dora_pending"].items():
                if name in self.merged_adapters:
                    self.adapters[name].dora_merge_norm = norm
        finally:
            self.__dict__.pop("_dora_pending", None)

    def _dora_fold(self, adapter_name: str, weight: torch.Tensor, sign: float) -> torch.Tensor:
        """``c (W + s B A)`` (merge, ``sign > 0``) or ``W / c - s B A`` (unmerge), in
        fp32, stored in the weight's dtype and layout, as a new tensor."""
        adapter = self.adapters[adapter_name]
        delta = adapter.delta_weight()
        full = weight.float().t() if self.fan_in_fan_out else weight.float()
        m = adapter.lora_magnitude_vector.detach().float()
        if sign > 0:
            norm = torch.linalg.vector_norm(full + delta, dim=1)
            pending = self.__dict__.get("_dora_pending")
            if pending is not None:
                pending[adapter_name] = norm
            new = (m / norm)[:, None] * (full + delta)
        else:
            norm = adapter.dora_merge_norm.float()
            new = full / (m / norm)[:, None] - delta
        return (new.t() if self.fan_in_fan_out else new).to(weight.dtype)

    # ---------------------------------------------------------------- mixed batches

    def _dora_table(self) -> Optional[torch.Tensor]:
        """``(S + 1, N)`` fp32: ``c_i = m_i / ||W + s_i B_i A_i||`` for each of this layer's
        adapters in stacking order (ones for LoRA adapters, and a last row of ones for
        rows with none); None when no adapter here is DoRA."""
        adapters = list(self.adapters.items())
        if not any(self.is_dora(name) for name, _ in adapters):
            return None

        def build() -> torch.Tensor:
            ones = torch.ones(self.out_features, device=self.weight.device, dtype=torch.float32)
            rows = [
                dora_scale(a.lora_magnitude_vector, self.dora_weight_norm(name)) if self.is_dora(name) else ones
                for name, a in adapters
            ]
            return torch.stack(rows + [ones])

        tensors = [self.weight] + [t for _, a in adapters for t in (a.lora_A, a.lora_B, a.lora_magnitude_vector)]
        key = (tuple(id(t) for t in tensors), tuple(a.scaling for _, a in adapters))
        return self._kept("_dora_table_cache", "table", key, tensors, build)

    def _dora_mixed(self, x, weight, bias, stacks, meta, row_slot: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """A mixed batch over this layer's own stacks with DoRA slots: the scales in the
        mixed kernel's epilogue; with autograd, the mixed LoRA op times each row's scale."""
        needs_grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in (x, table, stacks.lora_A, stacks.lora_B)
        )
        if not needs_grad:
            return multi_dora_linear(x, weight, bias, stacks.lora_A, stacks.lora_B, stacks.ranks, stacks.scalings,
                                     table[:-1], meta, self.backend)
        z = multi_lora_linear(x, weight, None, stacks.lora_A, stacks.lora_B, stacks.ranks, stacks.scalings, meta,
                              backend=self.backend, check=False)
        slot = row_slot.long()
        per_row = table[torch.where(slot < 0, table.shape[0] - 1, slot)]
        y = z * per_row.reshape(x.shape[0], *([1] * (x.dim() - 2)), self.out_features)
        if bias is not None:
            y = y + bias
        return y.to(x.dtype)

