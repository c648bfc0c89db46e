"""fastpeft against the real ``peft`` and ``transformers`` on tiny random models.

Adapters are made by PEFT with ``init_lora_weights=False`` (random A and B, so the
adapter changes the output) and saved with ``save_pretrained``; fastpeft must load them
and give PEFT's logits (fp32, relative error <= 1e-5), and the reverse.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import fastpeft as fp  # noqa: E402
from fastpeft.kernels import lora as lora_kernels  # noqa: E402
from fastpeft.methods.lora.layer import FastLoRALinear  # noqa: E402
from fastpeft.core.modules_to_save import ModulesToSaveWrapper  # noqa: E402
from fastpeft.core.state import adapter_tensors  # noqa: E402

from conftest import DEVICE, ON_GPU  # noqa: E402
from numerics import rel_err  # noqa: E402
from tiny_models import BUILDERS, input_ids, logits  # noqa: E402

TOL = 1e-5

CASES = {
    "llama-basic": ("llama", dict(target_modules=["q_proj", "v_proj"])),
    "llama-patterns-rslora": (
        "llama",
        dict(
            target_modules=["q_proj", "k_proj", "down_proj"],
            rank_pattern={"down_proj": 2, r"layers\.1\.self_attn\.k_proj": 6},
            alpha_pattern={r"layers\.0\.self_attn\.q_proj": 3},
            use_rslora=True,
        ),
    ),
    "llama-bias-all-lora-bias": (
        "llama",
        dict(target_modules=["q_proj", "o_proj"], bias="all", lora_bias=True),
    ),
    "llama-lora-only-modules-to-save": (
        "llama",
        dict(target_modules=["v_proj", "gate_proj"], bias="lora_only", modules_to_save=["lm_head"]),
    ),
    "llama-regex": ("llama", dict(target_modules=r".*\.layers\.1\..*_proj")),
    "llama-all-linear-exclude": ("llama", dict(target_modules="all-linear", exclude_modules=["up_proj"])),
    "llama-layers-to-transform": (
        "llama",
        dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1], layers_pattern="layers"),
    ),
    "gpt2-conv1d": ("gpt2", dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, bias="lora_only")),
    "gpt2-all-linear": ("gpt2", dict(target_modules="all-linear", fan_in_fan_out=True)),
    "gpt2-bias-all-lora-bias": ("gpt2", dict(target_modules=["c_fc"], fan_in_fan_out=True, bias="all", lora_bias=True)),
    "bert-regex-classifier": (
        "bert",
        dict(target_modules=r".*\.(query|value)", modules_to_save=["classifier"], bias="all"),
    ),
}


def _model(kind: str, seed: int = 0):
    return BUILDERS[kind](seed).to(DEVICE)


def _peft_adapter(tmp_path, kind: str, cfg: dict, name: str = "peft_adapter", seed: int = 0, r: int = 4):
    """Make an adapter with PEFT, save it; return (dir, PEFT's logits on the base seed 0)."""
    torch.manual_seed(seed + 100)
    pm = peft.get_peft_model(_model(kind), peft.LoraConfig(r=r, init_lora_weights=False, **cfg)).eval()
    path = tmp_path / name
    pm.save_pretrained(str(path))
    return path, pm


@pytest.fixture
def triton_calls(monkeypatch):
    """Counts launches of the fused Triton LoRA kernel (proves the kernel path ran)."""
    calls = []
    real = lora_kernels.lora_linear_fwd

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_kernels, "lora_linear_fwd", spy)
    return calls


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_with_same_logits(tmp_path, case, triton_calls):
    kind, cfg = CASES[case]
    path, pm = _peft_adapter(tmp_path, kind, cfg)
    ids = input_ids().to(DEVICE)
    ref = logits(pm, ids)
    model = fp.load_adapter(_model(kind), path)
    targeted = {n for n, m in pm.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    ours = {n for n, m in model.named_modules() if isinstance(m, FastLoRALinear)}
    assert ours == targeted
    out = logits(model, ids)
    assert rel_err(out, ref) <= TOL
    assert rel_err(out, logits(_model(kind), ids)) > 1e-3, "adapter is a no-op: the test would prove nothing"
    assert len(triton_calls) > 0, "the fused Triton kernel did not run"
    assert not model.training


@pytest.mark.parametrize("case", ["llama-bias-all-lora-bias", "llama-lora-only-modules-to-save", "gpt2-conv1d",
                                  "bert-regex-classifier"])
def test_fastpeft_adapter_loads_in_peft(tmp_path, case):
    kind, cfg = CASES[case]
    model = fp.inject(_model(kind), fp.LoraConfig(r=4, init_lora_weights=False, **cfg))
    model.eval()
    ids = input_ids().to(DEVICE)
    ours = logits(model, ids)
    fp.save_adapter(model, tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(_model(kind), str(tmp_path / "ours")).eval()
    assert rel_err(logits(pm, ids), ours) <= TOL
    assert rel_err(ours, logits(_model(kind), ids)) > 1e-3


def test_bin_checkpoint_loads(tmp_path):
    kind, cfg = CASES["llama-patterns-rslora"]
    torch.manual_seed(3)
    pm = peft.get_peft_model(_model(kind), peft.LoraConfig(r=4, init_lora_weights=False, **cfg)).eval()
    pm.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").exists()
    ids = input_ids().to(DEVICE)
    model = fp.load_adapter(_model(kind), tmp_path / "bin")
    assert rel_err(logits(model, ids), logits(pm, ids)) <= TOL
    fp.save_adapter(model, tmp_path / "bin2", safe_serialization=False)
    back = peft.PeftModel.from_pretrained(_model(kind), str(tmp_path / "bin2")).eval()
    assert rel_err(logits(back, ids), logits(pm, ids)) <= TOL


def test_peft_config_object_is_accepted(tmp_path):
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, lora_alpha=16)
    model = fp.inject(_model("llama"), cfg, adapter_name="x")
    config = model.fastpeft_config["x"]
    assert isinstance(config, fp.LoraConfig)
    assert (config.r, config.lora_alpha, sorted(config.target_modules)) == (4, 16, ["q_proj", "v_proj"])
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, FastLoRALinear) and layer.scaling == 4.0


