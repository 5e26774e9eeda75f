"""``evaluate(benchmark, source, lm, ...)``: a method on CHAIR or POPE over any image source, under
one saved manifest (:mod:`dleaf_analysis.runs`).

The scene world, COCO (``CocoSource``, its POPE questions from POPE's files) and annotated
folders go through the same path: the source gives the images, the prompt and caption length,
the mention matcher and ground truth, and the POPE questions.  With ``out_dir`` every finished
item is recorded as it goes (keyed by the item, so a run resumes after a crash, also with another
batch size); the final tables are written atomically and ``protocol.json`` (the manifest) last.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from dleaf_analysis import runs
from dleaf_analysis.errors import DleafError
from dleaf_analysis.evaluation.chair import chair_summary
from dleaf_analysis.evaluation.pope import get_parser, pope_summary
from dleaf_analysis.models.generation import generate, new_token_ids
from dleaf_analysis.models.loading import LoadedModel, load_model
from dleaf_analysis.runs import BENCHMARKS, POPE_VARIANTS, EvalConfig
from dleaf_analysis.settings import tuned_config
from dleaf_analysis.sources import ImageSource, as_source
from dleaf_analysis import distributed
from dleaf_analysis.sweeps import open_store, run_items

__all__ = ["BENCHMARKS", "EvalResult", "Protocol", "ProtocolMismatchError", "evaluate", "check_output_dir"]


class ProtocolMismatchError(DleafError, RuntimeError):
    """The output directory cannot take this run's results (another run's, or not writable)."""


class Protocol:
    """Read-only view of an evaluation's manifest with the names a reader wants
    (``prompt``, ``weights_hash``, ...); ``to_dict()`` is the manifest itself."""

    def __init__(self, manifest: dict, n_items: int) -> None:
        self.manifest = {**manifest, "n_items": n_items}

    def __getattr__(self, name: str):
        m = self.__dict__["manifest"]
        for section in ("config", "model", "source"):
            if name in m.get(section, {}):
                return m[section][name]
        alias = {"model_id": ("model", "id"), "split": ("source", "name"), "split_hash": ("source", "hash")}
        if name in alias:
            a, b = alias[name]
            return m[a].get(b, m[a].get("split"))
        if name in m:
            return m[name]
        raise AttributeError(name)

    def to_dict(self) -> dict:
        return dict(self.manifest)

    def describe(self) -> str:
        """A one-paragraph human-readable summary."""
        c, mo, s = self.manifest["config"], self.manifest["model"], self.manifest["source"]
        parts = [
            f"{c['benchmark']} on {s.get('split') or s.get('kind')} ({self.manifest['n_items']} items, data {s['hash']})",
            f"model {mo['id']} (weights {mo['weights_hash']}, files {mo['files_hash']}, {mo['dtype']} on {mo['device']})",
            f"method {c['method']} {json.dumps(c['method_config'], sort_keys=True) if c['method_config'] else ''}".strip(),
            f"greedy decoding, max {c['max_new_tokens']} new tokens, prompt {c['prompt']!r}",
        ]
        if c["benchmark"] == "pope":
            parts.append(f"answer parser {c['answer_parser']}")
        parts.append(f"bootstrap {c['n_resamples']}, seed {c['seed']}")
        return "; ".join(parts)


@dataclass
class EvalResult:
    """Summary (one row per metric, with CI), per-item details, the manifest, and what the method did."""

    protocol: Protocol
    summary: pd.DataFrame
    details: pd.DataFrame
    interventions: pd.DataFrame | None = None  # D-LEAF: layers fired, heads corrected (one row per firing)

    @property
    def manifest(self) -> dict:
        return self.protocol.to_dict()

    def save(self, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Write ``summary.csv``, ``details.jsonl`` (and ``interventions.jsonl``) and ``protocol.json``
        atomically: every file is written in full to a temporary name before any is renamed."""
        out = check_output_dir(out_dir, self.manifest, overwrite)
        writes = [("summary.csv", lambda f: self.summary.to_csv(f, index=False)),
                  ("details.jsonl", lambda f: self.details.to_json(f, orient="records", lines=True))]
        if self.interventions is not None and len(self.interventions):
            writes.append(("interventions.jsonl",
                           lambda f: self.interventions.to_json(f, orient="records", lines=True)))
        writes.append(("protocol.json", lambda f: Path(f).write_text(json.dumps(self.manifest, indent=1) + "\n")))
        tmps = [(out / f".{name}.tmp", out / name) for name, _ in writes]
        try:
            for (_, write), (tmp, _) in zip(writes, tmps):
                write(tmp)
        except BaseException:
            for tmp, _ in tmps:
                tmp.unlink(missing_ok=True)
            raise
        for tmp, final in tmps:
            os.replace(tmp, final)
        return out

    @classmethod
    def load(cls, out_dir: str | Path) -> "EvalResult":
        """A finished evaluation written by :meth:`save`."""
        out = Path(out_dir)
        manifest = json.loads((out / "protocol.json").read_text())
        inter = out / "interventions.jsonl"
        return cls(Protocol(manifest, manifest.get("n_items", 0)), pd.read_csv(out / "summary.csv"),
                   pd.read_json(out / "details.jsonl", lines=True),
                   pd.read_json(inter, lines=True) if inter.is_file() else pd.DataFrame())

    def to_json(self) -> str:
        from dleaf_analysis.tables import json_safe

        return json.dumps(json_safe({"protocol": self.manifest, "summary": self.summary.to_dict(orient="records")}),
                          indent=1)

    def metric(self, name: str, variant: str | None = None) -> float:
        s = self.summary
        if variant is not None:
            s = s[s["variant"] == variant]
        return float(s.loc[s["metric"] == name, "value"].iloc[0])


