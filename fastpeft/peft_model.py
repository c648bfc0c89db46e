"""PEFT's model object, ``get_peft_model`` and ``FastPeftModel``, over fastpeft's functional API.

A PEFT user writes::

    model = fp.get_peft_model(model, fp.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    model.print_trainable_parameters()
    ...  # train
    model.save_pretrained("out")                      # a directory peft.PeftModel loads
    model = fp.FastPeftModel.from_pretrained(base, "out")
    out = model.generate(input_ids=ids, adapter_names=["default", "__base__"], max_new_tokens=8)

Each method is a thin call of the functional API (``fp.inject``, ``fp.load_adapter``,
``fp.save_adapter``, ``fp.set_adapter``, ``fp.batch_adapters``, ``fp.merge``, ...), which
stays usable on the same model: the adapters' state lives on the adapted model itself, the
wrapper holds none but the ``disable_adapter`` flag.

Differences from PEFT, all deliberate:

* ``base_model`` is the adapted model itself (PEFT's is a tuner that holds it as
  ``.model``, or the model itself for prompt learning); ``get_base_model()`` returns it in
  both libraries. Parameter names are the model's, under ``base_model.``.
* Methods that cannot merge (soft prompts, LLaMA-Adapter, bottleneck adapters) raise
  ``ValueError`` from ``merge_adapter``/``merge_and_unload`` (PEFT: ``AttributeError`` for
  prompt learning); ``unload`` removes them (PEFT has no ``unload`` there).
* ``adapter_names=`` also mixes prompt-tuning/P-tuning adapters per row (PEFT passes it on
  to the base model, which refuses it).
* ``save_pretrained`` writes the adapter files only (no ``README.md`` model card).
* Parameter counts are the model's flags and tensors as they are: a prompt-learning
  adapter loaded with ``is_trainable=False`` is frozen (PEFT 0.21 leaves it trainable,
  and refuses ``is_trainable=True`` for it, which fastpeft allows); an inactive
  LLaMA-Adapter counts (PEFT keeps it outside the module tree); AdaLoRA's ``ranknum`` is
  a number, not one frozen one-element parameter per layer as in PEFT.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch.nn as nn

from fastpeft.core.checkpoint import load_adapter, save_adapter
from fastpeft.core.config import AdapterConfig
from fastpeft.core.inject import inject
from fastpeft.core.method import adapter_configs, method_of
from fastpeft.core import state

__all__ = ["FastPeftModel", "get_peft_model"]

PathLike = Union[str, "os.PathLike[str]"]


class FastPeftModel(nn.Module):
    """An adapted model with PEFT's ``PeftModel`` methods, same names and meanings.

    Calls and attributes the wrapper does not define (``config``, ``device``,
    ``generation_config``, ``gradient_checkpointing_enable``, ...) go to the model.
    Build it with :func:`get_peft_model` or :meth:`from_pretrained`; ``FastPeftModel(model)``
    wraps a model that already holds fastpeft adapters.
    """

    def __init__(self, model: nn.Module) -> None:
        if isinstance(model, FastPeftModel):
            raise TypeError("the model is already a FastPeftModel")
        if not adapter_configs(model):
            raise ValueError(
                "the model holds no fastpeft adapter: use fastpeft.get_peft_model(model, config) "
                "or fastpeft.FastPeftModel.from_pretrained(model, path)"
            )
        super().__init__()
        self.base_model = model
        self.training = model.training
        self._adapters_disabled = False
        self._disabled_adapter: Optional[str] = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":  # not yet set: no recursion
                raise
            return getattr(self.base_model, name)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        *,
        autocast_adapter_dtype: bool = True,
        backend: str = "auto",
    ) -> "FastPeftModel":
        """Load a PEFT adapter directory into ``model`` (``fastpeft.load_adapter``), as
        ``peft.PeftModel.from_pretrained``: frozen and in eval mode unless ``is_trainable``."""
        load_adapter(
            model, model_id, adapter_name, is_trainable=is_trainable, backend=backend,
            autocast_adapter_dtype=autocast_adapter_dtype,
        )
        wrapped = cls(model)
        if not is_trainable:
            wrapped.eval()
        return wrapped

    def add_adapter(self, adapter_name: str, peft_config: Any, low_cpu_mem_usage: bool = False) -> None:
        """Add a new adapter, inactive (``set_adapter`` activates it), as PEFT.
        ``low_cpu_mem_usage`` is accepted for PEFT's signature; adapters are built directly."""
        inject(self.base_model, peft_config, adapter_name)

    def load_adapter(
        self,
        model_id: PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        *,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Load another PEFT adapter directory under ``adapter_name`` (inactive; frozen and
        the model in eval mode unless ``is_trainable``), as PEFT."""
        load_adapter(
            self.base_model, model_id, adapter_name, is_trainable=is_trainable,
            autocast_adapter_dtype=autocast_adapter_dtype,
        )
        if not is_trainable:
            self.eval()

    # ------------------------------------------------------------------ adapters

    @property
    def peft_config(self) -> Dict[str, AdapterConfig]:
        """``{adapter name: config}``, in the order the adapters were added."""
        return adapter_configs(self.base_model)

    @property
    def active_adapter(self) -> Optional[str]:
        """The active adapter's name (also inside ``disable_adapter()``, as PEFT)."""
        if self._adapters_disabled:
            return self._disabled_adapter
        return state.active_adapter(self.base_model)

    @property
    def active_adapters(self) -> List[str]:
        name = self.active_adapter
        return [] if name is None else [name]

    def _known(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} not found; the model has {list(self.peft_config)}")

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Activate ``adapter_name``: it trains (frozen with ``inference_mode``), the others are frozen."""
        self._known(adapter_name)
        self._refuse_while_disabled("set_adapter")
        state.set_adapter(self.base_model, adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; if it was active, the first remaining one becomes active."""
        self._known(adapter_name)
        self._refuse_while_disabled("delete_adapter")
        state.delete_adapter(self.base_model, adapter_name)

    def _refuse_while_disabled(self, what: str) -> None:
        if self._adapters_disabled:
            raise RuntimeError(f"{what} inside `with model.disable_adapter():` is not supported; leave the block first")

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model runs as the base model (a merged adapter is unmerged
        first, as PEFT's forward does); on exit the active adapter is back with the same
        trainable flags."""
        if self._adapters_disabled:
            yield
            return
        model = self.base_model
        name = state.active_adapter(model)
        # set_adapter(None) leaves the flags alone, but re-activating would reset them:
        # the flags are put back as they were instead.
        flags = [(p, p.requires_grad) for p in model.parameters()]
        state.set_adapter(model, None)
        self._disabled_adapter, self._adapters_disabled = name, True
        try:
            yield
        finally:
            self._adapters_disabled, self._disabled_adapter = False, None
            if name is not None and name in adapter_configs(model):
                state.set_adapter(model, name)
            for p, flag in flags:
                p.requires_grad_(flag)

    # ------------------------------------------------------------------ counting

    def get_nb_trainable_parameters(self) -> Tuple[int, int]:
        """``(trainable parameters, all parameters)``; a tensor shared by two modules counts once."""
        return state.trainable_parameters(self.base_model)

    def print_trainable_parameters(self) -> None:
        """PEFT's line: ``trainable params: N || all params: M || trainable%: P``."""
        state.print_trainable_parameters(self.base_model)

    # ------------------------------------------------------------------ saving

    def save_pretrained(
        self,
        save_directory: PathLike,
        safe_serialization: bool = True,
        selected_adapters: Optional[Sequence[str]] = None,
        is_main_process: bool = True,
    ) -> None:
        """Write each adapter (default: all) as a PEFT directory: ``"default"`` in
        ``save_directory``, any other under ``save_directory/<name>``, as PEFT lays them
        out (``PeftModel.from_pretrained(base, save_directory)``, then
        ``load_adapter(save_directory/<name>, <name>)``). Nothing is written unless
        ``is_main_process``."""
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(
                f"selected_adapters {unknown} are not adapters of the model; it has {list(self.peft_config)}"
            )
        if not is_main_process:
            return
        for name in names:
            path = save_directory if name == "default" else os.path.join(save_directory, name)
            save_adapter(self.base_model, path, name, safe_serialization=safe_serialization)

    # ------------------------------------------------------------------ merging

    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        """Fold ``adapter_names`` (default: the active adapter) into the base weights;
        ``unmerge_adapter`` takes them out again. All adapters or none: an adapter that
        cannot merge (or, with ``safe_merge``, gives NaN/inf) leaves nothing merged by this call."""
        names = self._merge_names(adapter_names)
        done: List[str] = []
        try:
            for name in names:
                state.merge(self.base_model, name, safe_merge=safe_merge)
                done.append(name)
        except BaseException:
            for name in reversed(done):
                for _, layer in state.adapter_layers(self.base_model):
                    if name in getattr(layer, "merged_adapters", ()):
                        layer.unmerge(name)
            raise

    def _merge_names(self, adapter_names: Optional[Sequence[str]]) -> List[str]:
        if adapter_names is None:
            active = self.active_adapter
            names = [] if active is None else [active]
        elif isinstance(adapter_names, str):
            raise TypeError(f"adapter_names must be a list of names, got the string {adapter_names!r}")
        else:
            names = list(adapter_names)
        for name in names:
            self._known(name)
            method = method_of(self.peft_config[name])
            if not method.merges:
                raise ValueError(
                    f"adapter {name!r} ({method.peft_type}) cannot be merged into the base weights; "
                    "unload() removes it without merging"
                )
        return names

    def unmerge_adapter(self) -> None:
        """Take every merged adapter out of the base weights."""
        state.unmerge(self.base_model)

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None
    ) -> nn.Module:
        """Merge ``adapter_names`` (default: the active adapter) and return the plain model,
        with no adapter layers left (PEFT's meaning; use the returned model, not this
        wrapper). ``progressbar`` is accepted for PEFT's signature."""
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        return state.unload(self.base_model, merge_adapter=False)

    def unload(self) -> nn.Module:
        """Return the plain model without merging: adapter layers removed (adapters merged
        earlier with ``merge_adapter`` stay in the weights, as in PEFT)."""
        return state.unload(self.base_model, merge_adapter=False)

    def get_base_model(self) -> nn.Module:
        """The adapted model (its adapters in place), as PEFT's ``get_base_model``."""
        return self.base_model

    # ------------------------------------------------------------------ running

    @contextlib.contextmanager
    def _rows(self, adapter_names: Optional[Sequence[Optional[str]]]) -> Iterator[None]:
        """PEFT's ``adapter_names=``: one adapter per batch row (``"__base__"`` or None:
        the base model); ignored inside ``disable_adapter()``, as in PEFT."""
        if adapter_names is None or self._adapters_disabled:
            yield
            return
        with state.batch_adapters(self.base_model, list(adapter_names)):
            yield

    def forward(
        self,
        *args: Any,
        input_ids: Any = None,
        attention_mask: Any = None,
        labels: Any = None,
        inputs_embeds: Any = None,
        position_ids: Any = None,
        token_type_ids: Any = None,
        adapter_names: Optional[Sequence[Optional[str]]] = None,
        **kwargs: Any,
    ) -> Any:
        """The model's forward; ``adapter_names``: one adapter per batch row (eval mode).

        The usual inputs are named (keyword-only, passed on when given) because Hugging
        Face's ``Trainer`` keeps only the dataset columns that the model's ``forward``
        names (``remove_unused_columns=True``), as PEFT's model classes name them."""
        named = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, inputs_embeds=inputs_embeds,
                     position_ids=position_ids, token_type_ids=token_type_ids)
        kwargs.update({key: value for key, value in named.items() if value is not None})
        with self._rows(adapter_names):
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Optional[Sequence[Optional[str]]] = None, **kwargs: Any) -> Any:
        """The model's ``generate``; ``adapter_names``: one adapter per prompt (eval mode).
        With beam search each name covers its prompt's ``num_beams`` rows, as in PEFT."""
        num_beams = kwargs.get("num_beams")
        if adapter_names is not None and isinstance(num_beams, int) and num_beams > 1:
            if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
                raise TypeError(f"adapter_names must be a list with one name per prompt, got {adapter_names!r}")
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        with self._rows(adapter_names):
            return self.base_model.generate(*args, **kwargs)


def get_peft_model(
    model: nn.Module,
    peft_config: Any,
    adapter_name: str = "default",
    *,
    autocast_adapter_dtype: bool = True,
    backend: str = "auto",
) -> FastPeftModel:
    """Inject ``peft_config`` (a fastpeft or ``peft`` config, or its dict) into ``model``
    as ``adapter_name`` (``fastpeft.inject``) and return the :class:`FastPeftModel`, as
    ``peft.get_peft_model``: the base frozen, the adapter trainable."""
    if isinstance(model, FastPeftModel):
        raise TypeError("get_peft_model expects the plain model; this one is already a FastPeftModel (use add_adapter)")
    inject(model, peft_config, adapter_name, backend=backend, autocast_adapter_dtype=autocast_adapter_dtype)
    return FastPeftModel(model)