def test_trainable_counts_match_peft():
    cfg = dict(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], bias="lora_only")
    pm = peft.get_peft_model(_model("llama"), peft.LoraConfig(**cfg))
    model = fp.inject(_model("llama"), fp.LoraConfig(**cfg))
    assert fp.trainable_parameters(model) == pm.get_nb_trainable_parameters()


def test_merge_unmerge_and_unload(tmp_path):
    kind, cfg = CASES["llama-bias-all-lora-bias"]
    path, pm = _peft_adapter(tmp_path, kind, cfg)
    ids = input_ids().to(DEVICE)
    ref = logits(pm, ids)
    model = fp.load_adapter(_model(kind), path)
    unmerged = logits(model, ids)
    fp.merge(model)
    assert all(m.merged for m in model.modules() if isinstance(m, FastLoRALinear))
    assert rel_err(logits(model, ids), unmerged) <= TOL
    fp.unmerge(model)
    assert not any(m.merged for m in model.modules() if isinstance(m, FastLoRALinear))
    assert rel_err(logits(model, ids), unmerged) <= TOL
    plain = fp.unload(model)
    assert not any(isinstance(m, (FastLoRALinear, ModulesToSaveWrapper)) for m in plain.modules())
    assert all(type(m) is torch.nn.Linear for n, m in plain.named_modules() if n.endswith("_proj"))
    assert rel_err(logits(plain, ids), ref) <= TOL
    merged_ref = pm.merge_and_unload()
    assert rel_err(logits(plain, ids), logits(merged_ref, ids)) <= TOL


