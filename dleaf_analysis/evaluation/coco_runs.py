"""Running a model on COCO: POPE questions and CHAIR captions, from a local COCO image folder.

Runs are resumable (each finished item is appended to ``results.jsonl`` through
:mod:`dleaf_analysis.sweeps`, keyed by its question or image id, so a run resumed with another
batch size continues with exactly the missing items; the manifest records everything that
determines the answers -- weights, method, questions or image ids (and their hash), POPE variant
and version, prompt, parser, images folder -- and a run with other inputs is refused), shardable (``shard=(i, N)`` takes every N-th item starting at i,
so N processes or machines split the work) and mergeable (``merge_runs``).  Missing images are
skipped and counted, never silently dropped.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

from dleaf_analysis.evaluation.coco_chair import COCO_DIR, CocoChair, CocoDataError, chair_score
from dleaf_analysis.evaluation.pope import get_parser, pope_summary
from dleaf_analysis.models.generation import generate
from dleaf_analysis.models.loading import LoadedModel
from dleaf_analysis.sweeps import ResultStore, check_shards, run_items

POPE_VERSIONS = {"current": COCO_DIR / "pope", "opera": COCO_DIR / "pope" / "opera_snapshot"}
CHAIR_PROMPT = "Please describe this image in detail."  # OPERA's chair_eval.py


def load_pope_questions(variant: str = "adversarial", version: str = "current", path: str | Path | None = None) -> pd.DataFrame:
    """POPE question file (JSON Lines: question_id, image, text, label) as a DataFrame;
    ``df.attrs["source"]`` says which variant, version and file it is."""
    explicit = path is not None
    if path is None:
        if version not in POPE_VERSIONS:
            raise ValueError(f"unknown POPE version {version!r}; choose one of {sorted(POPE_VERSIONS)}")
        path = POPE_VERSIONS[version] / f"coco_pope_{variant}.json"
    path = Path(path)
    if not path.is_file():
        raise CocoDataError(f"POPE question file not found: {path} (variants: random, popular, adversarial)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise CocoDataError(f"{path}:{n} is not JSON: {e}") from None
        missing = {"question_id", "image", "text", "label"} - set(r)
        if missing or r["label"] not in ("yes", "no"):
            raise CocoDataError(f"{path}:{n}: a POPE question needs question_id, image, text and label yes/no "
                                f"(missing {sorted(missing)})" if missing else f"{path}:{n}: label must be yes or no")
        rows.append(r)
    df = pd.DataFrame(rows)
    df.attrs["source"] = {"variant": variant, "version": version, "file": str(path.resolve())} if not explicit \
        else {"variant": None, "version": None, "file": str(path.resolve())}
    return df


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def questions_hash(questions: pd.DataFrame) -> str:
    """Content hash of a POPE question set (question id, image, text, label of every row)."""
    cols = ["question_id", "image", "text", "label"]
    return _hash(questions[cols].astype(str).values.tolist())


def coco_image_path(images_dir: Path, image: str | int) -> Path:
    """``COCO_val2014_000000310196.jpg`` (a POPE file name) or an integer image id."""
    name = image if isinstance(image, str) else f"COCO_val2014_{int(image):012d}.jpg"
    return Path(images_dir) / name


def parse_shard(shard: str | None) -> tuple[int, int]:
    """``"i/N"`` -> ``(i, N)`` with ``0 <= i < N``; ``None`` -> ``(0, 1)``."""
    if not shard:
        return 0, 1
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/N (e.g. 0/4), got {shard!r}") from None
    if not (0 <= i < n):
        raise ValueError(f"--shard {shard}: need 0 <= i < N")
    return i, n


def _take_shard(df: pd.DataFrame, shard: tuple[int, int]) -> pd.DataFrame:
    i, n = shard
    return df.iloc[i::n]


def run_pope(
    lm: LoadedModel,
    questions: pd.DataFrame,
    images_dir: str | Path,
    out: str | Path,
    parser: str = "official",
    method=None,
    shard: tuple[int, int] = (0, 1),
    batch_size: int = 8,
    max_new_tokens: int = 8,
    progress: bool = True,
) -> pd.DataFrame:
    """Answer POPE questions (resumable, shardable); returns one row per question of this shard."""
    parse = get_parser(parser)
    qs = _take_shard(questions, shard)
    store = ResultStore(out, {"task": "pope", "model": lm.model_id, "weights_hash": lm.weights_hash,
                              "questions": questions.attrs.get("source", {}), "questions_hash": questions_hash(questions),
                              "n_questions": len(questions), "shard": list(shard), "parser": parser,
                              "images_dir": str(Path(images_dir).resolve()), "max_new_tokens": max_new_tokens,
                              "method": method.to_dict() if method is not None else {"method": "greedy"}})
    decode = method.generate if method is not None else None
    items = [(str(r.question_id), r) for r in qs.itertuples(index=False)]

    def fn(batch: list) -> list[list[dict]]:
        out_rows: list[list[dict]] = [[] for _ in batch]
        keep = []
        for j, r in enumerate(batch):
            p = coco_image_path(Path(images_dir), r.image)
            if p.is_file():
                keep.append((j, r, str(p)))
            else:
                out_rows[j] = [{"question_id": r.question_id, "image": r.image, "label": r.label,
                                "status": "missing image"}]
        if keep:
            answers = generate(lm, [p for _, _, p in keep], [r.text for _, r, _ in keep], max_new_tokens=max_new_tokens,
                               batch_size=len(keep), progress=False, decode=decode)
            for (j, r, _), a in zip(keep, answers):
                out_rows[j] = [{"question_id": r.question_id, "image": r.image, "label": r.label, "status": "ok",
                                "answer": a, "prediction": parse(a)}]
        return out_rows

    return run_items(items, fn, store, batch_size=batch_size, progress=progress, desc="POPE") \
        .drop(columns=["key"], errors="ignore")


def run_captions(
    lm: LoadedModel,
    image_ids: list[int],
    images_dir: str | Path,
    out: str | Path,
    prompt: str = CHAIR_PROMPT,
    method=None,
    shard: tuple[int, int] = (0, 1),
    batch_size: int = 4,
    max_new_tokens: int = 512,
    progress: bool = True,
) -> pd.DataFrame:
    """Caption COCO images for CHAIR (resumable, shardable): rows ``image_id, caption, status``."""
    image_ids = list(dict.fromkeys(int(i) for i in image_ids))  # each image once, first-seen order
    ids = _take_shard(pd.DataFrame({"image_id": image_ids}), shard)["image_id"].tolist()
    store = ResultStore(out, {"task": "captions", "model": lm.model_id, "weights_hash": lm.weights_hash,
                              "n_images": len(image_ids), "image_ids_hash": _hash(image_ids), "shard": list(shard),
                              "prompt": prompt, "images_dir": str(Path(images_dir).resolve()),
                              "max_new_tokens": max_new_tokens,
                              "method": method.to_dict() if method is not None else {"method": "greedy"}})
    decode = method.generate if method is not None else None
    items = [(str(i), i) for i in ids]

    def fn(batch: list[int]) -> list[list[dict]]:
        present = [i for i in batch if coco_image_path(Path(images_dir), i).is_file()]
        caps = dict(zip(present, generate(lm, [str(coco_image_path(Path(images_dir), i)) for i in present],
                                          [prompt] * len(present), max_new_tokens=max_new_tokens,
                                          batch_size=len(present), progress=False, decode=decode))) if present else {}
        return [[{"image_id": i, "caption": caps[i], "status": "ok"} if i in caps else
                 {"image_id": i, "caption": None, "status": "missing image"}] for i in batch]

    return run_items(items, fn, store, batch_size=batch_size, progress=progress, desc="captions") \
        .drop(columns=["key"], errors="ignore")


def merge_runs(dirs: list[str | Path]) -> pd.DataFrame:
    """Concatenate the results of shards of one run (same model, task and settings; shards must
    be distinct and complete the set ``0..N-1``)."""
    manifests, frames = [], []
    for d in dirs:
        d = Path(d)
        m = json.loads((d / "manifest.json").read_text())
        manifests.append(m)
        store = ResultStore(d, m)
        frames.append(store.frame().drop(columns=["key"], errors="ignore"))
    check_shards(dirs, manifests, local=("shard", "images_dir"))  # shards may have their own image folders
    for d, m, f in zip(dirs, manifests, frames):
        total = m.get("n_questions", m.get("n_images"))
        i, k = m["shard"]
        want = len(range(i, total, k)) if total is not None else len(f)
        if len(f) != want:
            raise ValueError(f"shard {i}/{k} in {d} has {len(f)} of its {want} items; resume it (run the same "
                             "command again) before merging")
    return pd.concat(frames, ignore_index=True)


def score_pope(rows: pd.DataFrame, n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """POPE metrics of answered questions; ``attrs["skipped_missing_images"]`` counts the others."""
    ok = rows[rows["status"] == "ok"]
    s = pope_summary(ok["label"], ok["prediction"], groups=ok["image"], n_resamples=n_resamples, seed=seed)
    s.attrs["skipped_missing_images"] = int((rows["status"] != "ok").sum())
    return s


def score_captions(rows: pd.DataFrame, scorer: CocoChair | None = None, **kw) -> tuple[pd.DataFrame, pd.DataFrame]:
    ok = rows[rows["status"] == "ok"][["image_id", "caption"]]
    summary, details = chair_score(ok, scorer or CocoChair.load(), **kw)
    summary.attrs["skipped_missing_images"] = int((rows["status"] != "ok").sum())
    return summary, details
