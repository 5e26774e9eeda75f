"""The method protocol and its registry.

A method is a dataclass config (``validate``, ``to_dict``, ``from_dict``) whose
``attach(lm, inputs)`` context manager edits attention at the one hook point
(:mod:`dleaf_analysis.hooks`), restores the model on exit, and yields a :class:`RunRecord`
(what the method did, e.g. D-LEAF's firing log, filled in when the block ends).  The config is
never written to: one config can serve any number of runs.  ``decode(lm, inputs, **kw)``
returns ``(ids, record)``; ``generate`` only the ids.

A new method is one file: a subclass decorated with :func:`register` (see
``docs/extending.md``).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar, Iterator

import torch

from dleaf_analysis import hooks
from dleaf_analysis.errors import DleafError
from dleaf_analysis.models.adapters import ModelAdapter


class ConfigError(DleafError, ValueError):
    """An invalid intervention config; the message names the valid choices."""


@dataclass
class RunRecord:
    """What one attached run of a method did: ``log`` holds one dict per decision (D-LEAF: per
    (sequence, step, layer) that fired), filled in when the ``attach`` block ends."""

    method: str
    log: list[dict] = field(default_factory=list)
    decisions: list[dict] | None = None  # D-LEAF with decisions=True: every decision, fired or not


@dataclass
class Method:
    """Base of all method configs."""

    name: ClassVar[str] = "greedy"

    def validate(self, n_layers: int | None = None, n_heads: int | None = None) -> "Method":
        return self

    @property
    def prompt_rows(self) -> str:
        """Which prefill query rows need explicit attention probabilities: ``"last"`` (the
        current query only; the others keep the fast sdpa kernel) or ``"all"``."""
        return "last"

    def to_dict(self) -> dict:
        return {"method": self.name, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "Method":
        d = dict(d)
        d.pop("method", None)
        valid = {f.name: f for f in fields(cls)}
        unknown = set(d) - set(valid)
        if unknown:
            raise ConfigError(f"unknown key(s) {sorted(unknown)} for method {cls.name!r}; valid keys: {sorted(valid)}")
        for k, v in d.items():
            _check_type(cls.name, k, v, getattr(cls, k, None) if not isinstance(getattr(cls, k, None), property) else None)
        return cls(**d)

    @contextmanager
    def attach(self, lm, inputs: dict) -> Iterator[RunRecord]:
        """Edit the model for one ``generate`` call on ``inputs``; restore it afterwards."""
        yield RunRecord(self.name)

    def decode(self, lm, inputs: dict, **generate_kwargs) -> tuple[torch.Tensor, RunRecord]:
        """Decode ``inputs`` with this method attached: ``generate``'s ids ``[B, T]`` and the run record."""
        ad = ModelAdapter(lm.model)
        self.validate(ad.n_layers, ad.n_heads)
        with torch.no_grad(), hooks.prompt_rows(lm.model, self.prompt_rows), self.attach(lm, inputs) as record:
            ids = lm.model.generate(**inputs, **generate_kwargs)
        return ids, record

    def generate(self, lm, inputs: dict, **generate_kwargs) -> torch.Tensor:
        """Decode ``inputs`` with this method attached; returns ``generate``'s ids ``[B, T]``."""
        return self.decode(lm, inputs, **generate_kwargs)[0]


def _check_type(method: str, key: str, value, default) -> None:
    """Refuse silently coerced values: a string or bool where a number is expected, and so on."""
    if default is None or value is None:
        return
    ok = {bool: (bool,), int: (int,), float: (int, float), str: (str,), list: (list, tuple)}
    for typ, accepted in ok.items():
        if type(default) is typ:
            if isinstance(value, bool) and typ is not bool:
                break  # True is an int in Python; never a number here
            if isinstance(value, accepted):
                return
            break
    else:
        return
    raise ConfigError(f"method {method!r}: {key} must be {type(default).__name__}, got {json.dumps(value)} "
                      f"({type(value).__name__}); write it as in {json.dumps({key: default})}")


def check_range(name: str, v: float, lo: float, hi: float) -> None:
    if not (lo <= v <= hi):
        raise ConfigError(f"{name} must be in [{lo}, {hi}], got {v}")


def check_layers(name: str, layers, n_layers: int | None) -> None:
    if layers is None:
        return
    if not isinstance(layers, (list, tuple)) or not all(isinstance(l, int) and not isinstance(l, bool) for l in layers):
        raise ConfigError(f"{name} must be a list of layer indices, got {json.dumps(layers)}")
    if n_layers is None:
        return
    bad = [l for l in layers if not (0 <= int(l) < n_layers)]
    if bad:
        raise ConfigError(f"{name}: layer(s) {bad} out of range; the model has layers 0..{n_layers - 1}")


def default_layers(n_layers: int) -> list[int]:
    """The layers a method acts in when none are given: all but the first two."""
    return list(range(min(2, n_layers - 1), n_layers))


# -- registry ------------------------------------------------------------------------------------
METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name`` (``get_method``, ``--method``)."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered ({METHODS[cls.name].__name__})")
    METHODS[cls.name] = cls
    return cls


@register
@dataclass
class Greedy(Method):
    name: ClassVar[str] = "greedy"


def get_method(name: str, config: dict | None = None) -> Method:
    """A method config by name, with overrides from ``config``."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    if config is not None and not isinstance(config, dict):
        raise ConfigError(f"a method config must be a JSON object of settings, got {type(config).__name__}")
    return METHODS[name].from_dict(config or {}).validate()


def load_config(path: str | Path) -> dict:
    """Read a JSON method config file (``{"method": "dleaf", "gamma": 0.5, ...}``)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} does not parse as JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"config file {path} holds a JSON {type(d).__name__}; it must be an object such as "
                          '{"method": "dleaf", "gamma": 0.5}')
    return d


def method_from_dict(d: dict) -> Method:
    if "method" not in d:
        raise ConfigError(f"config has no 'method' key; choose one of {sorted(METHODS)}")
    d = dict(d)
    return get_method(d.pop("method"), d)