def test_unload_gpt2_and_modules_to_save(tmp_path):
    path, pm = _peft_adapter(tmp_path, *CASES["gpt2-conv1d"])
    ids = input_ids().to(DEVICE)
    plain = fp.unload(fp.load_adapter(_model("gpt2"), path))
    from transformers.pytorch_utils import Conv1D

    assert isinstance(plain.transformer.h[0].attn.c_attn, Conv1D)
    assert rel_err(logits(plain, ids), logits(pm, ids)) <= TOL

    path, pm = _peft_adapter(tmp_path, *CASES["bert-regex-classifier"], name="bert")
    plain = fp.unload(fp.load_adapter(_model("bert"), path))
    assert type(plain.classifier) is torch.nn.Linear
    assert rel_err(logits(plain, ids), logits(pm, ids)) <= TOL


def test_mixed_batch_matches_peft_adapter_names(tmp_path, triton_calls):
    cfg_a = dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    cfg_b = dict(target_modules=["v_proj", "up_proj"], modules_to_save=["lm_head"])
    path_a, _ = _peft_adapter(tmp_path, "llama", cfg_a, name="a", seed=1)
    path_b, _ = _peft_adapter(tmp_path, "llama", cfg_b, name="b", seed=2, r=2)
    pm = peft.PeftModel.from_pretrained(_model("llama"), str(path_a), adapter_name="a")
    pm.load_adapter(str(path_b), adapter_name="b")
    pm.eval()
    rows = ["a", "__base__", "b", "a", None]
    ids = input_ids(batch=len(rows)).to(DEVICE)
    with torch.no_grad():
        ref = pm(input_ids=ids, adapter_names=["__base__" if r is None else r for r in rows]).logits

    model = fp.load_adapter(_model("llama"), path_a, adapter_name="a")
    fp.load_adapter(model, path_b, adapter_name="b")
    before = logits(model, ids)
    with fp.batch_adapters(model, rows):
        out = logits(model, ids)
    assert rel_err(out, ref) <= TOL
    # Each row equals that adapter run alone.
    for name in ("a", "b", None):
        fp.set_adapter(model, name)
        alone = logits(model, ids)
        for i, r in enumerate(rows):
            if r == name or (name is None and r in (None, "__base__")):
                assert rel_err(out[i], alone[i]) <= TOL
    # State restored after the block.
    fp.set_adapter(model, "a")
    assert all(m.row_adapters is None for m in model.modules() if hasattr(m, "row_adapters"))
    assert torch.equal(logits(model, ids), before)


