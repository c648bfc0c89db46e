"""Training across processes with PyTorch's own engines: DDP and FSDP2.

fastpeft's layers are plain ``nn.Module``s, so both engines take a model with adapters
as they take any other:

* **DDP** (:func:`wrap_ddp`): every rank holds the whole model; the gradients of the
  trainable tensors (the adapters; the base is frozen) are averaged across ranks.
* **FSDP2** (:func:`shard_fsdp2`, ``torch.distributed.fsdp.fully_shard``): every
  parameter, the frozen base and the adapters alike, becomes a ``DTensor`` sharded over
  the ranks. Before a block's forward (and again before its backward) FSDP2 all-gathers
  the block's parameters and registers the *unsharded plain tensors* on its modules, so
  the fused op never sees a ``DTensor``; afterwards the module holds its shards again.
  Only the trainable parameters need one dtype per block (FSDP2 reduce-scatters their
  gradients together): a bf16 base with fp32 adapters shards as it is.

A checkpoint is the adapter's *full* tensors: :func:`save_adapter` (all ranks call it)
gathers the sharded ones (``DTensor.full_tensor()``, the adapter only, never the base)
and rank 0 writes the PEFT directory with :func:`fastpeft.save_adapter`. Load an adapter
into the model *before* sharding it (:func:`fastpeft.load_adapter`), then shard.

Create the optimizer after :func:`shard_fsdp2`: sharding replaces the parameters.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from fastpeft.core.checkpoint import PathLike
from fastpeft.core.checkpoint import save_adapter as _save_adapter
from fastpeft.core.state import adapter_tensors

__all__ = [
    "DistEnv",
    "init_distributed",
    "unwrap",
    "wrap_ddp",
    "shard_fsdp2",
    "gathered_adapter",
    "gathered_trainable",
    "full_adapter_state",
    "save_adapter",
    "mean_across_ranks",
    "rank",
    "barrier",
]


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs: ``rank`` of ``world_size`` (1: no process group),
    ``local_rank`` on its machine, and the ``device`` its model and batches go to."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: the process that prints and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def init_distributed(device: Optional[str] = None) -> DistEnv:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``): nccl on CUDA, gloo on the CPU. A single
    process (no ``WORLD_SIZE``, or 1) joins nothing.

    ``device``: ``"cuda"``, ``"cpu"`` or None (CUDA when available); on CUDA each
    process takes the GPU of its ``LOCAL_RANK``.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' but torch sees no CUDA GPU; pass device='cpu'")
        torch.cuda.set_device(local_rank)
        where = torch.device("cuda", local_rank)
    else:
        where = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank, world_size, local_rank, where)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards the model in place: no wrapper)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap_ddp(model: nn.Module, env: DistEnv) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` (as it is in a single process); only
    the trainable tensors (the adapters) take part in the gradient all-reduce."""
    if not env.distributed:
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def _blocks(model: nn.Module) -> List[nn.Module]:
    """The transformer blocks to shard one by one: a Hugging Face model's
    ``_no_split_modules`` classes (its decoder layers); else the items of its
    ``nn.ModuleList``s."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        blocks = [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst]
    return blocks


def shard_fsdp2(model: nn.Module, *, mp_policy=None, reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``model`` in place with FSDP2 (``fully_shard``): each block (see
    :func:`_blocks`) is one unit, the rest (embeddings, head) the root unit. The
    process group must be up (:func:`init_distributed`); the model on its device.

    ``mp_policy``: FSDP2's ``MixedPrecisionPolicy`` (e.g. bf16 compute over fp32
    shards). Returns the model (the same object, now an ``FSDPModule``).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise RuntimeError("shard_fsdp2 needs a process group: call init_distributed() under torchrun first")
    kwargs = {"reshard_after_forward": reshard_after_forward, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for block in _blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _owners(model: nn.Module) -> Dict[int, List[Tuple[nn.Module, str]]]:
    """``id(parameter) -> [(module, attribute)]``: where each parameter is registered
    (a tied tensor is registered in more than one place)."""
    owners: Dict[int, List[Tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((module, name))
    return owners


@contextlib.contextmanager
def _gathered(model: nn.Module, tensors: List[torch.Tensor]) -> Iterator[None]:
    """Within the block, each of ``tensors`` that FSDP2 sharded is registered, wherever
    it is registered, as its full plain tensor (``DTensor.full_tensor()``); the shards
    come back afterwards. A collective: every rank enters it with the same tensors."""
    from torch.distributed.tensor import DTensor

    sharded = [t for t in tensors if isinstance(t, DTensor)]
    owners = _owners(model) if sharded else {}
    swapped: List[Tuple[nn.Module, str, nn.Parameter]] = []
    try:
        with torch.no_grad():
            for t in sharded:
                full = nn.Parameter(t.full_tensor(), requires_grad=t.requires_grad)
                for module, name in owners.get(id(t), ()):
                    swapped.append((module, name, module._parameters[name]))
                    module._parameters[name] = full
        yield
    finally:
        for module, name, original in reversed(swapped):
            module._parameters[name] = original


@contextlib.contextmanager
def gathered_adapter(model: nn.Module, adapter_name: str = "default") -> Iterator[nn.Module]:
    """Within the block, every tensor of ``adapter_name``'s checkpoint is whole: those
    FSDP2 sharded are registered as their full plain tensors, so
    ``fastpeft.save_adapter`` and friends read the whole adapter; the base stays
    sharded. A collective: every rank enters it. Yields the unwrapped model."""
    model = unwrap(model)
    with _gathered(model, list(adapter_tensors(model, adapter_name).values())):
        yield model


@contextlib.contextmanager
def gathered_trainable(model: nn.Module) -> Iterator[nn.Module]:
    """As :func:`gathered_adapter` for every trainable parameter, whatever built it (a
    ``peft`` model's ``save_pretrained`` reads them inside). Yields the unwrapped model."""
    model = unwrap(model)
    with _gathered(model, [p for p in model.parameters() if p.requires_grad]):
        yield model


def full_adapter_state(model: nn.Module, adapter_name: str = "default") -> Dict[str, torch.Tensor]:
    """The adapter's checkpoint tensors, full and on the CPU, keyed as PEFT saves them
    (without ``base_model.model.``). A collective under FSDP2: every rank calls it."""
    with gathered_adapter(model, adapter_name) as inner:
        return {k: t.detach().to("cpu").clone() for k, t in adapter_tensors(inner, adapter_name).items()}


def save_adapter(model: nn.Module, path: PathLike, adapter_name: str = "default") -> None:
    """Save ``adapter_name`` of a DDP, FSDP2 or single-process model as a PEFT directory
    (:func:`fastpeft.save_adapter`): every rank calls it, rank 0 writes; the others
    wait until the files are there."""
    with gathered_adapter(model, adapter_name) as inner:
        if rank() == 0:
            _save_adapter(inner, path, adapter_name)
    barrier()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def mean_across_ranks(value: float, device: Optional[torch.device] = None) -> float:
    """``value`` averaged over the ranks (itself in a single process): the loss to print."""
    if not dist.is_initialized():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()
