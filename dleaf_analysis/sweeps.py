"""Resumable sweeps: results are appended as they finish, one JSON line per finished unit, and a
re-run with the same arguments skips what is done.

A sweep directory holds ``manifest.json`` (what produced it: model weights, data, settings) and
``results.jsonl``.  A directory whose manifest differs is refused, never merged.  A line cut
short by a crash (even ``kill -9``) is ignored on reload, and its unit is redone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd
from tqdm.auto import tqdm

from dleaf_analysis.errors import DleafError
from dleaf_analysis.runs import ManifestMismatchError, check_same_run


class SweepMismatchError(DleafError, RuntimeError):
    """The output directory belongs to a different model, data or protocol."""


class ShardMismatchError(DleafError, ValueError):
    """Shard directories that do not make one whole run."""


def check_shards(dirs: list[Path], manifests: list[dict], local: tuple[str, ...] = ("shard",)) -> dict:
    """The manifest the shard directories ``dirs`` share (equal but for the ``local`` keys, which
    each shard may set for itself), after checking that their shards are distinct and make the
    whole set ``0..N-1``."""
    base = {k: v for k, v in manifests[0].items() if k not in local}
    for d, m in zip(dirs[1:], manifests[1:]):
        this = {k: v for k, v in m.items() if k not in local}
        if this != base:
            diff = sorted(k for k in set(base) | set(this) if base.get(k) != this.get(k))
            raise ShardMismatchError(f"these shard directories come from different runs: {d} differs from {dirs[0]} "
                                     "in " + ", ".join(diff))
    shards = sorted(tuple(m.get("shard", (0, 1))) for m in manifests)
    n = shards[0][1]
    if shards != [(i, n) for i in range(n)]:
        raise ShardMismatchError(f"incomplete or repeated shards: have {shards}, need 0..{n - 1} of {n}")
    return base


class ResultStore:
    """Append-only JSONL store of finished units, keyed by ``key``."""

    def __init__(self, directory: str | Path, manifest: dict) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        if not os.access(self.dir, os.W_OK):  # checked before any compute
            raise SweepMismatchError(f"{self.dir} is not writable; choose another --out directory")
        self.path = self.dir / "results.jsonl"
        mpath = self.dir / "manifest.json"
        manifest = json.loads(json.dumps(manifest, sort_keys=True, default=str))
        if mpath.is_file():
            old = json.loads(mpath.read_text())
            if old != manifest:
                try:
                    check_same_run(self.dir, old, manifest)
                except ManifestMismatchError as e:
                    raise SweepMismatchError(str(e)) from None
        else:
            tmp = mpath.with_suffix(".tmp")
            tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
            os.replace(tmp, mpath)
        self.manifest = manifest
        self._records = self._read()

    def _read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out, good_bytes = [], 0
        with open(self.path, "rb") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut short by a crash: drop it and everything after
                if not line.endswith(b"\n"):
                    break
                out.append(rec)
                good_bytes += len(line)
        if good_bytes != self.path.stat().st_size:
            with open(self.path, "r+b") as f:
                f.truncate(good_bytes)
        return out

    @property
    def done(self) -> set[str]:
        return {r["key"] for r in self._records}

    def add(self, key: str, rows: list[dict]) -> None:
        """Record a finished unit (its rows) durably."""
        self.add_many([(key, rows)])

    def add_many(self, units: list[tuple[str, list[dict]]]) -> None:
        """Record several finished units with one write and one ``fsync``."""
        recs = [{"key": k, "rows": rows} for k, rows in units]
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(r, default=_json_default) + "\n" for r in recs))
            f.flush()
            os.fsync(f.fileno())
        self._records.extend(recs)

    def frame(self) -> pd.DataFrame:
        rows = [dict(r, key=rec["key"]) for rec in self._records for r in rec["rows"]]
        return pd.DataFrame(rows)


def _short(v, n: int = 80) -> str:
    t = json.dumps(v, sort_keys=True, default=str)
    return t if len(t) <= n else t[: n - 3] + "..."


def _json_default(o):
    import numpy as np
    import torch

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(type(o).__name__)


def run_sweep(
    units: Iterable[tuple[str, object]],
    fn: Callable[[object], list[dict]],
    store: ResultStore,
    progress: bool = True,
    desc: str = "sweep",
) -> pd.DataFrame:
    """Run ``fn(unit) -> rows`` for every ``(key, unit)`` not yet in ``store``; returns all rows."""
    units = list(units)
    done = store.done
    todo = [(k, u) for k, u in units if k not in done]
    for key, unit in tqdm(todo, desc=desc, disable=not progress or not todo):
        store.add(key, fn(unit))
    return store.frame()


def run_items(
    items: Iterable[tuple[str, object]],
    fn: Callable[[list], list[list[dict]]],
    store: ResultStore,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "items",
) -> pd.DataFrame:
    """Run ``fn(batch of items) -> rows per item`` over the items not yet in ``store``, in batches.

    Units are keyed by *item identity* (its key), never by batch offset: a run resumed with
    another ``batch_size`` (say, after running out of GPU memory) continues with exactly the
    items that are missing, and no item is recorded twice.  Keys must be unique.
    """
    items = list(items)
    keys = [k for k, _ in items]
    if len(set(keys)) != len(keys):
        dup = pd.Series(keys)[pd.Series(keys).duplicated()].iloc[0]
        raise ValueError(f"item keys must be unique; {dup!r} appears more than once in the input")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    done = store.done
    todo = [(k, it) for k, it in items if k not in done]
    with tqdm(total=len(todo), desc=desc, disable=not progress or not todo) as bar:
        for i in range(0, len(todo), batch_size):
            batch = todo[i : i + batch_size]
            rows = fn([it for _, it in batch])
            if len(rows) != len(batch):
                raise RuntimeError(f"{desc}: the batch function returned {len(rows)} results for {len(batch)} items")
            store.add_many([(k, r) for (k, _), r in zip(batch, rows)])
            bar.update(len(batch))
    frame = store.frame()
    if not len(frame):
        return frame
    order = {k: i for i, k in enumerate(keys)}
    frame = frame[frame["key"].isin(order)]
    return frame.iloc[frame["key"].map(order).argsort(kind="stable")].reset_index(drop=True)
