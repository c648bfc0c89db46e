"""``modules_to_save``: modules trained in full per adapter, as PEFT's wrapper.

A module named in a config's ``modules_to_save`` (a task head, an embedding) is replaced
by a :class:`ModulesToSaveWrapper` holding the frozen original and one trainable copy per
adapter; the copy of the active adapter runs. State-dict keys are PEFT's
(``<path>.original_module.*``, ``<path>.modules_to_save.<adapter>.*``).
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from fastpeft.core.layer import PlanReader

__all__ = ["ModulesToSaveWrapper"]


class ModulesToSaveWrapper(PlanReader, nn.Module):
    """A module trained in full per adapter (PEFT's ``modules_to_save``).

    ``original_module`` is the frozen original; ``modules_to_save[name]`` a trainable copy
    per adapter (state-dict keys as PEFT's wrapper). The active adapter's copy runs; with
    a batch plan (``batch_adapters``) each batch row runs through its own adapter's copy.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: Optional[str] = None

    @property
    def adapter_names(self) -> List[str]:
        return list(self.modules_to_save.keys())

    def add_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            raise ValueError(f"adapter {adapter_name!r} already exists in this module")
        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[adapter_name] = clone

    def set_adapter(self, adapter_name: Optional[str]) -> None:
        self.active_adapter = adapter_name if adapter_name in self.modules_to_save else None

    def delete_adapter(self, adapter_name: str) -> None:
        del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    # No merging: the copy simply replaces the original.
    merged = False

    def merge(
        self, adapter_name: Optional[str] = None, *, safe_merge: bool = False,
        adapter_names: Optional[Sequence[str]] = None,
    ) -> None:
        return None

    def check_merge(
        self, adapter_name: Optional[str] = None, *, adapter_names: Optional[Sequence[str]] = None,
        check_finite: bool = True,
    ) -> None:
        return None

    def unmerge(self, adapter_name: Optional[str] = None) -> None:
        return None

    def attach(self, model: nn.Module) -> None:
        """Placed in a model: nothing to register (the layer protocol of core.layer)."""

    def detach(self) -> None:
        """Leaving a model: nothing to remove."""

    def to_base_module(self) -> nn.Module:
        if self.active_adapter is not None:
            return self.modules_to_save[self.active_adapter]
        return self.original_module

    def active_module(self) -> nn.Module:
        """The module that runs now: the active adapter's copy, else the original."""
        return self.modules_to_save[self.active_adapter] if self.active_adapter else self.original_module

    def __getattr__(self, name: str):
        # Attributes the model reads from the wrapped module (``lm_head.weight``, ...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save", "active_adapter"):
                raise
            return getattr(self.active_module(), name)

    def forward(self, *args, **kwargs):
        # Any signature: HF calls some modules (attention, say) with keywords only.
        plan = self.batch_plan
        if plan is None:
            return self.active_module()(*args, **kwargs)
        if not args:
            raise ValueError(
                "batch_adapters: a modules_to_save module runs per row only when its input is passed "
                "positionally (as PEFT's adapter_names=); this one got keywords only"
            )
        x, args = args[0], args[1:]
        rows = plan.rows
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != len(rows):
            raise ValueError(
                f"batch_adapters got {len(rows)} adapter names but this module's input has batch size "
                f"{x.shape[0] if isinstance(x, torch.Tensor) and x.dim() else 'none'}"
            )
        groups: Dict[Optional[str], List[int]] = {}
        for i, name in enumerate(rows):
            groups.setdefault(name if name in self.modules_to_save else None, []).append(i)
        out = None
        for name, idx in groups.items():
            module = self.original_module if name is None else self.modules_to_save[name]
            index = torch.tensor(idx, device=x.device, dtype=torch.long)
            sub = module(x.index_select(0, index), *args, **kwargs)
            if out is None:
                out = sub.new_empty((x.shape[0], *sub.shape[1:]))
            out.index_copy_(0, index, sub)
        return out
