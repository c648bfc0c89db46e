"""LoraConfig JSON and target matching, checked against PEFT's own behaviour."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import fastpeft as fp  # noqa: E402
from fastpeft.core.method import as_config  # noqa: E402
from fastpeft.core.targets import find_targets, is_target  # noqa: E402

from tiny_models import BUILDERS  # noqa: E402

TARGET_CASES = [
    ("llama", dict(target_modules=["q_proj", "v_proj"])),
    ("llama", dict(target_modules="all-linear")),
    ("llama", dict(target_modules="all-linear", exclude_modules=r".*layers\.0\..*")),
    ("llama", dict(target_modules=r".*\.(gate|up)_proj")),
    ("llama", dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1])),
    ("llama", dict(target_modules=["q_proj", "down_proj"], layers_to_transform=0, layers_pattern="layers")),
    ("llama", dict(target_modules=["self_attn.q_proj", "mlp.up_proj"], exclude_modules=["layers.1.mlp.up_proj"])),
    ("llama", dict(target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"])),
    ("gpt2", dict(target_modules="all-linear")),
    ("gpt2", dict(target_modules=["c_attn", "c_fc"], layers_to_transform=[0], layers_pattern=["h"])),
    ("bert", dict(target_modules="all-linear")),
    ("bert", dict(target_modules="all-linear", task_type="SEQ_CLS")),
    ("bert", dict(target_modules=["query", "dense"], exclude_modules=["pooler.dense"])),
]


@pytest.mark.parametrize("kind, cfg", TARGET_CASES)
def test_targets_match_peft(kind, cfg):
    pm = peft.get_peft_model(BUILDERS[kind](0), peft.LoraConfig(r=2, **cfg))
    expected = sorted(
        n for n, m in pm.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)
    )
    config = fp.LoraConfig(r=2, **cfg)
    model = BUILDERS[kind](0)
    names = find_targets(
        model, config.target_modules, config.exclude_modules, config.layers_to_transform, config.layers_pattern,
        modules_to_save=config.modules_to_save, task_type=config.task_type,
    )
    assert sorted(names) == expected
    fp.inject(model, config)
    got = sorted(n for n, m in model.named_modules() if isinstance(m, fp.FastLoRALinear))
    assert got == expected


def test_rank_and_alpha_patterns_match_peft():
    cfg = dict(
        target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], r=4, lora_alpha=8,
        rank_pattern={"k_proj": 2, r"model\.layers\.1\.self_attn\.q_proj": 6, "down": 3},
        alpha_pattern={"v_proj": 5, r"layers\.0\.mlp\.down_proj": 1},
    )
    pm = peft.get_peft_model(BUILDERS["llama"](0), peft.LoraConfig(**cfg))
    model = fp.inject(BUILDERS["llama"](0), fp.LoraConfig(**cfg))
    ours = {n: m for n, m in model.named_modules() if isinstance(m, fp.FastLoRALinear)}
    for name, m in pm.base_model.model.named_modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            layer = ours[name]
            assert layer.adapters["default"].r == m.r["default"], name
            assert layer.scaling == pytest.approx(m.scaling["default"]), name


def test_is_target_rules():
    assert is_target("model.layers.0.self_attn.q_proj", ["q_proj"])
    assert not is_target("model.layers.0.self_attn.xq_proj", ["q_proj"])
    assert is_target("model.layers.0.self_attn.q_proj", r".*q_proj")
    assert not is_target("model.layers.0.self_attn.q_proj", r"q_proj")  # regex: full match
    assert not is_target("model.layers.0.self_attn.q_proj", ["q_proj"], exclude_modules=["self_attn.q_proj"])
    assert is_target("model.layers.1.self_attn.q_proj", ["q_proj"], layers_to_transform=1)
    assert not is_target("model.layers.1.self_attn.q_proj", ["q_proj"], layers_to_transform=[0])
    assert not is_target("model.lm_head", ["lm_head"], layers_to_transform=[0])  # no layer index
    assert is_target("lm_head", ["lm_head"], layers_to_transform=[0])  # PEFT: an exact name skips the index test
    assert not is_target("model.layers.0.mlp.up_proj", ["up_proj"], modules_to_save=["mlp"])


def test_config_json_round_trip_with_peft(tmp_path):
    ours = fp.LoraConfig(
        r=6, lora_alpha=12, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
        alpha_pattern={"q_proj": 3}, use_rslora=True, bias="lora_only",
        modules_to_save=["lm_head"], layers_to_transform=[0, 1], layers_pattern="layers",
        init_lora_weights="gaussian", lora_dropout=0.05,
    )
    data = json.loads(json.dumps(ours.to_dict()))
    assert data["peft_type"] == "LORA"
    theirs = peft.PeftConfig.from_peft_type(**data)
    assert isinstance(theirs, peft.LoraConfig)
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "bias", "lora_bias",
                "modules_to_save", "layers_to_transform", "layers_pattern", "init_lora_weights", "lora_dropout"):
        assert getattr(theirs, key) == getattr(ours, key), key
    assert set(theirs.target_modules) == set(ours.target_modules)
    back = as_config(theirs)
    assert isinstance(back, fp.LoraConfig)
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "bias", "init_lora_weights"):
        assert getattr(back, key) == getattr(ours, key)
    # PEFT's own adapter_config.json reads back, its extra fields kept and written out again.
    theirs.save_pretrained(str(tmp_path))
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg = fp.LoraConfig.from_dict(raw)
    assert cfg.extra["megatron_core"] == "megatron.core"
    assert cfg.to_dict()["megatron_core"] == "megatron.core"
    assert set(cfg.to_dict()) >= set(raw)


def test_config_defaults_match_peft():
    theirs, ours = peft.LoraConfig(), fp.LoraConfig()
    for key in ("r", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora", "init_lora_weights",
                "rank_pattern", "alpha_pattern", "lora_bias", "use_dora", "target_modules", "exclude_modules",
                "modules_to_save", "layers_to_transform", "layers_pattern"):
        assert getattr(theirs, key) == getattr(ours, key), key


def test_wrong_peft_type_for_class():
    with pytest.raises(ValueError, match="reads peft_type 'LORA'"):
        fp.LoraConfig.from_dict({"peft_type": "IA3"})
    with pytest.raises(TypeError, match="to_dict"):
        as_config(42)


def test_print_trainable_parameters(capsys):
    model = fp.inject(BUILDERS["llama"](0), fp.LoraConfig(r=2, target_modules=["q_proj"]))
    fp.print_trainable_parameters(model)
    trainable, total = fp.trainable_parameters(model)
    assert trainable == 2 * 2 * (32 * 2 + 32 * 2) // 2  # 2 layers x (A: 2x32 + B: 32x2)
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in capsys.readouterr().out
    torch.testing.assert_close(torch.tensor(trainable), torch.tensor(256))


# ------------------------------------------------------------------ default targets

from fastpeft.core import targets as targets_mod  # noqa: E402
from fastpeft.methods.ia3.method import IA3_DEFAULTS  # noqa: E402
from fastpeft.methods.lora.method import LORA_DEFAULTS  # noqa: E402


def test_builtin_default_tables_equal_peft():
    """The built-in tables (used when peft is not installed) say what peft says."""
    from peft.utils import constants

    for model_type, names in LORA_DEFAULTS.items():
        assert names == list(constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type]), model_type
    for model_type, (names, ff) in IA3_DEFAULTS.items():
        assert names == list(constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[model_type]), model_type
        assert ff == list(constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[model_type]), model_type


def _adapted(model, layer_type):
    return sorted(n for n, m in model.named_modules() if isinstance(m, layer_type))


@pytest.mark.parametrize("with_peft_tables", [True, False], ids=["peft-tables", "builtin-tables"])
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_unset_targets_take_peft_defaults(kind, with_peft_tables, monkeypatch, tmp_path):
    if not with_peft_tables:
        monkeypatch.setattr(targets_mod, "peft_table", lambda name: None)
    theirs = peft.get_peft_model(BUILDERS[kind](), peft.LoraConfig(r=4))
    ours = fp.inject(BUILDERS[kind](), fp.LoraConfig(r=4))
    peft_names = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                        if isinstance(m, peft.tuners.lora.LoraLayer))
    assert _adapted(ours, fp.FastLoRALinear) == peft_names and peft_names
    theirs = peft.get_peft_model(BUILDERS[kind](), peft.IA3Config())
    ours = fp.inject(BUILDERS[kind](), fp.IA3Config())
    peft_ia3 = {n.removeprefix("base_model.model."): m.is_feedforward for n, m in theirs.named_modules()
                if isinstance(m, peft.tuners.ia3.IA3Layer)}
    assert {n: m.is_feedforward for n, m in ours.named_modules() if isinstance(m, fp.IA3Linear)} == peft_ia3
    fp.save_adapter(ours, tmp_path)  # the resolved targets are saved, as peft saves them
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == sorted(theirs.peft_config["default"].target_modules)


def test_unset_targets_without_a_default_name_the_model_type():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no default for this model \\(not a transformers model\\)"):
        fp.inject(model, fp.LoraConfig())
    assert isinstance(model[0], torch.nn.Linear)
