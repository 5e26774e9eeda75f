"""Detectors: which layer (or head) is suspect at each step, as registered objects.

A :class:`Detector` has a ``name``, a ``level`` (``layer``: scores ``[S, L]``; ``head``: ``[S, L, H]``),
a ``family`` (``liae``: the paper's detectors; ``uniform``: the detectors the paper argues against;
``iaf``: head focus; ``random``: a control), the direction of its raw score, declared once
(``higher="suspect"`` or ``higher="better"``; :meth:`Detector.suspect` always returns higher =
more suspect), and the cache fields it reads.  Diagnosis, the localisation study, calibration,
the trigger study and the localisation verdict select detectors by level and family
(:func:`select`), never by hand-kept lists.

The shipped detectors live one family per file in this package (:mod:`.liae`, :mod:`.uniform`,
:mod:`.heads`, :mod:`.control`); every module here is imported with the package, so a new
detector is one new file (``docs/extending.md``).  A detector that needs a per-step summary the
cache does not hold registers it with :func:`dleaf_analysis.cache.register_field` in the same file.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

import pandas as pd
import torch

LEVELS = ("layer", "head")
FAMILIES = ("liae", "uniform", "iaf", "random")


@dataclass(frozen=True)
class Detector:
    """One registered detector (see the module doc)."""

    name: str
    level: str
    family: str
    fn: Callable  # (cache, seed) -> raw scores [S, L] or [S, L, H]
    higher: str = "suspect"  # what a higher raw score means: "suspect" or "better"
    fields: tuple[str, ...] = ("image_attn",)
    doc: str = ""

    def scores(self, cache, seed: int = 0) -> torch.Tensor:
        """Raw scores (direction: :attr:`higher`)."""
        for f in self.fields:
            cache.field(f)  # a clear error if the cache lacks it
        return self.fn(cache, seed)

    def suspect(self, cache, seed: int = 0) -> torch.Tensor:
        """Scores with higher = more suspect (the sign applied here, once)."""
        s = self.scores(cache, seed)
        return s if self.higher == "suspect" else -s


REGISTRY: dict[str, Detector] = {}


def register(name: str, level: str, family: str, higher: str = "suspect", fields: tuple[str, ...] = ("image_attn",)):
    """Decorator: register ``fn(cache, seed) -> scores`` as a detector."""
    if level not in LEVELS:
        raise ValueError(f"detector level must be one of {LEVELS}, got {level!r}")
    if family not in FAMILIES:
        raise ValueError(f"detector family must be one of {FAMILIES}, got {family!r}")
    if higher not in ("suspect", "better"):
        raise ValueError(f"higher must be 'suspect' or 'better', got {higher!r}")

    def deco(fn):
        key = f"{level}:{name}"
        if key in REGISTRY and REGISTRY[key].fn.__qualname__ != fn.__qualname__:
            raise ValueError(f"a {level} detector named {name!r} is already registered")
        REGISTRY[key] = Detector(name, level, family, fn, higher, tuple(fields), (fn.__doc__ or "").strip())
        return fn
    return deco


def select(level: str | None = None, family: str | tuple[str, ...] | None = None,
           exclude: tuple[str, ...] = ()) -> list[Detector]:
    """Registered detectors of a level and family (in registration order)."""
    fams = (family,) if isinstance(family, str) else family
    return [d for d in REGISTRY.values() if (level is None or d.level == level)
            and (fams is None or d.family in fams) and d.name not in exclude]


def names(level: str | None = None, family: str | tuple[str, ...] | None = None) -> list[str]:
    return [d.name for d in select(level, family)]


def get(name: str, level: str = "layer") -> Detector:
    key = f"{level}:{name}"
    if key not in REGISTRY:
        raise ValueError(f"unknown {level} detector {name!r}; choose one of {names(level)}")
    return REGISTRY[key]


def diagnose(cache, seed: int = 0) -> pd.DataFrame:
    """Tidy table of every layer detector: ``step, token, layer, detector, family, score, rank``
    (score: higher = more suspect; rank 0 = the most suspect layer at that step)."""
    frames = []
    for det in select("layer"):
        sc = det.suspect(cache, seed)
        rank = sc.argsort(-1, descending=True).argsort(-1)
        S, L = sc.shape
        frames.append(pd.DataFrame({
            "step": torch.arange(S).repeat_interleave(L).numpy(),
            "layer": torch.arange(L).repeat(S).numpy(),
            "detector": det.name, "family": det.family,
            "score": sc.reshape(-1).numpy(),
            "rank": rank.reshape(-1).numpy(),
        }))
    df = pd.concat(frames, ignore_index=True)
    tokens = pd.DataFrame({"step": range(cache.n_steps), "token": cache.token_strs})
    return tokens.merge(df, on="step")


_SHIPPED = ("liae", "uniform", "heads", "control")  # in this order (tables list detectors in registration order)
for _m in list(_SHIPPED) + sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _SHIPPED):
    importlib.import_module(f"{__name__}.{_m}")  # every detector file of the package registers itself
