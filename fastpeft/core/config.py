"""The config fields every method shares, read and written as PEFT's ``adapter_config.json``.

``AdapterConfig`` holds the fields every injected method shares (which modules to
target, which to train in full); a method subclasses it with its own fields and a
``peft_type``. ``to_dict()`` gives the JSON PEFT writes, ``from_dict()`` reads it back:
fields this version does not know (from newer PEFT releases) are kept in ``extra`` and
written out again, never fatal.
"""
from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Union

__all__ = ["AdapterConfig", "TargetSpec", "config_to_plain", "norm_targets", "pattern_key"]

TargetSpec = Optional[Union[List[str], str]]

def _plain(value: Any) -> Any:
    """JSON-friendly copy of a config value: enums to their value, sets/tuples to lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(_plain(k)): _plain(v) for k, v in value.items()}
    return value


def config_to_plain(config: Any) -> Dict[str, Any]:
    """``config.to_dict()`` of a fastpeft or ``peft`` config (or a dict) as plain JSON values."""
    if isinstance(config, dict):
        return _plain(dict(config))
    to_dict = getattr(config, "to_dict", None)
    if not callable(to_dict):
        raise TypeError(
            f"expected a fastpeft or peft config (an object with to_dict()), got {type(config).__name__}"
        )
    return _plain(dict(to_dict()))


@dataclass
class AdapterConfig:
    """Fields shared by every injected method (PEFT's names and defaults).

    Subclasses set the class attribute ``peft_type`` (``"LORA"``, ``"IA3"``, ...) and add
    their own dataclass fields. Unknown keys met by ``from_dict`` land in ``extra``.
    """

    peft_type: ClassVar[str] = ""

    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    layers_to_transform: Optional[Union[List[int], int]] = None
    layers_pattern: Optional[Union[List[str], str]] = None
    modules_to_save: Optional[List[str]] = None
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    extra: Dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.target_modules = norm_targets(self.target_modules, "target_modules")
        self.exclude_modules = norm_targets(self.exclude_modules, "exclude_modules")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                self.modules_to_save = [self.modules_to_save]
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.layers_to_transform, (list, tuple, set)):
            self.layers_to_transform = [int(i) for i in self.layers_to_transform]
        if isinstance(self.target_modules, str) and (
            self.layers_to_transform is not None or self.layers_pattern is not None
        ):
            raise ValueError(
                "layers_to_transform and layers_pattern apply only when target_modules is a list of "
                "names, not a regex string (as in PEFT): list the module names instead"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform (the layer indices to adapt), as in PEFT")
        if isinstance(self.task_type, enum.Enum):
            self.task_type = self.task_type.value

    # ------------------------------------------------------------------ dict I/O

    def to_dict(self) -> Dict[str, Any]:
        """The ``adapter_config.json`` content: PEFT's keys, plus any kept unknown keys."""
        out: Dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            out[f.name] = _plain(getattr(self, f.name))
        out["peft_type"] = self.peft_type
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "AdapterConfig":
        """Build from an ``adapter_config.json`` dict (or ``peft_config.to_dict()``).

        Raises ``ValueError`` when ``peft_type`` names another method; keys this class
        does not know are kept in ``extra``.
        """
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
        data = _plain(data)
        peft_type = data.get("peft_type", cls.peft_type)
        if str(peft_type).upper() != cls.peft_type:
            raise ValueError(f"{cls.__name__} reads peft_type {cls.peft_type!r}, got {peft_type!r}")
        known = {f.name for f in dataclasses.fields(cls) if f.init and f.name != "extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known and k not in ("peft_type", "extra")}
        extra.update(data.get("extra") or {})
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_peft(cls, config: Any) -> "AdapterConfig":
        """Convert a ``peft`` config object (anything with ``to_dict()``)."""
        return cls.from_dict(config_to_plain(config))


def norm_targets(value: TargetSpec, what: str) -> TargetSpec:
    if value is None or isinstance(value, str):
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{what} {value!r} is not a valid regular expression: {exc}") from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        names = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        if not all(isinstance(n, str) for n in names):
            raise TypeError(f"{what} must be a list of module-name strings or a regex string, got {value!r}")
        return names
    raise TypeError(f"{what} must be a list of module names or a regex string, got {type(value).__name__}")


def pattern_key(patterns: Mapping[str, Any], module_name: str) -> Optional[str]:
    """PEFT's ``get_pattern_key``: the first key whose regex matches the end of the
    module path (after a dot, or the whole path); None when none does."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None
