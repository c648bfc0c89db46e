"""``ServingEngine``: batched generation, each request (batch row) with its own adapter.

Over a transformers causal LM into which fastpeft injected ``FastLoRALinear`` layers:
each request names its own adapter (or None for the base model), from an attached
``AdapterPool`` or from the layers themselves; greedy or seeded sampling; the model's own
KV cache. Every step runs inside one ``fastpeft.batch_adapters`` block, so the mixed
layers run the fused mixed-adapter kernel over one batch plan. On a GPU the decode step
runs over static buffers and a transformers ``StaticCache`` and is replayed from a CUDA
graph (``fastpeft.serving.graphs``); elsewhere (CPU, the Triton interpreter, models
without static-cache support, ``cuda_graphs=False``) it runs eagerly over the model's
own cache. Prompts are token ids, or text when the engine has a tokenizer (then the
output carries the decoded text too).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from fastpeft.core.state import batch_adapters
from fastpeft.kernels.runtime import interpreter_active
from fastpeft.methods.lora.layer import FastLoRALinear
from fastpeft.serving.graphs import Capture, StaticDecode, capture_cuda_graph, supports_static_decode
from fastpeft.serving.pool import AdapterPool
from fastpeft.serving.text import Prompts, decode_text, encode_prompts, progress_bar

__all__ = ["ServingEngine", "GenerationOutput"]


@dataclass
class GenerationOutput:
    """What :meth:`ServingEngine.generate` returns, one row per prompt.

    ``sequences``: ``(B, P + T)`` token ids, the left-padded prompts then the new tokens;
    ``new_tokens``: ``(B, T)`` the new tokens (``pad_token_id`` after a row's EOS);
    ``prompt_lengths``: each prompt's length in tokens, without padding;
    ``text``: with a tokenizer, each row's new tokens decoded (up to its EOS, special
    tokens skipped); None without one."""

    sequences: torch.Tensor
    new_tokens: torch.Tensor
    prompt_lengths: List[int]
    text: Optional[List[str]] = None


def _left_pad(
    input_ids: Union[torch.Tensor, Sequence[Sequence[int]]],
    attention_mask: Optional[torch.Tensor],
    pad_id: int,
    device: torch.device,
) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """Prompts as a left-padded ``(B, P)`` batch and its mask, from a tensor (+ mask, any
    padding side) or a list of token lists of any lengths."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            rows = [r.tolist() for r in input_ids]
        else:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
                )
            rows = []
            for ids, m in zip(input_ids.tolist(), attention_mask.tolist()):
                keep = [i for i, v in enumerate(m) if v]
                if keep and keep != list(range(keep[0], keep[-1] + 1)):
                    raise ValueError("attention_mask must mark one contiguous run of tokens per row (left or right padding)")
                rows.append([ids[i] for i in keep])
    else:
        rows = [list(map(int, r)) for r in input_ids]
    if not rows:
        raise ValueError("generate needs at least one prompt")
    lengths = [len(r) for r in rows]
    if min(lengths) == 0:
        raise ValueError("every prompt needs at least one token")
    P = max(lengths)
    ids = torch.full((len(rows), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), P), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, P - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, P - len(r):] = 1
    return ids.to(device), mask.to(device), lengths


def _filter_logits(logits: torch.Tensor, top_k: Optional[int], top_p: Optional[float]) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering of ``(B, V)`` fp32 logits (as transformers)."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
    return logits


@dataclass
class _Sampling:
    """How the next token is chosen: greedy, or sampled (temperature, top-k, top-p), each
    row from its own seeded generator when ``gens`` is set."""

    do_sample: bool
    temperature: float
    top_k: Optional[int]
    top_p: Optional[float]
    gens: Optional[List[torch.Generator]] = None

    @classmethod
    def checked(cls, do_sample: bool, temperature: float, top_k: Optional[int], top_p: Optional[float]) -> "_Sampling":
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"top_k must be a non-negative integer or None, got {top_k!r}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        return cls(do_sample, temperature, top_k, top_p)

    def seed_rows(self, seed: Union[int, Sequence[int]], B: int, device: torch.device) -> None:
        seeds = [int(seed)] * B if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != B:
            raise ValueError(f"seed must be one int or one per prompt ({B}), got {len(seeds)}")
        self.gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def next_token(self, logits: torch.Tensor) -> torch.Tensor:
        """``(B,)`` tokens from ``(B, V)`` fp32 logits."""
        if not self.do_sample:
            return logits.argmax(-1)
        probs = _filter_logits(logits / self.temperature, self.top_k, self.top_p).softmax(-1)
        if self.gens is None:
            return torch.multinomial(probs, 1).squeeze(1)
        return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.gens)])


