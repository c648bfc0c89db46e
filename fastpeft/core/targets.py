"""Finding the modules an adapter targets, and swapping modules atomically.

The matching rules are PEFT's (``check_target_module_exists``), so one config selects
the same modules in fastpeft as in PEFT:

* ``target_modules`` as a **string** is a regex that must match the *whole* module path
  (``re.fullmatch``); ``"all-linear"`` means every ``nn.Linear``/``Conv1D`` except the
  output head (``model.get_output_embeddings()``, or for sequence classification the
  ``score``/``classifier`` head).
* as a **list**, a module matches when its path equals an entry or ends with
  ``"." + entry``; then ``layers_to_transform`` (int or list of ints) keeps only the
  modules whose layer index is in it. The index is the first number that follows a
  ``layers_pattern`` segment (``"layers"``, ``"h"``, ...), or, without a pattern, the
  first ``<name>.<number>.`` in the path.
* ``exclude_modules``: a regex string (full match) or a list (equal or suffix); an
  excluded module is never targeted. Modules under a ``modules_to_save`` name are not
  targeted either (they are trained in full instead).
"""
from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch.nn as nn

__all__ = [
    "ALL_LINEAR",
    "model_type_of",
    "peft_table",
    "find_targets",
    "is_target",
    "linear_types",
    "replace_modules",
    "parent_of",
    "named_modules_of",
]

ALL_LINEAR = "all-linear"
_SEQ_CLS_HEADS = ("score", "classifier")

Names = Optional[Union[Sequence[str], str]]


