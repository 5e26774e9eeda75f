"""``evaluate(...)``: run a method on a benchmark split under one saved protocol."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from dleaf_analysis.evaluation.chair import chair_summary
from dleaf_analysis.evaluation.pope import get_parser, pope_summary
from dleaf_analysis.errors import DleafError
from dleaf_analysis.evaluation.protocol import Protocol
from dleaf_analysis.models.generation import generate
from dleaf_analysis.models.loading import LoadedModel, load_model
from dleaf_analysis.scenes import POPE_VARIANTS, ObjectStats, load_split, pope_questions
from dleaf_analysis.settings import tuned_config
from dleaf_analysis.sources import ImageSource, SceneSource, SourceError
from dleaf_analysis.sweeps import ResultStore, run_items

BENCHMARKS = ("chair", "pope")


class ProtocolMismatchError(DleafError, RuntimeError):
    """The output directory cannot take this run's results (another run's, or not writable)."""


@lru_cache(maxsize=2)
def train_object_stats() -> ObjectStats:
    """Class frequencies and co-occurrences of the train split (POPE popular/adversarial)."""
    return ObjectStats.from_scenes(load_split("train").scenes)


@dataclass
class EvalResult:
    """Summary (one row per metric, with CI), per-item details, and the protocol."""

    protocol: Protocol
    summary: pd.DataFrame
    details: pd.DataFrame
    interventions: pd.DataFrame | None = None  # what the method did (D-LEAF: layers fired, heads corrected)

    def save(self, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Write ``protocol.json``, ``summary.csv``, ``details.jsonl`` (and ``interventions.jsonl``)
        atomically (each to a temporary name, then renamed).  A directory holding another run's
        results is refused unless ``overwrite``."""
        out = check_output_dir(out_dir, self.protocol.to_dict(), overwrite)
        writes = [("summary.csv", lambda f: self.summary.to_csv(f, index=False)),
                  ("details.jsonl", lambda f: self.details.to_json(f, orient="records", lines=True))]
        if self.interventions is not None and len(self.interventions):
            writes.append(("interventions.jsonl",
                           lambda f: self.interventions.to_json(f, orient="records", lines=True)))
        writes.append(("protocol.json", self.protocol.save))  # renamed last
        tmps = [(out / f".{name}.tmp", out / name) for name, _ in writes]
        try:  # every file is written in full before any is renamed into place
            for (_, write), (tmp, _) in zip(writes, tmps):
                write(tmp)
        except BaseException:
            for tmp, _ in tmps:
                tmp.unlink(missing_ok=True)
            raise
        for tmp, final in tmps:
            os.replace(tmp, final)
        return out

    def to_json(self) -> str:
        return json.dumps({"protocol": self.protocol.to_dict(), "summary": self.summary.to_dict(orient="records")}, indent=1)

    def metric(self, name: str, variant: str | None = None) -> float:
        s = self.summary
        if variant is not None:
            s = s[s["variant"] == variant]
        return float(s.loc[s["metric"] == name, "value"].iloc[0])