def test_batch_adapters_guards(tmp_path):
    path, _ = _peft_adapter(tmp_path, "llama", CASES["llama-basic"][1])
    model = fp.load_adapter(_model("llama"), path, adapter_name="a")
    ids = input_ids(batch=2).to(DEVICE)
    with pytest.raises(ValueError, match="unknown adapter 'zzz'"):
        with fp.batch_adapters(model, ["a", "zzz"]):
            pass
    model.train()
    with pytest.raises(RuntimeError, match="eval mode"):
        with fp.batch_adapters(model, ["a", None]):
            pass
    model.eval()
    with pytest.raises(ValueError, match="batch size"):
        with fp.batch_adapters(model, ["a", None, "a"]):
            logits(model, ids)
    with pytest.raises(KeyError):
        with fp.batch_adapters(model, ["a", None]):
            raise KeyError("boom")
    assert all(m.row_adapters is None for m in model.modules() if hasattr(m, "row_adapters"))
    fp.merge(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        with fp.batch_adapters(model, ["a", None]):
            pass


def test_training_changes_only_adapter_parameters(tmp_path):
    torch.manual_seed(0)
    config = fp.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], bias="lora_only",
        lora_dropout=0.1,
    )
    model = fp.inject(_model("llama"), config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = set()
    for n, m in model.named_modules():
        if isinstance(m, FastLoRALinear):
            expected |= {f"{n}.adapters.default.lora_A", f"{n}.adapters.default.lora_B", f"{n}.bias"}
    expected |= {f"lm_head.modules_to_save.default.{k}" for k, _ in model.lm_head.original_module.named_parameters()}
    assert trainable == expected
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    ids = input_ids(batch=4).to(DEVICE)
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == (n in expected), f"{n}: changed={changed}, trainable={n in expected}"

    # The trained adapter goes to PEFT with the same logits.
    model.eval()
    ref = logits(model, ids)
    fp.save_adapter(model, tmp_path / "trained")
    pm = peft.PeftModel.from_pretrained(_model("llama"), str(tmp_path / "trained")).eval()
    assert rel_err(logits(pm, ids), ref) <= TOL
    # ...and back into fastpeft.
    again = fp.load_adapter(_model("llama"), tmp_path / "trained")
    assert rel_err(logits(again, ids), ref) <= TOL


def test_multiple_adapters_switch_and_delete(tmp_path):
    path_a, pa = _peft_adapter(tmp_path, "llama", dict(target_modules=["q_proj", "v_proj"]), name="a", seed=1)
    path_b, pb = _peft_adapter(tmp_path, "llama", dict(target_modules=["v_proj", "o_proj"]), name="b", seed=2)
    ids = input_ids().to(DEVICE)
    model = fp.load_adapter(_model("llama"), path_a, adapter_name="a")
    fp.load_adapter(model, path_b, adapter_name="b")
    assert fp.active_adapter(model) == "a"
    assert rel_err(logits(model, ids), logits(pa, ids)) <= TOL
    fp.set_adapter(model, "b")
    assert rel_err(logits(model, ids), logits(pb, ids)) <= TOL
    fp.set_adapter(model, None)
    assert rel_err(logits(model, ids), logits(_model("llama"), ids)) <= TOL
    fp.set_adapter(model, "b")
    fp.merge(model)
    assert rel_err(logits(model, ids), logits(pb, ids)) <= TOL
    fp.delete_adapter(model, "b")  # unmerges first
    assert fp.adapter_names(model) == ["a"] and fp.active_adapter(model) == "a"
    assert rel_err(logits(model, ids), logits(pa, ids)) <= TOL
    with pytest.raises(KeyError, match="no adapter named 'b'"):
        fp.set_adapter(model, "b")


def test_inject_defaults_are_a_no_op_and_gaussian_init():
    ids = input_ids().to(DEVICE)
    base = logits(_model("llama"), ids)
    model = fp.inject(_model("llama"), fp.LoraConfig(r=4, target_modules="all-linear")).eval()
    assert rel_err(logits(model, ids), base) <= TOL  # B = 0: only kernel rounding differs
    assert not isinstance(model.lm_head, FastLoRALinear)  # all-linear skips the output head
    model = fp.inject(_model("llama"), fp.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="gaussian"))
    layer = model.model.layers[0].self_attn.q_proj
    # PEFT's "gaussian": A ~ N(0, 1/r) (std 0.25 here; the default kaiming init gives ~0.1).
    assert torch.count_nonzero(layer.lora_B) == 0 and abs(layer.lora_A.std().item() - 1 / 4) < 0.05
    assert not layer.training  # takes the eval mode of the Linear it replaced


@pytest.mark.skipif(not ON_GPU, reason="CUDA-only check of dtype handling")
def test_load_into_half_model_on_gpu(tmp_path):
    path, pm = _peft_adapter(tmp_path, *CASES["llama-basic"])
    model = fp.load_adapter(_model("llama").half(), path)
    ids = input_ids().to(DEVICE)
    assert rel_err(logits(model, ids).float(), logits(pm, ids)) <= 2e-2


def test_seq_cls_task_type_adapter(tmp_path):
    """PEFT's SEQ_CLS task adds the classifier head to modules_to_save by itself."""
    pm = peft.get_peft_model(
        _model("bert"),
        peft.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights=False),
    )
    with torch.no_grad():
        for p in pm.base_model.model.classifier.modules_to_save.default.parameters():
            p.add_(0.5)
    pm.save_pretrained(str(tmp_path / "cls"))
    pm.eval()
    ids = input_ids().to(DEVICE)
    model = fp.load_adapter(_model("bert"), tmp_path / "cls")
    assert isinstance(model.classifier, ModulesToSaveWrapper)
    assert rel_err(logits(model, ids), logits(pm, ids)) <= TOL
    fp.save_adapter(model, tmp_path / "back")
    back = peft.PeftModel.from_pretrained(_model("bert"), str(tmp_path / "back")).eval()
    assert rel_err(logits(back, ids), logits(pm, ids)) <= TOL


