"""Tune a model's kernels ahead of its first request: ``fastpeft.pretune`` and ``fastpeft tune``.

On a GPU the kernels' tuner times every candidate variant the first time it meets a shape
(per M bucket), which stalls that call for a second or more. :func:`pretune` runs one
inference forward of every distinct adapter layer of a model at each batch size, so that
every such stall happens now, and the tuner writes each pick to its on-disk cache
(``fastpeft.kernels.tuning_cache``: ``$FASTPEFT_CACHE`` or ``~/.cache/fastpeft``), where
later processes on the same card and Triton version find it. Under the Triton interpreter
(CPU) the tuner runs a fixed config, so there is nothing to tune; the forwards still run.

Command line (``fastpeft tune``, or ``python -m fastpeft.tuning``)::

    fastpeft tune path/to/model --adapter path/to/adapter --batch-sizes 1,16,256,4096 --dtype bf16
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Dict, Hashable, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from fastpeft.core.batch import providers_of
from fastpeft.core.linear import AdapterLinear
from fastpeft.core.state import batch_adapters
from fastpeft.kernels import autotune, tuning_cache

__all__ = ["PretuneReport", "layer_shapes", "main", "pretune"]

DEFAULT_BATCH_SIZES = (1, 16, 256, 4096)
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class PretuneReport:
    """What :func:`pretune` did: ``layers`` adapter layers in ``shapes`` distinct shapes,
    ``runs`` forwards (shapes times batch sizes), ``tuned`` new tuner entries, and the
    tuning file (None when disabled)."""

    layers: int
    shapes: int
    runs: int
    tuned: int
    cache_file: Optional[str]


def _signature(layer: AdapterLinear, dtype: Optional[torch.dtype]) -> Hashable:
    """What the kernels' tuner keys depend on: the layer kind, its base shape, dtype and
    device, and its adapter tensors' shapes and dtypes (rank, scale vectors)."""
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in layer.named_parameters())
    return (type(layer), layer.in_features, layer.out_features, dtype or layer.weight.dtype, layer.weight.device,
            params)


def layer_shapes(model: nn.Module, dtype: Optional[torch.dtype] = None) -> Tuple[int, List[Tuple[str, AdapterLinear]]]:
    """``(number of adapter layers, [(name, layer)] one per distinct signature)`` of ``model``."""
    seen: Dict[Hashable, Tuple[str, AdapterLinear]] = {}
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            count += 1
            seen.setdefault(_signature(module, dtype), (name, module))
    return count, list(seen.values())


def _progress(items: Sequence[Any], enabled: bool) -> Iterable[Any]:
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: tune without a bar
        return items
    return tqdm(items, desc="fastpeft pretune", unit="shape")


def _served(model: nn.Module) -> List[str]:
    """Adapters the model's batch providers (an attached ``AdapterPool``) serve."""
    return sorted({n for p in providers_of(model) for n in p.served()})


def pretune(
    model: nn.Module,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    dtype: Optional[torch.dtype] = None,
    progress: bool = True,
    mixed: Optional[bool] = None,
) -> PretuneReport:
    """Tune the kernels of every distinct adapter layer of ``model`` for inputs of each of
    ``batch_sizes`` rows (token rows: batch times sequence length), so that no request
    pays for tuning.

    Each distinct layer (kind, ``in_features``, ``out_features``, dtype, device, adapter
    shapes) runs one inference forward (eval mode, no grad, the active adapter) of a
    random ``(M, in_features)`` input per ``M`` in ``batch_sizes``; ``dtype`` is the
    input's (default: each layer's weight dtype). With ``mixed`` (default: when an
    attached ``AdapterPool`` serves adapters, as ``ServingEngine`` uses it) each also
    runs as a mixed batch (``batch_adapters``: the rows cycle through the served adapters
    and the base model), which tunes the mixed-adapter kernel. Training modes are
    restored after. ``progress`` shows a tqdm bar when tqdm is installed. Returns a
    :class:`PretuneReport`.
    """
    sizes = [int(m) for m in batch_sizes]
    if not sizes or any(m <= 0 for m in sizes):
        raise ValueError(f"batch_sizes must be positive integers, got {list(batch_sizes)!r}")
    count, layers = layer_shapes(model, dtype)
    if not layers:
        raise ValueError("the model has no fastpeft adapter layers: inject or load an adapter first")
    served = _served(model)
    if mixed and not served:
        raise ValueError("pretune(mixed=True) needs an AdapterPool attached to the model with adapters loaded")
    cycle: List[Optional[str]] = [*served, None] if (served if mixed is None else mixed) else []
    before = len(autotune.TUNED)
    work = [(layer, m, False) for _, layer in layers for m in sizes]
    work += [(layer, m, True) for _, layer in layers for m in sizes if cycle]
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        for layer, m, as_mixed in _progress(work, progress):
            x = torch.randn(m, layer.in_features, device=layer.weight.device, dtype=dtype or layer.weight.dtype)
            with torch.no_grad():
                if as_mixed:
                    with batch_adapters(model, [cycle[i % len(cycle)] for i in range(m)]):
                        layer(x)
                else:
                    layer(x)
    finally:
        for module, mode in modes.items():
            module.train(mode)
    path = tuning_cache.cache_path()
    return PretuneReport(count, len(layers), len(work), len(autotune.TUNED) - before,
                         None if path is None else str(path))


def _parse_sizes(text: str) -> List[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or any(m <= 0 for m in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
    return sizes


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastpeft tune",
        description="Pre-tune the fastpeft kernels of a model with its adapters for the given batch sizes; "
        "the picks go to the on-disk tuning cache ($FASTPEFT_CACHE or ~/.cache/fastpeft).",
    )
    p.add_argument("model", help="a transformers causal LM: local directory (or hub name, if cached)")
    p.add_argument("--adapter", action="append", default=[], metavar="DIR",
                   help="PEFT-format adapter directory to load (repeatable; the first one is active)")
    p.add_argument("--batch-sizes", type=_parse_sizes, default=list(DEFAULT_BATCH_SIZES), metavar="M,M,...",
                   help="token rows per forward to tune for (default: %(default)s)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="model dtype (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="device (default: cuda when available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``fastpeft tune``: load a model and its adapters, :func:`pretune` it, print a summary."""
    args = _parser().parse_args(argv)
    from transformers import AutoModelForCausalLM

    from fastpeft.core.checkpoint import load_adapter

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs = {"dtype": _DTYPES[args.dtype]} if args.dtype else {}
    model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs).to(device).eval()
    for i, path in enumerate(args.adapter):
        load_adapter(model, path, adapter_name=f"adapter{i}" if i else "default")
    report = pretune(model, args.batch_sizes, progress=not args.no_progress)
    print(f"fastpeft tune: {report.layers} adapter layers, {report.shapes} distinct shapes, "
          f"{report.runs} forwards, {report.tuned} new tuner picks; cache: {report.cache_file or 'disabled'}")
    if autotune.interpreter_active() or device == "cpu":
        print("fastpeft tune: no GPU kernels here (CPU or Triton interpreter): nothing was timed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