def linear_types() -> Tuple[type, ...]:
    """``nn.Linear`` plus transformers' GPT-2 style ``Conv1D`` when transformers is installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers missing or broken: plain Linear only
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def _layer_index(name: str, layers_pattern: Names) -> Optional[int]:
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return None if match is None else int(match.group("idx"))


def _excluded(name: str, exclude_modules: Names, modules_to_save: Optional[Sequence[str]]) -> bool:
    if exclude_modules:
        if isinstance(exclude_modules, str):
            if re.fullmatch(exclude_modules, name):
                return True
        elif name in exclude_modules or any(name.endswith(f".{key}") for key in exclude_modules):
            return True
    if modules_to_save:
        if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save):
            return True
    return False


def is_target(
    name: str,
    target_modules: Names,
    exclude_modules: Names = None,
    layers_to_transform: Optional[Union[int, Sequence[int]]] = None,
    layers_pattern: Names = None,
    modules_to_save: Optional[Sequence[str]] = None,
) -> bool:
    """Whether the module at path ``name`` is targeted (PEFT's rules, see the module doc).

    ``target_modules`` must already be resolved (not ``"all-linear"``: use ``find_targets``).
    """
    if target_modules is None or _excluded(name, exclude_modules, modules_to_save):
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    if name in target_modules:
        return True
    found = any(name.endswith(f".{key}") for key in target_modules)
    using_indexes = layers_to_transform is not None and (
        len(layers_to_transform) != 0 if isinstance(layers_to_transform, (list, tuple)) else True
    )
    if found and using_indexes:
        index = _layer_index(name, layers_pattern)
        if index is None:
            return False
        if isinstance(layers_to_transform, int):
            return index == layers_to_transform
        return index in layers_to_transform
    return found


def _all_linear_names(model: nn.Module, task_type: Optional[str], skip_types: Tuple[type, ...]) -> List[str]:
    kinds = linear_types()

    def linear_like(module: nn.Module) -> bool:
        # An adapter layer counts (it wraps a linear); a modules_to_save wrapper counts
        # only around a linear (not around an embedding or a whole block).
        if isinstance(module, kinds):
            return True
        if isinstance(module, skip_types):
            inner = getattr(module, "original_module", None)
            return inner is None or isinstance(inner, kinds)
        return False

    names = {name for name, module in model.named_modules() if name and linear_like(module)}
    head_names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None:
        head_names |= {name for name, module in model.named_modules() if module is head}
    elif task_type is not None and str(task_type).upper() == "SEQ_CLS":
        for attr in _SEQ_CLS_HEADS:
            module = getattr(model, attr, None)
            if isinstance(module, nn.Module):
                head_names |= {name for name, m in model.named_modules() if m is module}
                break
    # Never reach inside an already-adapted layer (its lora_A/lora_B are Linear-like).
    inside = set()
    for prefix, module in model.named_modules():
        if prefix and isinstance(module, skip_types):
            inside |= {f"{prefix}.{sub}" for sub, _ in module.named_modules() if sub}
    return sorted(names - head_names - inside)


def _describe(model: nn.Module, skip_types: Tuple[type, ...] = (), limit: int = 12) -> str:
    """A short list of the model's module names, Linear-like ones first, for error messages."""
    kinds = linear_types() + tuple(skip_types)
    linear, leaves, inside = set(), set(), []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        short = name.rsplit(".", 1)[-1]
        if isinstance(module, kinds):
            linear.add(short)
            if skip_types and isinstance(module, tuple(skip_types)):
                inside.append(name)
        elif not any(True for _ in module.children()):
            leaves.add(short)
    names = sorted(linear) + sorted(leaves - linear)
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return f"module names in this model include: {shown}"


def find_targets(
    model: nn.Module,
    target_modules: Names,
    exclude_modules: Names = None,
    layers_to_transform: Optional[Union[int, Sequence[int]]] = None,
    layers_pattern: Names = None,
    *,
    modules_to_save: Optional[Sequence[str]] = None,
    task_type: Optional[str] = None,
    adapted_types: Tuple[type, ...] = (),
) -> List[str]:
    """Paths (``model.named_modules()`` names) of the modules an adapter targets, in
    model order. Raises ``ValueError`` naming the problem when nothing matches.

    ``adapted_types``: layer classes of already-injected adapters; ``"all-linear"``
    includes them (to add a second adapter) but never the Linear-like modules inside them.
    """
    if target_modules is None:
        kind = model_type_of(model)
        raise ValueError(
            f"target_modules is not set and there is no default for this model "
            f"({'model_type ' + repr(kind) if kind else 'not a transformers model'}): name the modules to adapt, "
            f"e.g. target_modules=['q_proj', 'v_proj'], a regex, or 'all-linear' "
            f"({_describe(model, tuple(adapted_types))})"
        )
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        candidates = _all_linear_names(model, task_type, tuple(adapted_types))
        names = [n for n in candidates if not _excluded(n, exclude_modules, modules_to_save)]
        if not names:
            raise ValueError(
                f"target_modules='all-linear' matched no Linear/Conv1D layer "
                f"({_describe(model, tuple(adapted_types))})"
            )
        return names
    names: List[str] = []
    inside: List[str] = []
    for name, module in model.named_modules():
        if not name:
            continue
        outer = next((p for p in inside if name.startswith(p + ".")), None)
        if outer is not None:
            if name.startswith(outer + ".base_layer.") and is_target(
                name, target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save
            ):
                # A module another method's layer wraps (an attention block, say): adapting
                # it from inside the wrapper would be skipped silently or break that layer.
                raise ValueError(
                    f"target {name!r} lies inside {outer!r}, which another adapter wraps "
                    f"({type(dict(model.named_modules())[outer]).__name__}); one module takes adapters of one "
                    "method only: narrow target_modules (exclude_modules) or adapt it in another model"
                )
            continue
        if is_target(name, target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save):
            names.append(name)
        if adapted_types and isinstance(module, tuple(adapted_types)):
            inside.append(name)
    if not names:
        detail = f"target_modules={target_modules!r}"
        if layers_to_transform is not None:
            detail += f" with layers_to_transform={layers_to_transform!r}, layers_pattern={layers_pattern!r}"
        if exclude_modules:
            detail += f" minus exclude_modules={exclude_modules!r}"
        raise ValueError(f"{detail} matched no module of the model ({_describe(model, tuple(adapted_types))})")
    return names


def parent_of(model: nn.Module, name: str, *, must_exist: bool = True) -> Tuple[nn.Module, str]:
    """``(parent module, attribute name)`` of the submodule at path ``name`` (with
    ``must_exist=False``, of a submodule that may not exist yet)."""
    if not name:
        raise ValueError("cannot replace the root module itself")
    parent_name, _, attr = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        raise KeyError(f"the model has no module {parent_name!r} (parent of {name!r})") from None
    if must_exist and attr not in parent._modules:
        raise KeyError(f"the model has no module {name!r}")
    if not must_exist and attr not in parent._modules and hasattr(parent, attr):
        raise ValueError(f"cannot add a module at {name!r}: {type(parent).__name__} has an attribute {attr!r}")
    return parent, attr


def replace_modules(
    model: nn.Module, new_modules: Mapping[str, Optional[nn.Module]], *, add: bool = False
) -> Dict[str, Optional[nn.Module]]:
    """Swap the submodules at the given paths for new ones, all or nothing.

    Every path is checked (it exists, the new value is an ``nn.Module``) before any swap,
    so a bad entry leaves the model untouched. Returns ``{path: old module}``; passing
    that back to ``replace_modules`` undoes the swap. A path inside another replaced path
    is refused (the order of the two swaps would be ambiguous). With ``add=True`` a path
    may also name a new child (its old module is None) and a None value removes a child:
    the returned map undoes those too.
    """
    plan = []
    paths = sorted(new_modules)
    for i, name in enumerate(paths):
        module = new_modules[name]
        if not isinstance(module, nn.Module) and not (add and module is None):
            raise TypeError(f"replacement for {name!r} must be an nn.Module, got {type(module).__name__}")
        if i + 1 < len(paths) and paths[i + 1].startswith(name + "."):
            raise ValueError(f"cannot replace both {name!r} and {paths[i + 1]!r}: one is inside the other")
        parent, attr = parent_of(model, name, must_exist=not add)
        plan.append((name, parent, attr, module))
    old: Dict[str, Optional[nn.Module]] = {}
    for name, parent, attr, module in plan:
        old[name] = parent._modules.get(attr)
        if module is None:
            parent._modules.pop(attr, None)
        else:
            setattr(parent, attr, module)
    return old


def named_modules_of(model: nn.Module, types: Iterable[type]) -> List[Tuple[str, nn.Module]]:
    """``(path, module)`` of every submodule that is an instance of one of ``types``."""
    types = tuple(types)
    if not types:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, types)]


# --------------------------------------------------------------------- defaults


def model_type_of(model: nn.Module) -> Optional[str]:
    """The transformers ``config.model_type`` of ``model`` (None for other modules)."""
    return getattr(getattr(model, "config", None), "model_type", None)


def peft_table(name: str) -> Optional[Mapping[str, Any]]:
    """A per-architecture table of the installed peft (``peft.utils.constants.<name>``),
    e.g. its default targets; None without peft. Methods fall back to their own copy."""
    try:
        from peft.utils import constants
    except ImportError:
        return None
    return getattr(constants, name, None)