def test_modules_to_save_wrapper_reads_through(tmp_path):
    cfg = dict(target_modules=["q_proj"], modules_to_save=["lm_head"])
    model = fp.inject(_model("llama"), fp.LoraConfig(r=2, **cfg), adapter_name="a")
    fp.inject(model, fp.LoraConfig(r=2, **cfg), adapter_name="b")
    head = model.lm_head
    assert isinstance(head, ModulesToSaveWrapper) and head.weight is head.modules_to_save["a"].weight
    assert head.out_features == 100
    fp.set_adapter(model, "b")
    assert head.weight is head.modules_to_save["b"].weight
    fp.set_adapter(model, None)
    assert head.weight is head.original_module.weight
    assert not head.original_module.weight.requires_grad


def test_generate_matches_peft(tmp_path):
    path, pm = _peft_adapter(tmp_path, *CASES["llama-lora-only-modules-to-save"])
    model = fp.load_adapter(_model("llama"), path)
    ids = input_ids(batch=2, seq=5).to(DEVICE)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), pm.generate(input_ids=ids, **kwargs))


def test_set_adapter_moves_trainability_as_peft_does():
    """PEFT's set_adapter: the active adapter trains, the others are frozen;
    inference_mode=True freezes the active one too; the base stays frozen throughout."""
    model = fp.inject(_model("llama"), fp.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "a")
    fp.inject(model, fp.LoraConfig(r=2, target_modules=["v_proj"], modules_to_save=["lm_head"]), "b")

    def trainable(name):
        return {id(t) for t in adapter_tensors(model, name).values() if t.requires_grad}

    def count(name):
        return len(adapter_tensors(model, name))

    base = [p for n, p in model.named_parameters() if "lora_" not in n and "modules_to_save" not in n]
    fp.set_adapter(model, "b")
    assert len(trainable("b")) == count("b") and not trainable("a")
    fp.set_adapter(model, "a")
    assert len(trainable("a")) == count("a") and not trainable("b")
    fp.set_adapter(model, "a", inference_mode=True)
    assert not trainable("a") and not trainable("b")
    assert not any(p.requires_grad for p in base)


# ----------------------------------------------------------------- biases of wrapped modules
# With bias="all" (or "lora_only") an adapter's checkpoint holds base biases, and PEFT
# spells the bias of a module that *another* adapter wraps after that wrapper
# (``k_proj.base_layer.bias``, ``classifier.original_module.bias``) or not
# (``k_proj.bias``), depending on which adapters the model held when it saved. Every
# spelling must load, wherever the module is wrapped now, with the outputs the adapter
# had when it was saved.

WRAPPED = {
    # kind: (adapter "first" that wraps some modules, the targets of the biased adapter "b")
    "llama": (dict(target_modules=["k_proj"]), ["q_proj", "v_proj"]),
    "bert": (dict(target_modules=["query"], modules_to_save=["classifier"]), ["value"]),
}


