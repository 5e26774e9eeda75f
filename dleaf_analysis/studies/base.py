"""The study protocol, the study registry and the one runner every study goes through.

A study is a :class:`Study` subclass in its own file, decorated with :func:`register`.  It says
what its units are (:meth:`Study.units`: hallucination events, images, faults or layers), what one
unit computes (:meth:`Study.unit` -> tidy rows), how the rows become tables
(:meth:`Study.finalize`), which axis ``--shard`` splits (``shard_axis``: the source's images, or
the study's own units, e.g. calibration's faults, which then run on every image), its section of
the report (:meth:`Study.report`) and its figures (``figures``: names in the figure registry).

:func:`run_study` is resumable (one JSON line per finished unit, keyed by the unit; see
:mod:`dleaf_analysis.sweeps`) under one manifest (:mod:`dleaf_analysis.runs`), and writes every
table atomically (a temporary file, then a rename).  :func:`merge_study` merges shards.  Adding a
study is one file plus its test (``docs/extending.md``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import pandas as pd

from dleaf_analysis import runs
from dleaf_analysis.errors import DleafError
from dleaf_analysis.interventions import DLeaf
from dleaf_analysis.models.loading import LoadedModel, load_model
from dleaf_analysis.runs import StudyConfig
from dleaf_analysis.sources import ImageSource, SourceError, as_source
from dleaf_analysis import distributed
from dleaf_analysis.sweeps import ResultStore, check_shards, open_store, run_sweep


class NoEventsError(DleafError, RuntimeError):
    """The model did not hallucinate on the chosen images (nothing to study)."""


@dataclass
class StudyContext:
    """What a study's units see: the model, the source, the run's settings, the events."""

    lm: LoadedModel
    source: ImageSource
    config: StudyConfig
    dleaf: DLeaf
    out: Path
    batch_size: int | None = None
    progress: bool = True
    log: Callable[[str], None] = print
    events: pd.DataFrame | None = None
    extra: dict = field(default_factory=dict)  # what a study prepares once (e.g. unfaulted captions)

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def options(self) -> dict:
        return self.config.options


@dataclass
class StudyResult:
    study: str
    events: pd.DataFrame
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)

    def to_json(self) -> str:
        from dleaf_analysis.tables import json_safe

        return json.dumps(json_safe({"study": self.study, "summary": self.summary,
                                     **{k: v.to_dict(orient="records") for k, v in self.tables.items()
                                        if k.endswith("summary")}}), indent=1, default=float)


class Study:
    """Base of the studies (see the module doc)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    uses_events: ClassVar[bool] = True  # units are hallucination events of the source's greedy captions
    needs_cue: ClassVar[bool] = False  # only events with a cue object (a counterfactual) are units
    shard_axis: ClassVar[str] = "images"  # "images": shards split the source; "units": the study's own units
    figures: ClassVar[tuple[str, ...]] = ()
    default_options: ClassVar[dict] = {}

    def options(self, given: dict | None) -> dict:
        """The study's settings: its defaults updated with ``given`` (unknown keys refused)."""
        given = dict(given or {})
        unknown = set(given) - set(self.default_options)
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)} for study {self.name!r}; "
                             f"valid: {sorted(self.default_options)}")
        return {**self.default_options, **given}

    def prepare(self, ctx: StudyContext) -> None:
        """Work done once before the units (e.g. unfaulted captions); default: nothing."""

    def units(self, ctx: StudyContext) -> list[tuple[str, Any]]:
        """``(key, unit)`` pairs; default: the usable hallucination events."""
        hall = usable_events(ctx.events, self.needs_cue)
        records = hall.astype(object).where(hall.notna(), None).to_dict(orient="records")  # NaN -> None
        return [(r["key"], r) for r in records]

    def unit(self, ctx: StudyContext, unit: Any) -> list[dict]:
        raise NotImplementedError

    def finalize(self, ctx: StudyContext | None, events: pd.DataFrame, rows: pd.DataFrame,
                 summary: dict) -> dict[str, pd.DataFrame]:
        """Tidy tables from the per-unit rows (may add plain numbers to ``summary``)."""
        return {"events": events, "rows": rows}

    def report(self, tables: dict[str, pd.DataFrame], summary: dict) -> str:
        """The study's section of ``report.md`` (markdown); default: its summary tables."""
        from dleaf_analysis.tables import md_table

        parts = [f"### {self.name}", "", self.description, ""]
        for k, t in tables.items():
            if k.endswith("summary") and len(t):
                parts += [md_table(t.round(3)), ""]
        return "\n".join(parts)


STUDIES: dict[str, Study] = {}