def check_output_dir(out_dir: str | Path, protocol: dict, overwrite: bool = False) -> Path:
    """Create ``out_dir`` and check it before any compute: writable, and not holding the results
    of a run with another protocol (unless ``overwrite``).  ``protocol`` may be partial: only the
    fields it has are compared."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ProtocolMismatchError(f"cannot create the output directory {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise ProtocolMismatchError(f"{out} is not writable; choose another --out directory")
    old_file = out / "protocol.json"
    if old_file.is_file() and not overwrite:
        old = json.loads(old_file.read_text())
        new = json.loads(json.dumps(protocol, default=str))
        diff = [k for k in new if k in old and old[k] != new[k]]
        if diff:
            what = "; ".join(f"{k}: this run has {json.dumps(new[k])[:60]}, the directory has {json.dumps(old[k])[:60]}"
                             for k in diff)
            raise ProtocolMismatchError(f"{out} holds the results of another run ({what}); use another --out "
                                        "directory or --overwrite")
    return out


def evaluate(
    benchmark: str,
    split: str | ImageSource = "test",
    lm: LoadedModel | None = None,
    method: str = "greedy",
    method_config: dict | None = None,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    answer_parser: str = "official",
    pope_variants: tuple[str, ...] = POPE_VARIANTS,
    n_resamples: int = 1000,
    out_dir: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
    tuned_file: str | Path | None = None,
) -> EvalResult:
    """Evaluate ``method`` on ``benchmark`` ("chair" or "pope") over a scene split, or with CHAIR
    over any image source (COCO, an annotated JSONL folder: its prompt, caption length and matcher).

    The method runs at its settings tuned for this model (``tuned_file``, default the shipped
    ``data/tuned_methods.json``) unless ``method_config`` overrides them; the protocol records the
    full config.
    """
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {BENCHMARKS}")
    from dleaf_analysis.interventions import get_method

    lm = lm or load_model()
    # settings tuned on dev for this model (if any), overridden by the caller's
    m = get_method(method, {**tuned_config(method, lm.weights_hash, tuned_file), **(method_config or {})})
    if isinstance(split, str):
        data = load_split(split, limit=limit)
        source: ImageSource = SceneSource(data)
        source.check_model(lm)  # its captions are scored on the scene's class words
        split_name, split_hash = split, data.annotations_hash
    else:
        if benchmark == "pope":
            raise SourceError("POPE on photos takes POPE's question files: use `dleaf pope-coco`")
        source = split.limit(limit)
        data = None
        split_name, split_hash = source.kind, source.fingerprint
    images = [source.image(i) for i in range(len(source))]
    common = dict(
        split=split_name, split_hash=split_hash, model_id=lm.model_id, weights_hash=lm.weights_hash,
        method=method, method_config={k: v for k, v in m.to_dict().items() if k != "method"},
        n_resamples=n_resamples, seed=seed,
    )
    mnt = max_new_tokens or (source.max_new_tokens if benchmark == "chair" else 3)
    store = None
    if out_dir is not None:  # before any compute
        out = check_output_dir(out_dir, {"benchmark": benchmark, **common}, overwrite)
        partial = out / ".partial"  # finished items of an interrupted run, keyed by item
        if overwrite and partial.exists():
            shutil.rmtree(partial)
        store = ResultStore(partial, {"benchmark": benchmark, **common, "max_new_tokens": mnt,
                                      "answer_parser": answer_parser if benchmark == "pope" else None,
                                      "pope_variants": list(pope_variants) if benchmark == "pope" else None})
    batch_log: list[dict] = []  # D-LEAF's firings of the batch being decoded

    def run(keys: list[str], imgs: list, prompts: list[str], desc: str) -> tuple[list[str], list[dict]]:
        """Decode every item (resumable when there is an output directory); returns the texts in
        item order and the intervention log with ``item`` = the item's position in ``keys``."""
        current: list[int] = []

        def decode(lm_, inputs, **kw):
            ids = m.generate(lm_, inputs, **kw)
            for rec in getattr(m, "log", []):
                rec = dict(rec)
                item = current[rec.pop("batch")]  # the row within the batch -> the item
                batch_log.append({**rec, "item": item})
            return ids

        def fn(batch: list[int]) -> list[list[dict]]:
            current[:] = batch
            batch_log.clear()
            texts = generate(lm, [imgs[i] for i in batch], [prompts[i] for i in batch], max_new_tokens=mnt,
                             batch_size=len(batch), seed=seed, progress=False, decode=decode)
            return [[{"text": t, "log": [r for r in batch_log if r["item"] == i]}] for i, t in zip(batch, texts)]

        items = list(zip(keys, range(len(keys))))
        if store is None:
            rows = []
            for k in tqdm(range(0, len(items), batch_size), desc=desc, disable=not progress):
                rows += [r[0] for r in fn([i for _, i in items[k:k + batch_size]])]
        else:
            rows = run_items(items, fn, store, batch_size=batch_size, progress=progress, desc=desc).to_dict("records")
        return [r["text"] for r in rows], [rec for r in rows for rec in r["log"]]

    if benchmark == "chair":
        n = len(source)
        keys = [f"chair:{i}" if data is not None else f"chair:{source.key(i)}" for i in range(n)]
        caps, logs = run(keys, images, [source.prompt] * n, "captioning")
        details = source.chair_details(caps)
        details.insert(0, "image", range(n))
        if data is None:
            details["item"] = [source.key(i) for i in range(n)]
        summary = chair_summary(details, n_resamples=n_resamples, seed=seed)
        summary.insert(0, "variant", "all")
        protocol = Protocol(benchmark="chair", n_items=n, prompt=source.prompt, max_new_tokens=mnt, **common)
    else:
        parse = get_parser(answer_parser)
        stats = train_object_stats()
        frames, summaries, logs = [], [], []
        for variant in pope_variants:
            q = pope_questions(data, variant, stats, seed=seed)
            ans, lg = run([f"pope:{variant}:{j}" for j in range(len(q))], [images[i] for i in q["image"]],
                          list(q["question"]), f"POPE {variant}")
            logs += lg
            q["answer"] = ans
            q["prediction"] = [parse(a) for a in ans]
            s = pope_summary(q["label"], q["prediction"], groups=q["image"], n_resamples=n_resamples, seed=seed)
            s.insert(0, "variant", variant)
            frames.append(q)
            summaries.append(s)
        details = pd.concat(frames, ignore_index=True)
        summary = pd.concat(summaries, ignore_index=True)
        protocol = Protocol(benchmark="pope", n_items=len(data), prompt=data.world.spec["question_template"],
                            max_new_tokens=mnt, answer_parser=answer_parser, pope_variants=list(pope_variants), **common)
    summary.insert(0, "method", method)
    summary.insert(0, "benchmark", benchmark)
    result = EvalResult(protocol, summary, details, pd.DataFrame(logs))
    if out_dir is not None:
        result.save(out_dir, overwrite=overwrite)
        shutil.rmtree(Path(out_dir) / ".partial", ignore_errors=True)
    return result
