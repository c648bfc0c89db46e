"""The engine's decode step over static buffers, replayed from a CUDA graph on a GPU.

A captured CUDA graph replays fixed kernels on fixed addresses: every tensor the decode
step reads or writes must stay where it was at capture. :class:`StaticDecode` therefore
holds the step's inputs in buffers that are updated in place between steps:

* ``ids`` ``(B, 1)``: the tokens just sampled; ``positions`` ``(B, 1)``: their positions;
* ``mask`` ``(B, 1, 1, L)``: the additive attention mask over the ``L`` cache slots (0
  where a row sees a slot, the dtype's minimum elsewhere): a 4-D mask is used by
  transformers as given, so no mask is built (nor the GPU synchronised) inside the step;
* ``cache``: a transformers ``StaticCache`` of ``L`` slots (its keys, values and length
  are device tensors updated in place);
* the adapters: the pool's slot stacks never move (loading copies into them) and the
  batch plan's metadata lives for the whole ``generate`` call.

Running example: prompts left-padded to ``P = 3`` tokens, ``T`` new tokens, ``L >= P + T``.
The prefill runs eagerly over slots ``0..2``; decode step ``t`` (``t >= 1``) writes the
token of step ``t - 1`` into ``ids``, advances ``positions`` by one, opens slot ``P + t - 1``
in ``mask`` and runs the step, which writes that slot of the cache. The first decode step
runs eagerly (it warms up and tunes every kernel); the step is then captured once and
replayed for every later token.

``capture`` turns the step (a function of no arguments) into its replay:
:func:`capture_cuda_graph` on a GPU; a test passes ``lambda step: step`` to run the same
static-buffer path on the CPU without a graph.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn as nn

__all__ = ["Capture", "StaticDecode", "capture_cuda_graph", "supports_static_decode"]

Capture = Callable[[Callable[[], None]], Callable[[], None]]
# Cache slots are allocated in multiples of this, so that generate calls of similar
# lengths reuse the same buffers.
SLOT_ROUND = 64


def capture_cuda_graph(step: Callable[[], None]) -> Callable[[], None]:
    """Capture ``step`` (already run once eagerly, so every kernel is compiled and tuned)
    into a CUDA graph; returns its replay."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def supports_static_decode(model: nn.Module) -> bool:
    """Whether transformers says the model runs with a static cache in one graph."""
    return bool(getattr(model, "_can_compile_fullgraph", False)) and hasattr(model, "config")


class StaticDecode:
    """Static decode buffers for ``batch`` rows and ``slots`` cache slots (see the module doc)."""

    def __init__(self, model: nn.Module, cache_kw: str, batch: int, slots: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        from transformers import StaticCache

        self.model, self.cache_kw = model, cache_kw
        self.batch, self.slots, self.dtype = batch, slots, dtype
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.mask = torch.zeros(batch, 1, 1, slots, dtype=dtype, device=device)
        self.cache = StaticCache(config=model.config, max_cache_len=slots)
        self.logits: Optional[torch.Tensor] = None

    @staticmethod
    def slots_for(length: int) -> int:
        return -(-length // SLOT_ROUND) * SLOT_ROUND

    def fits(self, batch: int, length: int, device: torch.device, dtype: torch.dtype) -> bool:
        return (self.batch == batch and self.slots == self.slots_for(length) and self.ids.device == device
                and self.dtype == dtype)

    def prefill(self, ids: torch.Tensor, mask2d: torch.Tensor) -> torch.Tensor:
        """Run the left-padded prompts ``ids`` (``(B, P)``, real tokens marked by ``mask2d``)
        into an empty cache; set the decode buffers; return the last position's logits."""
        self.cache.reset()
        B, P = ids.shape
        minimum = torch.finfo(self.dtype).min
        seen = torch.zeros(B, self.slots, dtype=torch.bool, device=ids.device)
        seen[:, :P] = mask2d.bool()
        causal = torch.ones(P, self.slots, dtype=torch.bool, device=ids.device).tril()
        allowed = causal[None] & seen[:, None, :]
        full = torch.zeros(B, 1, P, self.slots, dtype=self.dtype, device=ids.device)
        full.masked_fill_(~allowed[:, None], minimum)
        positions = (mask2d.cumsum(-1) - 1).clamp_min(0)
        out = self.model(input_ids=ids, attention_mask=full, position_ids=positions, use_cache=True,
                         **{self.cache_kw: self.cache})
        self.mask.fill_(minimum)
        self.mask[:, 0, 0, :P].masked_fill_(seen[:, :P], 0.0)
        self.positions.copy_(positions[:, -1:])
        self.next_slot = P
        return out.logits[:, -1, :]

    def advance(self, tokens: torch.Tensor) -> None:
        """Set the buffers for the step that feeds ``tokens`` (``(B,)``), in place."""
        self.ids.copy_(tokens[:, None])
        self.positions.add_(1)
        self.mask[:, 0, 0, self.next_slot].fill_(0.0)
        self.next_slot += 1

    def step(self) -> None:
        """One decode step over the buffers; the logits land in ``self.logits``."""
        out: Any = self.model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.positions,
                              use_cache=True, **{self.cache_kw: self.cache})
        self.logits = out.logits