def _perturb_trainable_biases(model, seed):
    """Trained biases: every bias the active adapter trains moves (so saving or loading
    the wrong one shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and name.endswith("bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=g).to(p.device))


@pytest.mark.parametrize("saved_with_a", [False, True], ids=["saved-alone", "saved-beside-first"])
@pytest.mark.parametrize("bias", ["all", "lora_only"])
@pytest.mark.parametrize("kind", sorted(WRAPPED))
def test_peft_bias_adapter_loads_beside_an_adapter_that_wraps_its_modules(tmp_path, kind, bias, saved_with_a):
    a_cfg, b_targets = WRAPPED[kind]
    b_cfg = dict(r=2, target_modules=b_targets, bias=bias, init_lora_weights=False)
    torch.manual_seed(5)
    if saved_with_a:
        made = peft.get_peft_model(_model(kind), peft.LoraConfig(r=2, init_lora_weights=False, **a_cfg), "first")
        made.add_adapter("b", peft.LoraConfig(**b_cfg))
        made.set_adapter("b")
    else:
        made = peft.get_peft_model(_model(kind), peft.LoraConfig(**b_cfg), "b")
    _perturb_trainable_biases(made, seed=6)
    made.eval()
    made.save_pretrained(str(tmp_path), selected_adapters=["b"])
    path = tmp_path / "b"
    ids = input_ids().to(DEVICE)
    ref = logits(made, ids)  # the adapter's outputs as saved
    assert rel_err(ref, logits(_model(kind), ids)) > 1e-3

    # Beside an adapter that wraps those modules (the case that was refused) and alone.
    beside = fp.inject(_model(kind), fp.LoraConfig(r=2, init_lora_weights=False, **a_cfg), "first")
    fp.load_adapter(beside, path, "b")
    fp.set_adapter(beside, "b")
    assert rel_err(logits(beside, ids), ref) <= TOL
    alone = fp.load_adapter(_model(kind), path, "b")
    assert rel_err(logits(alone, ids), ref) <= TOL
    # PEFT holding the same adapters as when it saved gets it right too. (Saved alone, a
    # PeftModel that holds "first" before "b" drops the biases spelled for unwrapped
    # modules as unexpected keys; fastpeft loads them and gives the saved outputs.)
    theirs = peft.get_peft_model(_model(kind), peft.LoraConfig(r=2, **a_cfg), "first") if saved_with_a else _model(kind)
    if saved_with_a:
        theirs.load_adapter(str(path), adapter_name="b")
        theirs.set_adapter("b")
    else:
        theirs = peft.PeftModel.from_pretrained(theirs, str(path), adapter_name="b")
    assert rel_err(logits(theirs.eval(), ids), ref) <= TOL


def _fastpeft_beside_other_methods(kind):
    """A biased LoRA adapter "b" next to a LoRA adapter "first" (and, on Llama, an (IA)^3 and a
    bottleneck adapter) that wrap modules whose biases "b" saves."""
    a_cfg, b_targets = WRAPPED[kind]
    torch.manual_seed(8)
    model = fp.inject(_model(kind), fp.LoraConfig(r=2, init_lora_weights=False, **a_cfg), "first")
    if kind == "llama":
        fp.inject(model, fp.IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"]), "ia3")
        fp.inject(model, fp.BottleneckConfig(target_modules=["o_proj"], bottleneck_size=4, init_weights=False), "bn")
    fp.inject(model, fp.LoraConfig(r=2, target_modules=b_targets, bias="all", init_lora_weights=False), "b")
    fp.set_adapter(model, "b")
    _perturb_trainable_biases(model, seed=9)
    return model.eval()


@pytest.mark.parametrize("kind", sorted(WRAPPED))
def test_fastpeft_bias_adapter_saved_beside_others_loads_in_peft(tmp_path, kind):
    model = _fastpeft_beside_other_methods(kind)
    ids = input_ids().to(DEVICE)
    ours = logits(model, ids)
    fp.save_adapter(model, tmp_path, "b")
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    # Each bias once, under the module's own path; no other adapter's tensors.
    assert not any(".adapters." in k or "ia3_l" in k or ".modules_to_save." in k for k in keys), sorted(keys)
    theirs = peft.PeftModel.from_pretrained(_model(kind), str(tmp_path)).eval()
    assert rel_err(logits(theirs, ids), ours) <= TOL
    assert rel_err(logits(fp.load_adapter(_model(kind), tmp_path), ids), ours) <= TOL
    again = _fastpeft_beside_other_methods(kind)
    fp.delete_adapter(again, "b")
    fp.load_adapter(again, tmp_path, "b")
    fp.set_adapter(again, "b")
    assert rel_err(logits(again, ids), ours) <= TOL
    assert rel_err(ours, logits(_model(kind), ids)) > 1e-3
