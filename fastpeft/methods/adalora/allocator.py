"""AdaLoRA's training hooks, as PEFT 0.21's ``AdaLoraModel`` and ``RankAllocator``.

* :func:`orthogonal_regularization`: ``orth_reg_weight * (1/n) Σ_M ||M M^T − I||_F``
  over the adapter's matrices ``M`` (each layer's ``lora_A``, and ``lora_B^T`` for
  ``||B^T B − I||_F``), ``n`` their number (two per layer), added to ``outputs.loss``.
* :func:`update_and_allocate`: per step, after ``backward``, before ``zero_grad``:
  the sensitivity ``I = |p ∘ ∇p|`` of every entry of A, E, B, smoothed ``Ī ← β1 Ī + (1−β1) I``
  and its uncertainty ``Ū ← β2 Ū + (1−β2) |I − Ī|``; a triplet's score is
  ``s(E_i) + mean_j s(A_ij) + mean_k s(B_ki)`` with ``s = Ī ∘ Ū``. The budget (kept
  triplets in all) falls from ``init_bgt`` (Σ ranks) to ``target_r * n_layers`` as
  ``int((b0 − bT) (1 − (t − tinit)/(T − tfinal − tinit))^3 + bT)`` after ``tinit``;
  every ``deltaT`` steps (and at ``T − tfinal``) the ``init_bgt − budget`` lowest
  triplets get ``E_i = 0`` and the kept ones are recorded as the config's
  ``rank_pattern``; after ``T − tfinal`` that pattern's mask is re-applied each step.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from fastpeft.core.method import adapter_configs
from fastpeft.core.targets import named_modules_of
from fastpeft.methods.adalora.config import pattern_paths
from fastpeft.methods.adalora.layer import AdaLoraAdapter, AdaLoraLinear

__all__ = ["RankAllocator", "orthogonal_regularization", "update_and_allocate", "adalora_adapter_name"]


def _adapters(model: nn.Module, adapter_name: str) -> List[Tuple[str, AdaLoraAdapter]]:
    """``(layer path, adapter module)`` of one adapter, in the model's module order."""
    return [(path, layer.adapters[adapter_name]) for path, layer in named_modules_of(model, (AdaLoraLinear,))
            if adapter_name in layer.adapter_names]


def adalora_adapter_name(model: nn.Module, adapter_name: Optional[str] = None) -> str:
    """``adapter_name``, or the model's active adapter; it must be an AdaLoRA adapter."""
    configs = adapter_configs(model)
    name = adapter_name if adapter_name is not None else model.__dict__.get("fastpeft_active")
    if name is None or name not in configs:
        raise ValueError(f"no AdaLoRA adapter {name!r} in this model (its adapters: {sorted(configs)})")
    if configs[name].peft_type != "ADALORA":
        raise ValueError(f"adapter {name!r} is a {configs[name].peft_type} adapter, not AdaLoRA")
    return name


def orthogonal_regularization(model: nn.Module, adapter_name: Optional[str] = None) -> torch.Tensor:
    """The term PEFT's ``AdaLoraModel.forward`` adds to the loss (module docstring),
    differentiable; for the active adapter unless ``adapter_name`` is given."""
    name = adalora_adapter_name(model, adapter_name)
    weight = adapter_configs(model)[name].orth_reg_weight
    total, count = 0, 0
    for _, adapter in _adapters(model, name):
        for p, is_a in ((adapter.lora_A, True), (adapter.lora_B, False)):
            cov = p @ p.T if is_a else p.T @ p
            eye = torch.eye(*cov.size(), dtype=cov.dtype, device=cov.device)  # (no out=: compile traces it)
            total = total + torch.norm(cov - eye, p="fro")
            count += 1
    if count == 0:
        return torch.zeros(())
    return weight * (total / count)


