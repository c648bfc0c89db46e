"""``ServingEngine`` with a tokenizer: text prompts in, decoded text out, a progress bar.

The tokenizer is a transformers ``PreTrainedTokenizerFast`` over a word-level vocabulary
built here (nothing is downloaded): ``[PAD]``, ``[UNK]`` and ``w2`` .. ``w99`` are the tiny
model's 100 token ids.
"""
from __future__ import annotations

import pytest
import torch

import fastpeft as fp

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from tiny_models import VOCAB, tiny_llama  # noqa: E402

PAD = 0


def word_tokenizer():
    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def words(ids):
    """The text of ``ids`` as the tokenizer decodes it (special tokens skipped)."""
    return [f"w{i}" for i in ids if i >= 2]


@pytest.fixture(scope="module")
def model():
    model = fp.inject(tiny_llama(), fp.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    fp.inject(model, fp.LoraConfig(r=3, target_modules=["q_proj"], init_lora_weights=False), "b")
    return model.eval()


TEXT = ["w5 w17 w3 w9", "w42 w7", "w11 w12 w13"]
NAMES = ["default", None, "b"]


def test_text_prompts_give_the_tokens_of_their_ids(model):
    tok = word_tokenizer()
    engine = fp.ServingEngine(model, tokenizer=tok, eos_token_id=None)
    out = engine.generate(TEXT, NAMES, max_new_tokens=3)
    ids = [tok(t)["input_ids"] for t in TEXT]
    assert ids[1] == [42, 7]  # the tokenizer is what the test thinks it is
    ref = fp.ServingEngine(model, eos_token_id=None, pad_token_id=PAD).generate(ids, NAMES, max_new_tokens=3)
    assert torch.equal(out.new_tokens, ref.new_tokens) and out.prompt_lengths == [4, 2, 3]
    assert ref.text is None
    assert [t.split() for t in out.text] == [words(row) for row in ref.new_tokens.tolist()]
    one = engine.generate("w42 w7", [None], max_new_tokens=3)  # a single string is one prompt
    assert torch.equal(one.new_tokens[0], out.new_tokens[1]) and one.text == [out.text[1]]


def test_text_stops_at_eos(model):
    tok = word_tokenizer()
    free = fp.ServingEngine(model, tokenizer=tok, eos_token_id=None).generate(TEXT[:2], NAMES[:2], max_new_tokens=4)
    eos = free.new_tokens[0, 1].item()  # row 0 emits it at step 2 (or earlier)
    out = fp.ServingEngine(model, tokenizer=tok, eos_token_id=eos).generate(TEXT[:2], NAMES[:2], max_new_tokens=4)
    for row, text in zip(out.new_tokens.tolist(), out.text):
        end = row.index(eos) + 1 if eos in row else len(row)
        assert text.split() == words(row[:end])  # the pads after EOS are not text
    assert len(out.text[0].split()) <= 2


def test_text_without_tokenizer_is_a_clear_error(model):
    engine = fp.ServingEngine(model, eos_token_id=None)
    for prompts in ("hello", ["hello", "world"]):
        with pytest.raises(TypeError, match="tokenizer="):
            engine.generate(prompts, [None] * (1 if isinstance(prompts, str) else 2), max_new_tokens=2)
    with pytest.raises(TypeError, match="all strings or all token-id lists"):
        fp.ServingEngine(model, tokenizer=word_tokenizer()).generate(["w5", [5, 6]], [None, None], max_new_tokens=2)


def test_pad_defaults_to_the_tokenizers():
    model = fp.inject(tiny_llama(), fp.LoraConfig(r=2, target_modules=["q_proj"])).eval()
    model.config.pad_token_id = None
    model.generation_config.pad_token_id = None
    tok = word_tokenizer()
    tok.pad_token = "w7"  # a word of the vocabulary
    assert fp.ServingEngine(model, tokenizer=tok).pad_token_id == 7


def test_progress_bar_counts_decode_steps(model, capsys):
    engine = fp.ServingEngine(model, eos_token_id=None)
    out = engine.generate([[5, 6], [7]], [None, "b"], max_new_tokens=3, progress=True)
    err = capsys.readouterr().err
    assert "generate" in err and "3/3" in err, err
    quiet = engine.generate([[5, 6], [7]], [None, "b"], max_new_tokens=3)
    assert "generate" not in capsys.readouterr().err
    assert torch.equal(out.new_tokens, quiet.new_tokens)
