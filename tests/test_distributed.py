"""Training across 2 CPU processes (gloo) with DDP and FSDP2 (``fastpeft.distributed``).

One spawn of 2 worker processes trains the tiny Llama's LoRA adapter for 3 AdamW steps
with DDP, then with FSDP2 (base and adapters sharded), each rank on its half of a fixed
global batch; the test process trains the same adapter on the whole global batch. The
adapters must agree within fp32 rounding, and the adapter saved from the sharded run
must load into fastpeft and into ``peft`` (and, before sharding, into a model that is
sharded again) with the sharded run's logits. The workers inherit ``TRITON_INTERPRET=1``
from conftest, so the fused kernels run (counted) on plain tensors under FSDP2.
"""
from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastpeft as fp
from fastpeft import distributed as fdist
from fastpeft.core.checkpoint import read_adapter_weights
from fastpeft.core.state import adapter_tensors
from tiny_models import VOCAB, tiny_llama

WORLD, STEPS, ROWS, SEQ = 2, 3, 4, 8
# Two adapted layers (attention and MLP shapes) in the second block only: the first block
# is a sharded unit with no trainable tensor. Few layers, as each interpreted launch is slow.
CONFIG = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "up_proj"],
          "layers_to_transform": [1]}


def _lora_model() -> torch.nn.Module:
    return fp.inject(tiny_llama(seed=0).train(), fp.LoraConfig(**CONFIG))


def _global_batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)


def _sample() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))


def _train(model: torch.nn.Module, rows: slice) -> None:
    """3 AdamW steps on ``rows`` of each global batch (optimizer made after wrapping)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for step in range(STEPS):
        ids = _global_batch(step)[rows]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=_sample()).logits


def _spy_layers(seen: dict) -> None:
    """Count fused-kernel launches and the weight types the LoRA layers hand the op."""
    from fastpeft.kernels import lora as kernels
    from fastpeft.methods.lora import layer

    real_fwd, real_op = kernels.lora_linear_fwd, layer.lora_linear_unchecked

    def fwd(*args, **kwargs):
        seen["launches"] += 1
        return real_fwd(*args, **kwargs)

    def op(x, weight, *args, **kwargs):
        seen["weights"].add(type(weight).__name__)
        return real_op(x, weight, *args, **kwargs)

    kernels.lora_linear_fwd, layer.lora_linear_unchecked = fwd, op


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    env = fdist.init_distributed("cpu")
    seen = {"launches": 0, "weights": set()}
    _spy_layers(seen)
    rows = slice(rank * ROWS // WORLD, (rank + 1) * ROWS // WORLD)
    results = {}

    ddp = fdist.wrap_ddp(_lora_model(), env)
    _train(ddp, rows)
    results["ddp"] = fdist.full_adapter_state(ddp)
    fdist.save_adapter(ddp, os.path.join(out, "ddp_adapter"))

    sharded = fdist.shard_fsdp2(_lora_model())
    results["sharded_params"] = sorted({type(p.data).__name__ for p in sharded.parameters()})
    _train(sharded, rows)
    results["fsdp"] = fdist.full_adapter_state(sharded)
    fdist.save_adapter(sharded, os.path.join(out, "fsdp_adapter"))
    results["fsdp_logits"] = _logits(sharded)

    # Resuming: the saved adapter loads into a fresh model, which is then sharded.
    again = tiny_llama(seed=0)
    fp.load_adapter(again, os.path.join(out, "fsdp_adapter"))
    results["reloaded_sharded_logits"] = _logits(fdist.shard_fsdp2(again))
    results["seen"] = {"launches": seen["launches"], "weights": sorted(seen["weights"])}
    if env.main:
        torch.save(results, os.path.join(out, "results.pt"))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-process run (DDP then FSDP2) and the single-process run on the same data."""
    out = str(tmp_path_factory.mktemp("distributed"))
    procs = mp.start_processes(_worker, args=(_free_port(), out), nprocs=WORLD, start_method="spawn", join=False)
    deadline = time.monotonic() + 600  # a hung collective fails the test instead of hanging the suite
    while not procs.join(timeout=1):  # re-raises a worker's exception
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail("the 2-process run did not finish in 600 s")
    results = torch.load(os.path.join(out, "results.pt"), weights_only=False)
    single = _lora_model()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: tiny matmuls, and threads only spin-wait on a busy machine
    try:
        _train(single, slice(None))
    finally:
        torch.set_num_threads(threads)
    results["single"] = {k: t.detach().clone() for k, t in adapter_tensors(single, "default").items()}
    results["single_model"] = single
    results["dir"] = os.path.join(out, "fsdp_adapter")
    results["ddp_dir"] = os.path.join(out, "ddp_adapter")
    return results


def _assert_same_adapter(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    init = {k: t.detach() for k, t in adapter_tensors(_lora_model(), "default").items()}
    for key, value in want.items():
        assert not torch.equal(value, init[key]), f"{key} did not train"
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


def test_workers_ran_the_fused_kernels_on_plain_tensors(runs):
    assert runs["seen"]["launches"] > 0, "the Triton kernel never ran in the workers"
    # FSDP2 shards every parameter into a DTensor, yet hands the layers plain tensors.
    assert runs["sharded_params"] == ["DTensor"]
    assert runs["seen"]["weights"] == ["Parameter"]


def test_ddp_adapter_equals_single_process(runs):
    _assert_same_adapter(runs["ddp"], runs["single"])
    saved = read_adapter_weights(runs["ddp_dir"])  # written by rank 0 from inside the DDP wrapper
    assert saved.keys() == {"base_model.model." + k for k in runs["ddp"]}
    for key, value in runs["ddp"].items():
        assert torch.equal(saved["base_model.model." + key], value)


def test_fsdp2_adapter_equals_single_process(runs):
    _assert_same_adapter(runs["fsdp"], runs["single"])


def test_adapter_saved_from_sharded_run_loads_in_fastpeft_and_peft(runs):
    from peft import PeftModel

    want = runs["fsdp_logits"]
    torch.testing.assert_close(_logits(runs["single_model"]), want, rtol=1e-4, atol=1e-5)
    mine = tiny_llama(seed=0)
    fp.load_adapter(mine, runs["dir"])
    torch.testing.assert_close(_logits(mine), want, rtol=1e-5, atol=1e-5)
    theirs = PeftModel.from_pretrained(tiny_llama(seed=0), runs["dir"])
    torch.testing.assert_close(_logits(theirs), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runs["reloaded_sharded_logits"], want, rtol=1e-5, atol=1e-5)


def test_shard_fsdp2_without_a_process_group_is_a_clear_error():
    with pytest.raises(RuntimeError, match="process group"):
        fdist.shard_fsdp2(_lora_model())


def test_single_process_needs_no_process_group(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    env = fdist.init_distributed("cpu")
    assert (env.rank, env.world_size, env.main, env.distributed) == (0, 1, True, False)
    model = _lora_model()
    assert fdist.wrap_ddp(model, env) is model and fdist.unwrap(model) is model


@pytest.mark.parametrize("var, value, device, error", [
    ("WORLD_SIZE", "two", "cpu", "WORLD_SIZE must be an integer"),
    ("WORLD_SIZE", "1", "tpu", "device must be 'cuda' or 'cpu'"),
])
def test_init_distributed_bad_settings_are_clear_errors(monkeypatch, var, value, device, error):
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=error):
        fdist.init_distributed(device)