class ServingEngine:
    """Batched generation, each request with its own LoRA adapter.

    Args:
        model: a transformers causal LM (``model(input_ids, attention_mask=...,
            position_ids=..., past_key_values=..., use_cache=True)`` returning ``logits``
            and ``past_key_values``) with fastpeft ``FastLoRALinear`` layers, in eval mode.
        pool: the :class:`AdapterPool` serving the adapters; None: adapter names refer to
            the adapters the layers hold themselves (``fastpeft.inject``/``load_adapter``).
        pad_token_id: default: the model config's, else the EOS token, else 0.
        eos_token_id: ``"model"`` (default): the model's generation config; None: never stop
            early; an int or a list of ints.
        cuda_graphs: True (default): replay the decode step from a CUDA graph where it can
            (a CUDA model with transformers static-cache support, compiled kernels), else
            decode eagerly; False: always eagerly. A callable ``capture(step) -> replay``
            runs the static-buffer path with it in place of the CUDA-graph capture (on
            any device; ``lambda step: step`` replays by calling the step).
        tokenizer: optional; then prompts may be text and :class:`GenerationOutput` has
            ``text``. Any object with ``tokenizer(text)["input_ids"]`` and
            ``decode(ids, skip_special_tokens=True)`` (a transformers tokenizer). Its
            ``pad_token_id`` is the default pad when the model config names none.
    """

    def __init__(
        self,
        model: nn.Module,
        pool: Optional[AdapterPool] = None,
        *,
        pad_token_id: Optional[int] = None,
        eos_token_id: Any = "model",
        cuda_graphs: Union[bool, Capture] = True,
        tokenizer: Any = None,
    ) -> None:
        if not (isinstance(cuda_graphs, bool) or callable(cuda_graphs)):
            raise TypeError(f"cuda_graphs must be True, False or a capture function, got {cuda_graphs!r}")
        self.cuda_graphs = cuda_graphs
        self._static: Optional[StaticDecode] = None
        self.model = model
        self.pool = pool
        self.tokenizer = tokenizer
        self.layers = [m for m in model.modules() if isinstance(m, FastLoRALinear)]
        if not self.layers:
            raise ValueError("the model has no FastLoRALinear layers: inject LoRA first (fastpeft.inject)")
        cfg = getattr(model, "generation_config", None) or getattr(model, "config", None)
        self.eos_token_id = getattr(cfg, "eos_token_id", None) if eos_token_id == "model" else eos_token_id
        if pad_token_id is None:
            pad_token_id = getattr(cfg, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None)
        if pad_token_id is None:
            eos = self.eos_token_id
            pad_token_id = (eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else 0
        self.pad_token_id = int(pad_token_id)
        # transformers renamed ``past_key_values`` to ``cache`` (5.x); take what forward has.
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def _check_names(self, names: Sequence[Optional[str]]) -> None:
        for n in names:
            if n is not None and not isinstance(n, str):
                raise TypeError(f"adapter names must be strings or None, got {n!r}")
        wanted = {n for n in names if n is not None}
        if self.pool is not None:
            unknown = sorted(n for n in wanted if n not in self.pool)
            if unknown:
                raise KeyError(f"adapters {unknown} are not loaded in the pool; loaded: {self.pool.adapters}")
        else:
            held = set().union(*(layer.adapter_names for layer in self.layers))
            unknown = sorted(wanted - held)
            if unknown:
                raise KeyError(f"adapters {unknown} are held by no layer of the model; it has {sorted(held)}")

    def _capture(self, device: torch.device) -> Optional[Capture]:
        """How the decode step is replayed: a capture function, or None to decode eagerly."""
        if not isinstance(self.cuda_graphs, bool):
            if not supports_static_decode(self.model):
                raise ValueError("cuda_graphs: this model does not run with a transformers StaticCache")
            return self.cuda_graphs
        if self.cuda_graphs and device.type == "cuda" and not interpreter_active() and supports_static_decode(self.model):
            return capture_cuda_graph
        return None

    def _eager_logits(self, ids: torch.Tensor, mask: torch.Tensor) -> Iterator[torch.Tensor]:
        """The next-token logits ``(B, V)`` of each step over the model's own cache: the
        prompts' first, then one step per token sent in."""
        step_ids, step_pos = ids, (mask.cumsum(-1) - 1).clamp_min(0)
        past = None
        while True:
            out = self.model(
                input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True,
                **{self._cache_kw: past},
            )
            past = getattr(out, self._cache_kw, None)
            if past is None:
                past = out.past_key_values
            tok = yield out.logits[:, -1, :]
            step_ids = tok[:, None]
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)

    def _static_logits(self, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int,
                       capture: Capture) -> Iterator[torch.Tensor]:
        """As :meth:`_eager_logits`, over static buffers (``graphs.StaticDecode``): the
        prefill and the first decode step eagerly (that step compiles and tunes every
        kernel), then ``capture`` of the step, replayed for every later token."""
        (B, P), dtype = ids.shape, next(self.model.parameters()).dtype
        if self._static is None or not self._static.fits(B, P + new_tokens, ids.device, dtype):
            self._static = None  # free the old buffers first
            self._static = StaticDecode(self.model, self._cache_kw, B, StaticDecode.slots_for(P + new_tokens),
                                        ids.device, dtype)
        static = self._static
        tok = yield static.prefill(ids, mask)
        static.advance(tok)
        static.step()
        replay = capture(static.step)
        while True:
            tok = yield static.logits[:, -1, :]
            static.advance(tok)
            replay()

    def _decode(self, ids: torch.Tensor, mask: torch.Tensor, new: torch.Tensor, sampling: _Sampling, pad: int,
                eos_t: Optional[torch.Tensor], bar: Any = None) -> None:
        """Fill ``new`` (``(B, T)``) with the tokens generated after the prompts ``ids``;
        ``bar``: a progress bar advanced once per step."""
        capture = self._capture(ids.device)
        steps = self._eager_logits(ids, mask) if capture is None else self._static_logits(ids, mask, new.shape[1], capture)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for t in range(new.shape[1]):
            logits = next(steps) if t == 0 else steps.send(tok)
            tok = sampling.next_token(logits.float())
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            new[:, t] = tok
            if bar is not None:
                bar.update(1)
            if eos_t is not None:
                done = done | torch.isin(tok, eos_t)
                if bool(done.all()):
                    break

    @torch.inference_mode()
    def generate(
        self,
        input_ids: Prompts,
        adapter_names: Sequence[Optional[str]],
        max_new_tokens: int,
        *,
        attention_mask: Optional[torch.Tensor] = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        seed: Optional[Union[int, Sequence[int]]] = None,
        eos_token_id: Any = "engine",
        pad_token_id: Optional[int] = None,
        progress: bool = False,
    ) -> GenerationOutput:
        """Generate ``max_new_tokens`` per prompt, row ``i`` with adapter ``adapter_names[i]``.

        Prompts of different lengths are left-padded (``attention_mask`` marks the real
        tokens of a padded tensor, either side); positions count real tokens only, so a
        request gives the same tokens alone or in any batch. Greedy by default; with
        ``do_sample`` the logits are divided by ``temperature``, filtered by ``top_k`` /
        ``top_p`` and sampled, each row from its own generator seeded with ``seed`` (one
        int for all rows, or one per row): a seeded request samples the same tokens
        alone or batched. Generation of a row stops at ``eos_token_id`` (default: the
        engine's; None: never) and ``pad_token_id`` fills the rest.

        ``input_ids``: a ``(B, P)`` tensor, lists of token ids, or, when the engine has a
        tokenizer, a string or a list of strings. ``progress=True`` shows a tqdm bar over
        the decode steps. Returns a :class:`GenerationOutput`.
        """
        if self.model.training or any(layer.training for layer in self.layers):
            raise RuntimeError("ServingEngine.generate runs the model in eval mode: call model.eval() first")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        sampling = _Sampling.checked(do_sample, temperature, top_k, top_p)
        pad = self.pad_token_id if pad_token_id is None else int(pad_token_id)
        eos = self.eos_token_id if eos_token_id == "engine" else eos_token_id
        eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
        device = next(self.model.parameters()).device
        ids, mask, lengths = _left_pad(encode_prompts(input_ids, self.tokenizer), attention_mask, pad, device)
        B = ids.shape[0]
        names = list(adapter_names)
        if len(names) != B:
            raise ValueError(f"got {B} prompts but {len(names)} adapter names; give one name (or None) per prompt")
        self._check_names(names)
        if do_sample and seed is not None:
            sampling.seed_rows(seed, B, device)

        new = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
        eos_t = torch.tensor(eos_ids, dtype=torch.long, device=device) if eos_ids else None
        # One plan for the whole generation: an attached pool marks the rows' adapters
        # used once and holds them in use until the block ends.
        bar = progress_bar(max_new_tokens, progress)
        try:
            with batch_adapters(self.model, names):
                self._decode(ids, mask, new, sampling, pad, eos_t, bar)
        finally:
            if bar is not None:
                bar.close()
        text = None if self.tokenizer is None else decode_text(self.tokenizer, new, eos_ids)
        return GenerationOutput(sequences=torch.cat([ids, new], dim=1), new_tokens=new, prompt_lengths=lengths,
                                text=text)
