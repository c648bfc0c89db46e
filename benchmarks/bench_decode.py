"""ServingEngine decode: eager steps vs the decode step replayed from a CUDA graph.

    python benchmarks/bench_decode.py           # GPU: batch 1, 8, 32; 128 new tokens
    python benchmarks/bench_decode.py --quick   # GPU: batch 1, 8; 48 new tokens

A random Llama-style model (bf16, hidden 2048, 4 layers) with LoRA on every projection
(rank 16), served from an ``AdapterPool`` of 4 adapters, each batch row with its own
adapter (one row in four without). For each batch size both engines (``cuda_graphs=False``
and ``True``) generate greedily after one warm-up call (which compiles and tunes); the
table gives milliseconds per generated token (the whole ``generate`` call over the new
tokens, prefill included), the eager / graph ratio, and the share of tokens the two
engines agree on (bf16: the static-cache attention may round differently, so a late
token can differ). Without a GPU: a correctness-only pass on a tiny fp32 model under the
Triton interpreter, where the static-buffer path (its replay a direct call) must give the
eager path's tokens exactly.
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Any, Dict, List, Optional

import common

ON_GPU = common.setup_interpreter()

import torch  # noqa: E402

import fastpeft as fp  # noqa: E402
from fastpeft.serving.engine import ServingEngine  # noqa: E402
from fastpeft.serving.pool import AdapterPool  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT_LEN = 32
ADAPTERS = ["a", "b", "c", None]


def _model(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, dtype, device, targets):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                      max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    fp.inject(model, fp.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    return model.eval()


def _pool(model, rank: int) -> AdapterPool:
    pool = AdapterPool(model, max_adapters=4, max_rank=rank)
    for i, name in enumerate(n for n in ADAPTERS if n is not None):
        g = torch.Generator().manual_seed(i)
        pool.load(name, {n: (torch.randn(rank, ls.in_features, generator=g) / ls.in_features**0.5,
                             torch.randn(ls.out_features, rank, generator=g) * 0.1)
                         for n, ls in pool.layers.items()}, lora_alpha=2 * rank)
    return pool


def _prompts(batch: int, vocab: int, length: int) -> List[List[int]]:
    g = torch.Generator().manual_seed(batch)
    return [torch.randint(1, vocab, (length - (i % 3),), generator=g).tolist() for i in range(batch)]


def _time_generate(engine: ServingEngine, prompts, names, new: int, reps: int):
    engine.generate(prompts, names, max_new_tokens=new)  # warm-up: compile, tune, capture
    times, out = [], None
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = engine.generate(prompts, names, max_new_tokens=new)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3 / new, out.new_tokens


def run_gpu(quick: bool, json_path: Optional[str], info: Dict[str, Any]) -> List[Dict[str, Any]]:
    vocab = 32000
    model = _model(2048, 5632, 4, 16, 4, vocab, torch.bfloat16, "cuda", TARGETS)
    pool = _pool(model, 16)
    eager = ServingEngine(model, pool, eos_token_id=None, cuda_graphs=False)
    graph = ServingEngine(model, pool, eos_token_id=None, cuda_graphs=True)
    new = 48 if quick else 128
    rows = []
    for batch in ([1, 8] if quick else [1, 8, 32]):
        prompts = _prompts(batch, vocab, PROMPT_LEN)
        names = [ADAPTERS[i % len(ADAPTERS)] for i in range(batch)]
        row: Dict[str, Any] = {"batch": batch, "new_tokens": new}
        try:
            row["eager_ms_per_token"], want = _time_generate(eager, prompts, names, new, 3)
            row["graph_ms_per_token"], got = _time_generate(graph, prompts, names, new, 3)
            row["graph_speedup"] = common.ratio(row["eager_ms_per_token"], row["graph_ms_per_token"])
            row["same_tokens"] = float((got == want).float().mean())
        except Exception as exc:  # report, keep measuring the other batch sizes
            row["decode_error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
        common.write_partial(json_path, info, quick, rows)
        print(row, flush=True)
    return rows


def run_cpu() -> List[Dict[str, Any]]:
    """Correctness only: the static-buffer decode (replay = direct call) vs eager decode."""
    model = _model(32, 48, 1, 4, 2, 100, torch.float32, "cpu", ["v_proj"])
    pool = _pool(model, 4)
    rows = []
    for batch in (1, 3):
        prompts = _prompts(batch, 100, 6)
        names = [ADAPTERS[i % len(ADAPTERS)] for i in range(batch)]
        want = ServingEngine(model, pool, eos_token_id=None, cuda_graphs=False).generate(prompts, names, 4).new_tokens
        static = ServingEngine(model, pool, eos_token_id=None, cuda_graphs=lambda step: step)
        got = static.generate(prompts, names, 4).new_tokens
        same = float((got == want).float().mean())
        if same != 1.0:
            raise AssertionError(f"static-buffer decode differs from eager at batch {batch}: {got} vs {want}")
        rows.append({"batch": batch, "new_tokens": 4, "same_tokens": same})
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    args = common.base_args(__doc__.splitlines()[0], "bench_decode.json").parse_args(argv)
    return common.run_benchmark(
        args,
        what="the static-buffer decode",
        run_cpu=run_cpu,
        cpu_columns=["batch", "new_tokens", "same_tokens"],
        run_gpu=lambda info: run_gpu(args.quick, args.json, info),
        gpu_columns=["batch", "new_tokens", "eager_ms_per_token", "graph_ms_per_token", "graph_speedup", "same_tokens"],
        key_columns=["batch"],
        title="ServingEngine.generate, ms per new token (bf16): eager decode vs CUDA-graph replay, same run",
    )


if __name__ == "__main__":
    sys.exit(main())