def register(cls: type[Study]) -> type[Study]:
    """Class decorator: make a study available by its ``name`` (``run_study``, ``dleaf study NAME``)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    STUDIES[cls.name] = cls()
    return cls


def get_study(name: str) -> Study:
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; choose one of {sorted(STUDIES)}")
    return STUDIES[name]


def usable_events(events: pd.DataFrame, needs_cue: bool = False) -> pd.DataFrame:
    """The hallucinated events a causal study can use (a preferred alternative; a cue if needed), keyed."""
    hall = events[(events.kind == "hallucinated") & events.preferred.notna()].copy()
    hall["key"] = [f"{r.item}:{r.step}" for r in hall.itertuples()]
    return hall[hall.cue.notna()] if needs_cue else hall


def event_summary(n_images: int, events: pd.DataFrame) -> dict:
    hall = usable_events(events)
    return {"n_images": n_images, "n_object_tokens": len(events),
            "n_hallucinated": int((events.kind == "hallucinated").sum()), "n_with_preferred": len(hall),
            "n_with_cue": int(hall.cue.notna().sum()),
            "n_cue_was_top_preferred": int(events.get("cue_was_top_preferred", pd.Series(dtype=bool)).fillna(False)
                                           .astype(bool).sum())}


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` then rename onto ``path`` (a kill mid-write leaves the old file or none)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_tables(out: Path, tables: dict[str, pd.DataFrame], summary: dict) -> None:
    """Every table as parquet (summaries also as CSV) and ``summary.json`` last, each atomically."""
    from dleaf_analysis.tables import json_safe

    for name, t in tables.items():
        if len(t):
            write_atomic(out / f"{name}.parquet", lambda f, t=t: t.to_parquet(f))
            if name.endswith("summary"):
                write_atomic(out / f"{name}.csv", lambda f, t=t: t.to_csv(f, index=False))
    write_atomic(out / "summary.json", lambda f: f.write_text(json.dumps(json_safe(summary), indent=1, default=float)))


def _find_events(ctx: StudyContext) -> pd.DataFrame:
    from dleaf_analysis.studies.events import find_events

    f = ctx.out / "events.parquet"
    if not f.is_file() and distributed.writer():  # rank 0 finds the events; the others read them
        events = find_events(ctx.lm, ctx.source, progress=ctx.progress, event_token=ctx.config.event_token)
        write_atomic(f, lambda p: events.to_parquet(p))
    distributed.barrier()
    return pd.read_parquet(f)


def run_study(
    study: str,
    source: ImageSource | str = "dev",
    limit: int | None = 100,
    out: str | Path = "runs/studies",
    lm: LoadedModel | None = None,
    dleaf_config: dict | None = None,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
    batch_size: int | None = None,
    event_token: str = "first",
    tuned_file: str | Path | None = None,
    options: dict | None = None,
    tuned_any: bool = False,
    max_units: int | None = None,
    **legacy,
) -> StudyResult:
    """Run one registered study on the first ``limit`` images of ``source`` (a scene split name or
    any :class:`~dleaf_analysis.sources.ImageSource`, possibly a shard); results go to
    ``out/<study>/``.  ``batch_size`` bounds the intervened copies per forward; ``event_token``:
    see :mod:`dleaf_analysis.studies.events`; ``tuned_file``: tuned settings to use (default: the
    shipped ones, applied only to the model they were tuned for); ``options``: the study's own
    settings (e.g. calibration's ``faults``); ``max_units``: only the first N units (events, images,
    faults), a budget recorded in the manifest."""
    from dleaf_analysis.models.adapters import ModelAdapter
    from dleaf_analysis.settings import tuned_config
    from dleaf_analysis.studies.events import EVENT_TOKENS

    st = get_study(study)
    if event_token not in EVENT_TOKENS:
        raise ValueError(f"unknown event token {event_token!r}; choose one of {EVENT_TOKENS}")
    if "faults" in legacy:  # run_study("calibration", faults=[...])
        options = {**(options or {}), "faults": legacy.pop("faults")}
    if legacy:
        raise TypeError(f"unexpected arguments {sorted(legacy)}")
    lm = lm or load_model()
    data = as_source(source, limit)
    data.check_model(lm)
    ad = ModelAdapter(lm.model)
    strict = tuned_file is not None and not tuned_any
    dleaf = DLeaf.from_dict({**tuned_config("dleaf", lm.weights_hash, tuned_file, strict=strict), **(dleaf_config or {})})
    dleaf.validate(ad.n_layers, ad.n_heads)
    methods = {m: tuned_config(m, lm.weights_hash, tuned_file, strict=strict) for m in ("uniform", "pai")}
    opts = st.options(options)
    if st.shard_axis == "units":  # shards split the study's units and run on every image
        unit_shard, data = data.shard_spec, data.parent
    else:
        unit_shard = (0, 1)
    config = StudyConfig(study=study, seed=seed, event_token=event_token,
                         dleaf={k: v for k, v in dleaf.to_dict().items() if k != "method"}, methods=methods,
                         options=opts)
    manifest = runs.manifest(config, lm.record(), data.record())
    manifest["unit_shard"] = list(unit_shard)
    manifest["max_units"] = max_units
    outdir = Path(out) / study
    store = open_store(outdir, manifest)
    ctx = StudyContext(lm, data, config, dleaf, outdir, batch_size, progress, log)
    summary: dict = {"n_images": len(data)}
    if st.uses_events:
        ctx.events = _find_events(ctx)
        summary = event_summary(len(data), ctx.events)
    st.prepare(ctx)
    units = st.units(ctx)
    if st.uses_events and not units:
        raise NoEventsError(
            f"no usable hallucination events on the {len(data)} images of {data!r} ({summary['n_hallucinated']} "
            f"hallucinated object mentions, {summary['n_with_preferred']} with a preferred alternative"
            + (f", {summary['n_with_cue']} with a cue" if st.needs_cue else "") + "): nothing to study; "
            "use more images (--limit) or another image source")
    i, n = unit_shard
    mine = units[:max_units][i::n]
    rows = run_sweep(mine, lambda u: st.unit(ctx, u), store, progress=progress,
                     desc=f"{study} over {len(mine)} {'events' if st.uses_events else 'units'}")
    tables = st.finalize(ctx, ctx.events if ctx.events is not None else pd.DataFrame(), rows, summary)
    if distributed.writer():
        write_tables(outdir, tables, summary)
    distributed.barrier()
    return StudyResult(study, ctx.events if ctx.events is not None else pd.DataFrame(), tables, summary)


def merge_study(study: str, dirs: list[str | Path], out: str | Path) -> StudyResult:
    """Merge the shards of one study (each ``DIR/<study>/`` of ``dleaf study ... --shard i/N``) into
    ``out/<study>/``: same model, images and settings; shards distinct, complete and finished.
    A directory holding another run is refused, as everywhere."""
    st = get_study(study)
    dirs = [Path(d) / study if (Path(d) / study / "manifest.json").is_file() else Path(d) for d in dirs]
    manifests = []
    for d in dirs:
        if not (d / "manifest.json").is_file():
            raise SourceError(f"{d} holds no {study} results (no manifest.json)")
        manifests.append(json.loads((d / "manifest.json").read_text()))
    axis = "unit_shard" if st.shard_axis == "units" else "shard"
    shard_of = (lambda m: m.get("unit_shard", [0, 1])) if axis == "unit_shard" else (lambda m: m["source"]["shard"])
    flat = [{**runs.flatten(m), "shard": shard_of(m)} for m in manifests]
    local = ("shard", "unit_shard", "source.shard", "source.images_dir")
    base = check_shards(dirs, flat, local=local)
    for d in dirs:
        if not (d / "summary.json").is_file():
            raise SourceError(f"the shard in {d} has not finished; resume it (run the same command again) first")
    merged = json.loads(json.dumps(manifests[0]))
    merged["source"]["shard"], merged["unit_shard"] = [0, 1], [0, 1]
    merged["merged_from"] = [str(d) for d in dirs]
    outdir = Path(out) / study
    lock = ResultStore(outdir, merged)  # refuses a directory holding another run (and its writer), before writing
    del base
    rows = pd.concat([ResultStore(d, m, read_only=True).frame() for d, m in zip(dirs, manifests)], ignore_index=True)
    events = pd.DataFrame()
    if st.uses_events:
        # `image` is each event's position within its shard; `item` (the image's key) identifies it
        events = pd.concat([pd.read_parquet(d / "events.parquet").assign(shard=shard_of(m)[0])
                            for d, m in zip(dirs, manifests)], ignore_index=True)
        write_atomic(outdir / "events.parquet", lambda p: events.to_parquet(p))
    sums = [json.loads((d / "summary.json").read_text()) for d in dirs]
    keys = ("n_images", "n_object_tokens", "n_hallucinated", "n_with_preferred", "n_with_cue", "n_cue_was_top_preferred")
    summary = {k: sum(x.get(k, 0) for x in sums) for k in keys if k in sums[0]}
    if st.shard_axis == "units":
        summary["n_images"] = sums[0].get("n_images")
    tables = st.finalize(None, events, rows, summary)
    write_tables(outdir, tables, summary)
    lock.close()
    return StudyResult(study, events, tables, summary)


def load_study(out: str | Path, study: str) -> StudyResult:
    """A finished study's tables and summary from ``out/<study>/``."""
    d = Path(out) / study
    if not (d / "summary.json").is_file():
        raise SourceError(f"{d} holds no finished {study} study")
    tables = {f.stem: pd.read_parquet(f) for f in sorted(d.glob("*.parquet"))}
    return StudyResult(study, tables.pop("events", pd.DataFrame()), tables, json.loads((d / "summary.json").read_text()))