def check_output_dir(out_dir: str | Path, manifest: dict, overwrite: bool = False) -> Path:
    """Create ``out_dir`` and check it before any compute: writable, and not holding the results
    of another run (unless ``overwrite``)."""
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
        new = {k: v for k, v in manifest.items() if k != "n_items"}
        try:
            runs.check_same_run(out, {k: v for k, v in old.items() if k != "n_items"}, new)
        except runs.ManifestMismatchError as e:
            raise ProtocolMismatchError(str(e).replace("delete this one", "use --overwrite")) from None
    return out


def evaluate(
    benchmark: str = "chair",
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
    tuned_any: bool = False,
) -> EvalResult:
    """Evaluate ``method`` on ``benchmark`` ("chair" or "pope") over an image source (a scene split
    name, a split, or any :class:`~dleaf_analysis.sources.ImageSource`).

    The method runs at its settings tuned for this model (``tuned_file``, default the shipped
    ``data/tuned_methods.json``; a file tuned for another model is refused unless ``tuned_any``)
    unless ``method_config`` overrides them; the manifest records the full config.
    """
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {BENCHMARKS}")
    from dleaf_analysis.interventions import get_method
    from dleaf_analysis.models.adapters import ModelAdapter

    lm = lm or load_model()
    source = as_source(split, limit)
    source.check_model(lm)  # e.g. the scene world's class words must be tokens of the model
    ad = ModelAdapter(lm.model)
    m = get_method(method, {**tuned_config(method, lm.weights_hash, tuned_file, strict=tuned_file is not None
                                           and not tuned_any), **(method_config or {})})
    m.validate(ad.n_layers, ad.n_heads)  # ranges against this model, before any output is written
    prompt = source.prompt
    mnt = max_new_tokens or (source.max_new_tokens if benchmark == "chair" else 3)
    config = EvalConfig(benchmark=benchmark, method=method,
                        method_config={k: v for k, v in m.to_dict().items() if k != "method"}, seed=seed,
                        max_new_tokens=mnt, answer_parser=answer_parser,
                        pope_variants=tuple(pope_variants), n_resamples=n_resamples)
    manifest = runs.manifest(config, lm.record(), source.record())
    manifest["config"]["prompt"] = prompt if benchmark == "chair" else "(the POPE question)"
    if benchmark == "pope":
        questions = source.pope_questions(pope_variants, seed=seed)
        if not len(questions):
            raise ProtocolMismatchError(f"no POPE questions on the {len(source)} images of {source!r}")
        whole = questions if source.parent is source else source.parent.pope_questions(pope_variants, seed=seed)
        manifest["source"]["questions_hash"] = hashlib.sha256(  # of the whole run: the shards of one run agree
            whole[["key", "question", "label"]].to_json(orient="values").encode()).hexdigest()[:16]
    store = None
    if out_dir is not None:  # before any compute
        out = check_output_dir(out_dir, manifest, overwrite)
        if not overwrite and all((out / f).is_file() for f in ("protocol.json", "summary.csv", "details.jsonl")):
            return EvalResult.load(out)  # this very run, finished: nothing to redo
        partial = out / ".partial"  # finished items of an interrupted run, keyed by item (and the writer's lock)
        store = open_store(partial, manifest, reset=overwrite)

    def run(keys: list[str], images: list, prompts: list[str], desc: str) -> tuple[list[str], list[dict]]:
        """Decode every item (resumable when there is an output directory); returns the texts in
        item order and the intervention log with ``item`` = the item's position in ``keys``."""
        current: list[int] = []
        batch_log: list[dict] = []

        def decode(lm_, inputs, **kw):
            ids, record = m.decode(lm_, inputs, **kw)
            # a row's steps end with its end-of-sequence token; later steps decode padding while the
            # batch's other rows finish, so their decisions are dropped (the log is batch-size-free)
            n_steps = [len(g) + 1 for g in new_token_ids(ids[:, inputs["input_ids"].shape[1]:].tolist(), lm_)]
            for rec in record.log:
                rec = dict(rec)
                b = rec.pop("batch")
                if rec.get("step", 0) < n_steps[b]:
                    batch_log.append({**rec, "item": current[b]})  # the row within the batch -> the item
            return ids

        def fn(batch: list[int]) -> list[list[dict]]:
            current[:] = batch
            batch_log.clear()
            texts = generate(lm, [images[i] for i in batch], [prompts[i] for i in batch], max_new_tokens=mnt,
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

    images = [source.image(i) for i in range(len(source))]
    if benchmark == "chair":
        n = len(source)
        caps, logs = run([f"chair:{source.key(i)}" for i in range(n)], images, [prompt] * n, "captioning")
        details = source.chair_details(caps)
        details.insert(0, "image", range(n))
        details["item"] = [source.key(i) for i in range(n)]
        summary = chair_summary(details, n_resamples=n_resamples, seed=seed)
        summary.insert(0, "variant", "all")
        n_items = n
    else:
        parse = get_parser(answer_parser)
        frames, summaries, logs = [], [], []
        for variant in dict.fromkeys(questions["variant"]):
            q = questions[questions["variant"] == variant].reset_index(drop=True)
            ans, lg = run(list(q["key"]), [images[i] for i in q["item"]], list(q["question"]), f"POPE {variant}")
            logs += [{**r, "variant": variant} for r in lg]  # ``item``: the question's position in its variant
            q["image"] = q["item"]
            q["item_key"] = [source.key(i) for i in q["item"]]
            q["answer"] = ans
            q["prediction"] = [parse(a) for a in ans]
            s = pope_summary(q["label"], q["prediction"], groups=q["image"], n_resamples=n_resamples, seed=seed)
            s.insert(0, "variant", variant)
            frames.append(q)
            summaries.append(s)
        details = pd.concat(frames, ignore_index=True)
        summary = pd.concat(summaries, ignore_index=True)
        n_items = len(source)
    summary.insert(0, "method", method)
    summary.insert(0, "benchmark", benchmark)
    result = EvalResult(Protocol(manifest, n_items), summary, details, pd.DataFrame(logs))
    if out_dir is not None:
        if distributed.writer():
            result.save(out_dir, overwrite=overwrite)
            store.close()
            shutil.rmtree(Path(out_dir) / ".partial", ignore_errors=True)
        distributed.barrier()
    return result


def merge_evaluations(dirs: list[str | Path], out: str | Path | None = None, n_resamples: int | None = None
                      ) -> EvalResult:
    """Merge the finished shards of one evaluation (``--shard i/N`` with ``--out``): the same run but
    for its shard, shards distinct and complete; the details are concatenated in source order and
    the summary recomputed on all of them (written to ``out`` if given)."""
    from dleaf_analysis.sweeps import check_shards

    dirs = [Path(d) for d in dirs]
    manifests = []
    for d in dirs:
        if not (d / "protocol.json").is_file():
            raise ProtocolMismatchError(f"{d} holds no finished evaluation (no protocol.json); run or resume it first")
        manifests.append(json.loads((d / "protocol.json").read_text()))
    flat = [{**runs.flatten({k: v for k, v in m.items() if k != "n_items"}), "shard": m["source"]["shard"]}
            for m in manifests]
    check_shards(dirs, flat, local=("shard", "source.shard", "source.images_dir"))
    details = pd.concat([pd.read_json(d / "details.jsonl", lines=True) for d in dirs], ignore_index=True)
    cfg = manifests[0]["config"]
    n_res = n_resamples or cfg["n_resamples"]
    merged = json.loads(json.dumps(manifests[0]))
    merged["source"]["shard"] = [0, 1]
    merged["merged_from"] = [str(d) for d in dirs]
    if cfg["benchmark"] == "chair":
        summary = chair_summary(details, n_resamples=n_res, seed=cfg["seed"])
        summary.insert(0, "variant", "all")
        n_items = len(details)
    else:
        parts = []
        for variant, q in details.groupby("variant", sort=False):
            s = pope_summary(q["label"], q["prediction"], groups=q["item_key"] if "item_key" in q else q["image"],
                             n_resamples=n_res, seed=cfg["seed"])
            s.insert(0, "variant", variant)
            parts.append(s)
        summary = pd.concat(parts, ignore_index=True)
        n_items = int(sum(m.get("n_items", 0) for m in manifests))
    summary.insert(0, "method", cfg["method"])
    summary.insert(0, "benchmark", cfg["benchmark"])
    inter = [pd.read_json(d / "interventions.jsonl", lines=True) for d in dirs if (d / "interventions.jsonl").is_file()]
    res = EvalResult(Protocol(merged, n_items), summary, details, pd.concat(inter, ignore_index=True) if inter else None)
    if out is not None:
        res.save(out)
    return res
