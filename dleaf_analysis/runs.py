"""Run configurations that are their own manifest.

Every resumable command (``evaluate``, ``study``, ``tune``, ``reproduce``) is described by a frozen
dataclass whose :meth:`to_dict` is what the run saves as ``manifest.json`` beside its results,
together with the model's record (:meth:`~dleaf_analysis.models.loading.LoadedModel.record`:
weights hash, a content hash of its config, processor and chat-template files, dtype, device
kind) and the image source's record (:meth:`~dleaf_analysis.sources.ImageSource.record`: what
the images are and a hash of them).  One schema, one set of key names::

    {"format": 2, "run": "study", "config": {...}, "model": {...}, "source": {...}}

A directory holding another run is refused naming each differing field (``config.gamma``,
``model.files_hash``, ...) with both values; a directory written by an older version (no
``format``) is refused with that reason.  Settings that cannot change a number (batch size,
progress bars) are not part of a config, so a run resumes with another batch size.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from dleaf_analysis.errors import DleafError

FORMAT = 2
POPE_VARIANTS = ("random", "popular", "adversarial")
BENCHMARKS = ("chair", "pope")


class ManifestMismatchError(DleafError, RuntimeError):
    """An output directory that holds another run's results (or an older version's)."""


def _plain(v: Any) -> Any:
    return json.loads(json.dumps(v, sort_keys=True, default=lambda o: list(o) if isinstance(o, (set, frozenset, tuple))
                                  else str(o)))


@dataclass(frozen=True)
class RunConfig:
    """Base of the run configurations: ``to_dict`` is the manifest's ``config``."""

    run = "run"

    def to_dict(self) -> dict:
        return _plain(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        valid = {f.name for f in fields(cls)}
        unknown = set(d) - valid
        if unknown:
            raise ValueError(f"unknown {cls.run} setting(s) {sorted(unknown)}; valid: {sorted(valid)}")
        kw = {k: tuple(v) if isinstance(getattr(cls, k, None), tuple) and isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)


@dataclass(frozen=True)
class EvalConfig(RunConfig):
    """``evaluate``: a method on a benchmark over an image source."""

    run = "evaluate"
    benchmark: str = "chair"
    method: str = "greedy"
    method_config: dict = field(default_factory=dict)  # the full config the method ran with
    seed: int = 0
    max_new_tokens: int | None = None  # None: the source's caption length (3 for POPE answers)
    answer_parser: str = "official"
    pope_variants: tuple[str, ...] = POPE_VARIANTS
    n_resamples: int = 1000

    def __post_init__(self) -> None:
        if self.benchmark not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {self.benchmark!r}; choose one of {BENCHMARKS}")
        bad = [v for v in self.pope_variants if v not in POPE_VARIANTS]
        if bad:
            raise ValueError(f"unknown POPE variant(s) {bad}; choose from {POPE_VARIANTS}")


@dataclass(frozen=True)
class StudyConfig(RunConfig):
    """``study``: one registered study over the events (or images) of a source."""

    run = "study"
    study: str = "localization"
    seed: int = 0
    event_token: str = "first"
    dleaf: dict = field(default_factory=dict)  # D-LEAF's full config (the studies that use it)
    methods: dict = field(default_factory=dict)  # other methods' configs (calibration's recovery, oracle)
    options: dict = field(default_factory=dict)  # study-specific settings (faults, exact-patching budget, ...)


@dataclass(frozen=True)
class TuneConfig(RunConfig):
    """``tune``: the tuning study (same budget per method) and its confirmation."""

    run = "tune"
    seed: int = 0
    max_recall_drop: float = 3.0
    grid: dict = field(default_factory=dict)  # method -> list of configs tried


@dataclass(frozen=True)
class ReproduceConfig(RunConfig):
    """``reproduce``: methods x benchmarks, studies and figures on one source."""

    run = "reproduce"
    seed: int = 0
    quick: bool = False
    study_limit: int | None = None
    tune_fraction: float = 0.25


def manifest(config: RunConfig, model: dict, source: dict) -> dict:
    """The manifest of a run: its config, the model's record and the source's record."""
    return {"format": FORMAT, "run": config.run, "config": config.to_dict(), "model": _plain(model),
            "source": _plain(source)}


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"config": {"gamma": 1}} -> {"config.gamma": 1}`` (lists kept whole)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _short(v, n: int = 80) -> str:
    t = json.dumps(v, sort_keys=True, default=str)
    return t if len(t) <= n else t[: n - 3] + "..."


def differences(old: dict, new: dict) -> list[str]:
    """Dotted field names where two manifests differ."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def check_same_run(directory, old: dict, new: dict) -> None:
    """Refuse ``directory`` (whose manifest is ``old``) for the run ``new``; say why."""
    if old.get("format") != new.get("format") and "format" in new:
        raise ManifestMismatchError(
            f"{directory} was written by another version of dleaf-analysis (manifest format "
            f"{old.get('format', 1)}, this version writes {new['format']}); its results cannot be resumed: use another "
            "--out directory or delete this one")
    diff = differences(old, new)
    if diff:
        fo, fn = flatten(old), flatten(new)
        what = "; ".join(f"{k}: this run has {_short(fn.get(k))}, the directory has {_short(fo.get(k))}" for k in diff)
        raise ManifestMismatchError(f"{directory} holds results of a different run ({what}); use another --out "
                                    "directory or delete this one")
