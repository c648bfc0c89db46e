"""``fastpeft methods``: the PEFT methods side by side on one model config.

The model is built from its config on the meta device (shapes only, no weights, no
download), each method is injected with its default config below, and its parameters
are counted; whether it merges and whether it joins mixed batches come from the method
itself (``Method.merges``, ``Method.mixed_batches``).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

__all__ = ["MODEL_CONFIGS", "METHODS", "MethodRow", "method_rows", "load_model_config", "format_rows", "main"]

# Architecture fields of the published configs (no tokenizer or weights needed).
MODEL_CONFIGS: Dict[str, Dict[str, Any]] = {
    "llama-3-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
    ),
    "llama-3.2-1b": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                          original_max_position_embeddings=8192),
        bos_token_id=128000, eos_token_id=128001,
    ),
    "gpt2": dict(
        model_type="gpt2", n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257,
        bos_token_id=50256, eos_token_id=50256,
    ),
}


@dataclass(frozen=True)
class MethodInfo:
    name: str
    peft_type: str
    kind: str
    kernel: str
    config: Callable[[Any, int, int], Any]  # (model config, rank, virtual tokens) -> fastpeft config


def _fp():
    import fastpeft

    return fastpeft


def _layers(model_config: Any) -> int:
    return int(model_config.num_hidden_layers)


# Default configs: PEFT's defaults (targets per architecture included) with the rank and
# the number of virtual tokens given on the command line.
METHODS: Sequence[MethodInfo] = (
    MethodInfo("lora", "LORA", "reparameterization (low rank)", "yes: GEMM + low-rank update in one pass",
               lambda mc, r, t: _fp().LoraConfig(r=r, lora_alpha=2 * r)),
    MethodInfo("adalora", "ADALORA", "reparameterization (SVD form, rank pruning)", "yes: the LoRA kernel, A*E folded",
               lambda mc, r, t: _fp().AdaLoraConfig(init_r=r + r // 2, target_r=r, total_step=1000)),
    MethodInfo("ia3", "IA3", "learned scaling of activations", "yes: the scale applied inside the GEMM",
               lambda mc, r, t: _fp().IA3Config()),
    MethodInfo("bottleneck", "BOTTLENECK", "additive (adapter layers)", "yes: down-projection folded into the GEMM",
               lambda mc, r, t: _fp().BottleneckConfig(bottleneck_size=64)),
    MethodInfo("prompt-tuning", "PROMPT_TUNING", "soft prompt", "no (no GEMM to fuse)",
               lambda mc, r, t: _fp().PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=t)),
    MethodInfo("p-tuning", "P_TUNING", "soft prompt (MLP encoder)", "no (no GEMM to fuse)",
               lambda mc, r, t: _fp().PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=t)),
    MethodInfo("prefix-tuning", "PREFIX_TUNING", "soft prompt (per-layer keys/values)", "no (no GEMM to fuse)",
               lambda mc, r, t: _fp().PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=t)),
    MethodInfo("llama-adapter", "ADAPTION_PROMPT", "soft prompt + gated attention", "no (PyTorch, about 10 keys)",
               lambda mc, r, t: _fp().AdaptionPromptConfig(adapter_len=10, adapter_layers=min(30, _layers(mc)))),
)


@dataclass(frozen=True)
class MethodRow:
    name: str
    kind: str
    trainable: int
    total: int
    merges: bool
    mixed_batches: bool
    kernel: str
    targets: str

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0


def load_model_config(model: Optional[str], config_path: Optional[str]) -> Any:
    """A transformers config: one of ``MODEL_CONFIGS`` or a ``config.json`` (file or
    the directory holding it)."""
    from transformers import AutoConfig

    if config_path:
        path = Path(config_path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {config_path}")
        fields = json.loads(path.read_text())
    else:
        key = (model or "llama-3-8b").lower()
        if key not in MODEL_CONFIGS:
            raise ValueError(f"unknown model {model!r}; built in: {', '.join(MODEL_CONFIGS)} (or pass --config)")
        fields = dict(MODEL_CONFIGS[key])
    if "model_type" not in fields:
        raise ValueError(f"{config_path}: a config.json names its model_type")
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def _meta_model(model_config: Any):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


def _row(info: MethodInfo, model_config: Any, rank: int, tokens: int) -> MethodRow:
    from fastpeft.core.method import Attach, get_method
    from fastpeft.core.state import trainable_parameters

    model = _meta_model(model_config)
    _fp().inject(model, info.config(model_config, rank, tokens))
    method = get_method(info.peft_type)
    trainable, total = trainable_parameters(model)
    if method.attach is Attach.HOOKS:
        targets = "model input" if info.peft_type != "PREFIX_TUNING" else "every layer's attention cache"
    else:
        targets = ",".join(sorted({path.rsplit(".", 1)[-1] for path, _ in method.layers(model)}))
    return MethodRow(info.name, info.kind, trainable, total, method.merges, method.mixed_batches, info.kernel, targets)


def method_rows(model_config: Any, names: Optional[Sequence[str]] = None, rank: int = 16,
                tokens: int = 20, progress: bool = False) -> List[MethodRow]:
    """One row per method (``names``: a subset, in ``METHODS``' order)."""
    known = {m.name for m in METHODS}
    unknown = [n for n in names or () if n not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(known)}")
    chosen = [m for m in METHODS if names is None or m.name in names]
    if progress:
        from tqdm.auto import tqdm

        chosen = tqdm(chosen, desc="methods", unit="method", leave=False, disable=None)
    return [_row(info, model_config, rank, tokens) for info in chosen]


def format_rows(rows: Sequence[MethodRow]) -> str:
    header = ["method", "type", "trainable", "% of all", "merges", "mixed batches", "fused kernel", "targets"]
    cells = [
        [r.name, r.kind, f"{r.trainable:,d}", f"{r.percent:.4f}", "yes" if r.merges else "no",
         "yes" if r.mixed_batches else "no", r.kernel, r.targets]
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
    return "\n".join(line.rstrip() for line in lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fastpeft methods",
        description=(
            "Compare the PEFT methods on one model: the parameters each trains (and their share of\n"
            "all parameters, adapter included, as PEFT's print_trainable_parameters counts them),\n"
            "whether it merges into the base weights, whether one batch can mix its adapters, and\n"
            "whether a fused kernel runs it. The model is built from its config on the meta device:\n"
            "no weights, no download. Each method uses PEFT's default config for the architecture\n"
            "(its default target modules), with the rank and the number of virtual tokens below.\n"
            "Needs transformers."
        ),
        epilog="examples:\n  fastpeft methods --model gpt2\n  fastpeft methods --config path/to/config.json --rank 8",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="llama-3-8b", choices=sorted(MODEL_CONFIGS),
                        help="a built-in model config (default: %(default)s)")
    parser.add_argument("--config", default=None, help="a model's config.json (or its folder), instead of --model")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank; AdaLoRA starts at 1.5x and ends at it (default 16)")
    parser.add_argument("--virtual-tokens", type=int, default=20, help="soft prompt length (default 20)")
    parser.add_argument("--methods", default=None, help="comma-separated subset, e.g. lora,ia3 (default: all)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("fastpeft methods: needs transformers (pip install transformers)", file=sys.stderr)
        return 2
    try:
        model_config = load_model_config(args.model, args.config)
        names = args.methods.split(",") if args.methods else None
        rows = method_rows(model_config, names, args.rank, args.virtual_tokens, progress=True)
    except (ValueError, FileNotFoundError) as exc:
        print(f"fastpeft methods: {exc}", file=sys.stderr)
        return 2
    where = args.config or args.model
    print(f"{where}: {rows[0].total - rows[0].trainable:,d} base parameters" if rows else where)
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