class RankAllocator:
    """PEFT's ``RankAllocator`` over one adapter's layers (see the module docstring).

    State: per layer path, the EMA tensors of A, E, B. ``init_bgt`` is the sum of the
    layers' ranks when the allocator is made (the first ``update_and_allocate`` call).
    """

    def __init__(self, model: nn.Module, adapter_name: str) -> None:
        self.adapter_name = adapter_name
        self.config = adapter_configs(model)[adapter_name]
        if not (0 < self.config.beta1 < 1 and 0 < self.config.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in (0, 1), got {self.config.beta1}, {self.config.beta2}")
        adapters = _adapters(model, adapter_name)
        self.init_bgt = sum(a.lora_A.shape[0] for _, a in adapters)
        self.target_bgt = self.config.target_r * len(adapters)
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.exp_avg_ipt: Dict[Tuple[str, str], torch.Tensor] = {}
        self.exp_avg_unc: Dict[Tuple[str, str], torch.Tensor] = {}

    def budget_schedule(self, step: int) -> Tuple[int, bool]:
        """``(budget, mask now?)`` at ``step``: PEFT's cubic schedule."""
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff**3) + self.target_bgt)
        return budget, step % c.deltaT == 0

    def update_ipt(self, model: nn.Module) -> None:
        """Smooth each entry's sensitivity ``|p ∘ grad|`` and its uncertainty."""
        b1, b2 = self.config.beta1, self.config.beta2
        with torch.no_grad():
            for path, adapter in _adapters(model, self.adapter_name):
                for kind in ("lora_A", "lora_E", "lora_B"):
                    p = getattr(adapter, kind)
                    if p.grad is None:
                        raise RuntimeError(
                            f"{path}.{kind} has no gradient: call update_and_allocate after loss.backward() "
                            "and before optimizer.zero_grad()"
                        )
                    key = (path, kind)
                    if key not in self.exp_avg_ipt:
                        self.exp_avg_ipt[key] = torch.zeros_like(p)
                        self.exp_avg_unc[key] = torch.zeros_like(p)
                    ipt = (p * p.grad).abs().detach()
                    self.exp_avg_ipt[key] = b1 * self.exp_avg_ipt[key] + (1 - b1) * ipt
                    self.exp_avg_unc[key] = b2 * self.exp_avg_unc[key] + (1 - b2) * (ipt - self.exp_avg_ipt[key]).abs()

    def _score(self, key: Tuple[str, str]) -> torch.Tensor:
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    def mask_to_budget(self, model: nn.Module, budget: int) -> Dict[str, List[bool]]:
        """Zero ``E`` of all but the ``budget`` highest-scoring triplets; the kept ones per layer."""
        adapters = _adapters(model, self.adapter_name)
        triplet: Dict[str, torch.Tensor] = {}
        for path, _ in adapters:
            ipt_a = torch.mean(self._score((path, "lora_A")), dim=1, keepdim=True)
            ipt_b = torch.mean(self._score((path, "lora_B")), dim=0, keepdim=False).view(-1, 1)
            ipt_ab = torch.cat([ipt_a, ipt_b], dim=1).sum(dim=1, keepdim=False)
            triplet[path] = (self._score((path, "lora_E")).view(-1) + ipt_ab.view(-1)).view(-1, 1)
        threshold = torch.kthvalue(torch.cat([t.view(-1) for t in triplet.values()]), k=self.init_bgt - budget)[0].item()
        pattern: Dict[str, List[bool]] = {}
        with torch.no_grad():
            for path, adapter in adapters:
                drop = triplet[path] <= threshold
                adapter.lora_E.masked_fill_(drop, 0.0)
                pattern[f"{path}.lora_E"] = (~drop).view(-1).tolist()
        return pattern

    def mask_using_rank_pattern(self, model: nn.Module) -> None:
        """Zero ``E`` where the config's ``rank_pattern`` drops a triplet."""
        masks = pattern_paths(self.config, self.adapter_name)
        with torch.no_grad():
            for path, adapter in _adapters(model, self.adapter_name):
                keep = torch.tensor(masks[path], dtype=torch.bool, device=adapter.lora_E.device).unsqueeze(-1)
                adapter.lora_E.masked_fill_(~keep, 0.0)


def update_and_allocate(model: nn.Module, global_step: int, adapter_name: Optional[str] = None) -> Optional[int]:
    """PEFT's ``AdaLoraModel.update_and_allocate``: call once per training step after
    ``loss.backward()`` (and ``optimizer.step()``), before ``zero_grad()``. Returns the
    step's budget (None after ``total_step - tfinal``, when the final mask is re-applied)."""
    name = adalora_adapter_name(model, adapter_name)
    config = adapter_configs(model)[name]
    allocators = model.__dict__.setdefault("fastpeft_adalora_allocators", {})
    alloc: Optional[RankAllocator] = allocators.get(name)
    if alloc is None or alloc.config is not config:  # (a new adapter under an old name)
        alloc = allocators[name] = RankAllocator(model, name)
    end = config.total_step - config.tfinal
    if global_step < end:
        alloc.update_ipt(model)
        budget, mask_now = alloc.budget_schedule(global_step)
        if mask_now:
            config.rank_pattern = alloc.mask_to_budget(model, budget)
        return budget
    if global_step == end:
        budget, _ = alloc.budget_schedule(global_step)
        config.rank_pattern = alloc.mask_to_budget(model, budget)
        alloc.reset_ipt()
        return budget
    if not config.rank_pattern:
        raise ValueError(
            f"step {global_step} is past total_step - tfinal = {end} but no rank_pattern was allocated: "
            "call update_and_allocate at every step, step total_step - tfinal included"
        )
    alloc.mask_using_rank_pattern(model)
    return None
