#!/usr/bin/env python
"""Fine-tune a causal language model with LoRA on fastpeft's fused kernels.

On a CPU (no downloads; a tiny Llama built from a config, a word-level dataset made here):

    python examples/finetune.py                      # plain PyTorch loop
    python examples/finetune.py --trainer hf         # Hugging Face Trainer
    torchrun --nproc_per_node 2 examples/finetune.py # DDP over 2 processes (gloo)

A CPU runs fastpeft's ops as their PyTorch reference; under ``TRITON_INTERPRET=1`` the
Triton kernels train, interpreted and slow (use ``--steps 3 --batch-size 2 --seq-len 16``).

On a GPU, with a real model and dataset (``datasets`` and the model's tokenizer load then):

    torchrun --nproc_per_node 8 examples/finetune.py --model meta-llama/Llama-3.2-1B \\
        --dataset wikitext --dataset-config wikitext-2-raw-v1 --fsdp

Step time of fastpeft against PEFT on a 1B-class config (random weights, no download):

    python examples/finetune.py --model llama-1b-config --steps 20 --json fp.json
    python examples/finetune.py --model llama-1b-config --steps 20 --json peft.json --peft

The adapter is saved in PEFT's format (``--output-dir``) and reloaded into a fresh base
with ``peft.PeftModel.from_pretrained`` (with ``--peft``: into fastpeft), whose logits
must match the trained model's. Only rank 0 prints and writes files.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import fastpeft as fp  # noqa: E402
from fastpeft import distributed as fdist  # noqa: E402

CONFIG_MODELS = ("tiny", "llama-1b-config")
#: Relative logits difference (norms) a reloaded adapter may show, per model dtype.
RELOAD_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Fine-tune a causal LM with LoRA (fastpeft), save the adapter in PEFT format and "
        "check that peft reloads it. Runs under torchrun (DDP; --fsdp for FSDP2).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="tiny",
                   help="'tiny' (CPU-sized Llama from a config), 'llama-1b-config' (Llama-3.2-1B shapes, "
                   "random weights) or a Hugging Face model name or path")
    p.add_argument("--dataset", default=None,
                   help="Hugging Face dataset name (needs `datasets`); default: a small word-level corpus made here")
    p.add_argument("--dataset-config", default=None, help="the dataset's config name")
    p.add_argument("--split", default="train", help="dataset split")
    p.add_argument("--text-column", default="text", help="dataset column holding the text")
    p.add_argument("--tokenizer", default=None, help="tokenizer name or path (default: --model)")
    p.add_argument("--trainer", choices=("loop", "hf"), default="loop",
                   help="plain PyTorch loop or the Hugging Face Trainer")
    p.add_argument("--peft", action="store_true", help="train with peft.get_peft_model instead of fastpeft")
    p.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (fully_shard; --trainer loop)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step and process")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (constant)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    # (not "--r": torchrun would take it for an abbreviation of its own options)
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank r")
    p.add_argument("--lora-alpha", type=float, default=16, help="LoRA alpha")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA branch")
    p.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated module names to adapt")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="model weights' dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: CUDA when available")
    p.add_argument("--seed", type=int, default=0, help="seed of the model init and the data order")
    p.add_argument("--warmup-steps", type=int, default=2, help="steps left out of the mean step time")
    p.add_argument("--output-dir", default=None, help="where the adapter goes (default: a temporary directory)")
    p.add_argument("--json", default=None, help="write losses and the mean step time to this JSON file")
    p.add_argument("--no-check", action="store_true", help="skip the reload check")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "lora_r"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0.0 <= args.lora_dropout < 1.0:
        parser.error(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if args.fsdp and args.trainer != "loop":
        parser.error("--fsdp shards the model in the plain loop: use it with --trainer loop")
    if args.dataset and args.model in CONFIG_MODELS and not args.tokenizer:
        parser.error(f"--dataset needs a tokenizer: pass --tokenizer, or a model name instead of {args.model!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA GPU")
    return args


# ----------------------------------------------------------------------------- data

NAMES = ("alice", "bob", "carol", "dave", "erin")
THINGS = ("apples", "pears", "plums", "books", "coins")
COUNTS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def synthetic_corpus(sentences: int, seed: int) -> List[str]:
    """Sentences with a learnable pattern: a name and a count recur in the second half."""
    rng = random.Random(seed)
    out = []
    for _ in range(sentences):
        a, b, thing = rng.choice(NAMES), rng.choice(NAMES), rng.choice(THINGS)
        n, k = rng.randrange(1, len(COUNTS)), rng.randrange(len(COUNTS))
        out.append(f"{a} has {COUNTS[n]} {thing} and gives {COUNTS[min(k, n)]} {thing} to {b} , "
                   f"so {a} had {COUNTS[n]} {thing} .")
    return out


class WordTokenizer:
    """Word-level tokenizer over a fixed vocabulary (id 0: unknown)."""

    def __init__(self, texts: Sequence[str]) -> None:
        words = sorted({w for t in texts for w in t.split()})
        self.vocab = {w: i + 1 for i, w in enumerate(words)}

    def __len__(self) -> int:
        return len(self.vocab) + 1

    def encode(self, text: str) -> List[int]:
        return [self.vocab.get(w, 0) for w in text.split()]


def to_blocks(ids: List[int], seq_len: int) -> torch.Tensor:
    """The token stream cut into ``(n, seq_len)`` blocks (no padding: every rank's loss
    averages the same number of tokens, so DDP's mean of means is the global mean)."""
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"the data holds {len(ids)} tokens, fewer than one sequence of --seq-len {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def load_data(args: argparse.Namespace, needed: int) -> Tuple[torch.Tensor, int]:
    """``(blocks, vocab_size)``: at least ``needed`` blocks when the data allows."""
    if args.dataset is None:
        texts = synthetic_corpus(64 + needed * args.seq_len // 16, args.seed)  # >= 16 words each
        tok = WordTokenizer(texts)
        return to_blocks([i for t in texts for i in tok.encode(t)], args.seq_len), len(tok)
    try:
        import datasets
        from transformers import AutoTokenizer
    except ImportError as e:
        raise SystemExit(f"--dataset needs the `datasets` package ({e}); pip install datasets") from None
    tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    data = datasets.load_dataset(args.dataset, args.dataset_config, split=args.split)
    if args.text_column not in data.column_names:
        raise SystemExit(f"dataset {args.dataset!r} has no column {args.text_column!r}; it has {data.column_names}")
    ids: List[int] = []
    for text in data[args.text_column]:
        if text and text.strip():
            ids.extend(tok(text)["input_ids"] + [tok.eos_token_id or 0])
        if len(ids) >= needed * args.seq_len:
            break
    return to_blocks(ids, args.seq_len), len(tok)


class Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


# ----------------------------------------------------------------------------- model


def build_model(name: str, vocab_size: int, dtype: torch.dtype, device: torch.device, seed: int):
    """The base model; one built from a config is seeded, so a second call (the reload
    check) gives the same weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if name not in CONFIG_MODELS:
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device)
    if name == "tiny":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             tie_word_embeddings=False)
    else:  # Llama-3.2-1B's shapes
        config = LlamaConfig(vocab_size=max(vocab_size, 128256), hidden_size=2048, intermediate_size=8192,
                             num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                             max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=True)
    with device:
        return LlamaForCausalLM(config).to(dtype)


def lora_dict(args: argparse.Namespace) -> dict:
    return {"r": args.lora_r, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
            "target_modules": args.target_modules.split(","), "task_type": "CAUSAL_LM"}


def add_lora(model, args: argparse.Namespace):
    if args.peft:
        import peft

        return peft.get_peft_model(model, peft.LoraConfig(**lora_dict(args)))
    return fp.inject(model, fp.LoraConfig(**lora_dict(args)))


# ----------------------------------------------------------------------------- training


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_loop(model, blocks: torch.Tensor, args: argparse.Namespace, env: fdist.DistEnv) -> Tuple[List[float], List[float]]:
    """AdamW with a constant rate; ``(losses, step seconds)``."""
    from tqdm.auto import tqdm

    data = Blocks(blocks)
    sampler = torch.utils.data.DistributedSampler(
        data, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    if len(loader) == 0:
        raise SystemExit(f"{len(data)} sequences make no full batch of --batch-size {args.batch_size} on each of "
                         f"{env.world_size} process(es): lower --batch-size or --seq-len, or use more data")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    losses, times, epoch = [], [], 0
    bar = tqdm(total=args.steps, desc="fine-tuning", disable=not env.main)
    model.train()
    while len(losses) < args.steps:
        sampler.set_epoch(epoch)
        epoch += 1
        for batch in loader:
            _sync(env.device)
            start = time.perf_counter()
            ids = batch["input_ids"].to(env.device)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(env.device)
            times.append(time.perf_counter() - start)
            losses.append(fdist.mean_across_ranks(loss.item(), env.device))
            bar.update(1)
            if env.main:
                bar.write(f"step {len(losses):4d}  loss {losses[-1]:.4f}  {times[-1]:.3f} s")
            if len(losses) == args.steps:
                break
    bar.close()
    return losses, times


def train_hf(model, blocks: torch.Tensor, args: argparse.Namespace, env: fdist.DistEnv, out: str) -> Tuple[List[float], List[float]]:
    """The Hugging Face Trainer (DDP under torchrun by itself); ``(losses, step seconds)``."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    times: List[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            _sync(env.device)
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            _sync(env.device)
            times.append(time.perf_counter() - self.start)

    targs = TrainingArguments(
        output_dir=os.path.join(out, "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=args.max_grad_norm, logging_steps=1, save_strategy="no",
        report_to="none", seed=args.seed, data_seed=args.seed, dataloader_drop_last=True,
        remove_unused_columns=False, use_cpu=env.device.type == "cpu", disable_tqdm=not env.main,
        bf16=False, fp16=False, ddp_find_unused_parameters=False,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=Blocks(blocks), callbacks=[StepTimer()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, times


# ----------------------------------------------------------------------------- save and check


def save(model, out: str, args: argparse.Namespace) -> None:
    if not args.peft:
        fdist.save_adapter(model, out)
        return
    # peft's save_pretrained, on the whole trainable tensors (gathered under FSDP2).
    with fdist.gathered_trainable(model) as inner:
        if fdist.rank() == 0:
            inner.save_pretrained(out)
    fdist.barrier()


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float().cpu()


def reload_logits(out: str, args: argparse.Namespace, vocab: int, dtype: torch.dtype, device: torch.device) -> Tuple[str, object]:
    """A fresh base with the saved adapter loaded by the *other* library."""
    base = build_model(args.model, vocab, dtype, device, args.seed)
    if args.peft:
        fp.load_adapter(base, out)
        return "fastpeft", base
    from peft import PeftModel

    return "peft", PeftModel.from_pretrained(base, out)


def check_reload(model, out: str, args, env: fdist.DistEnv, vocab: int, dtype: torch.dtype, sample: torch.Tensor) -> bool:
    trained = logits_of(model if args.fsdp else fdist.unwrap(model), sample.to(env.device))
    ok = True
    if env.main:
        who, again = reload_logits(out, args, vocab, dtype, env.device)
        got = logits_of(again, sample.to(env.device))
        rel = float((got - trained).norm() / trained.norm().clamp_min(1e-30))
        ok = rel <= RELOAD_TOL[dtype]
        print(f"reloaded in {who}: relative logits difference {rel:.2e} ({'ok' if ok else 'MISMATCH'}, "
              f"tolerance {RELOAD_TOL[dtype]:.0e})")
    return ok


def announce(model, args: argparse.Namespace, env: fdist.DistEnv, dtype: torch.dtype, blocks: torch.Tensor) -> None:
    """What runs where: the model, the data, the processes and which kernels train."""
    if args.peft:
        backend = "peft (PyTorch)"
    else:
        backend = f"fastpeft ({fp.resolve_backend('auto', env.device, dtype)})"
        if backend == "fastpeft (torch)" and env.device.type == "cpu":
            backend += "; set TRITON_INTERPRET=1 to run the Triton kernels, interpreted"
    print(f"model {args.model} ({dtype}), {blocks.shape[0]} sequences of {args.seq_len} tokens, "
          f"{env.world_size} process(es){', FSDP2' if args.fsdp else ''}, adapters: {backend}")
    if args.peft:
        model.print_trainable_parameters()
    else:
        fp.print_trainable_parameters(model)


def output_dir(args: argparse.Namespace, env: fdist.DistEnv) -> str:
    """``--output-dir``, or a temporary directory that rank 0 makes and names to all."""
    if args.output_dir:
        return args.output_dir
    names = [tempfile.mkdtemp(prefix="finetune_") if env.main else ""]
    if env.distributed:
        dist.broadcast_object_list(names, src=0)
    return names[0]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    # peft 0.21 asks transformers 5 for a renamed attribute: a warning about peft, not this run.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
    env = fdist.init_distributed(args.device)
    if env.device.type == "cpu" and args.model == "tiny" and "OMP_NUM_THREADS" not in os.environ:
        # Its matmuls are too small to gain from threads, and on a busy machine the
        # threads' spin-waits made each step 10-50x slower (measured).
        torch.set_num_threads(1)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if env.device.type == "cuda" else torch.float32)
    blocks, vocab = load_data(args, args.steps * args.batch_size * env.world_size)
    model = add_lora(build_model(args.model, vocab, dtype, env.device, args.seed), args)
    if env.main:
        announce(model, args, env, dtype, blocks)
    out_dir = output_dir(args, env)
    if args.trainer == "hf":
        losses, times = train_hf(model, blocks, args, env, out_dir)
    else:
        model = fdist.shard_fsdp2(model) if args.fsdp else fdist.wrap_ddp(model, env)
        losses, times = train_loop(model, blocks, args, env)
    save(model, out_dir, args)
    timed = times[args.warmup_steps:] or times
    mean_step = sum(timed) / len(timed)
    if env.main:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; mean step {mean_step:.4f} s over {len(timed)} steps; "
              f"adapter saved to {out_dir}")
    ok = args.no_check or check_reload(model, out_dir, args, env, vocab, dtype, blocks[:2, :64])
    if env.main and args.json:
        report = {"model": args.model, "library": "peft" if args.peft else "fastpeft", "trainer": args.trainer,
                  "world_size": env.world_size, "fsdp": args.fsdp, "dtype": str(dtype), "vocab_size": vocab,
                  "losses": losses, "mean_step_s": mean_step, "step_s": times, "reload_ok": ok, "output_dir": out_dir}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if env.distributed:
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
