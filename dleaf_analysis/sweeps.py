"""Resumable sweeps: results are appended as they finish, one JSON line per finished unit, and a
re-run with the same arguments skips what is done.

A sweep directory holds ``manifest.json`` (what produced it: model weights, data, settings) and
``results.jsonl``.  A directory whose manifest differs is refused, never merged.  A line cut
short by a crash (even ``kill -9``) is ignored on reload, and its unit is redone; a unit recorded
twice is read once.  One process writes to a directory at a time (a lock held for the life of the
:class:`ResultStore`); readers of finished results open it ``read_only``.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import gc
import json
import os
import time
import weakref
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


LOCK_FILE = ".lock"
_OPEN_STORES: "weakref.WeakSet[ResultStore]" = weakref.WeakSet()


class ResultStore:
    """Append-only JSONL store of finished units, keyed by ``key``.

    One writer per directory: the store takes an exclusive lock (``fcntl.flock`` on ``.lock``, which
    holds the writer's pid) before anything is written and keeps it until :meth:`close` (or garbage
    collection, or process exit); a second writer is refused with :class:`SweepMismatchError`.
    ``read_only=True`` opens finished results without the lock (and writes nothing).  A key recorded
    twice is read once (its first record).
    """

    def __init__(self, directory: str | Path, manifest: dict, read_only: bool = False, reset: bool = False) -> None:
        self.dir = Path(directory)
        self.read_only = read_only
        self._lock_fd: int | None = None
        self._lock_pid: int | None = None
        self.path = self.dir / "results.jsonl"
        mpath = self.dir / "manifest.json"
        manifest = json.loads(json.dumps(manifest, sort_keys=True, default=str))
        if read_only:
            if not mpath.is_file():
                raise SweepMismatchError(f"{self.dir} holds no results (no manifest.json); give the --out directory "
                                         "of a run")
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            if not os.access(self.dir, os.W_OK):  # checked before any compute
                raise SweepMismatchError(f"{self.dir} is not writable; choose another --out directory")
            self._acquire()  # before anything is written
        try:
            if reset and not read_only:  # replace another run's results, under the lock
                self.path.unlink(missing_ok=True)
                mpath.unlink(missing_ok=True)
            if mpath.is_file():
                old = json.loads(mpath.read_text())
                if old != manifest:
                    try:
                        check_same_run(self.dir, old, manifest)
                    except ManifestMismatchError as e:
                        raise SweepMismatchError(str(e)) from None
            elif not read_only:
                tmp = mpath.with_suffix(".tmp")
                tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
                os.replace(tmp, mpath)
            self.manifest = manifest
            self._records = self._read()
            self._keys = {r["key"] for r in self._records}
        except BaseException:
            self.close()
            raise

    # -- the writer's lock -----------------------------------------------------------------------
    def _acquire(self) -> None:
        lock = self.dir / LOCK_FILE
        collected = False
        for _ in range(10):
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                pid = _read_pid(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise SweepMismatchError(f"cannot lock {self.dir} ({e.strerror}): its filesystem does not support "
                                             "file locks; use an --out directory on a local disk") from None
                if pid == os.getpid() and not collected:  # perhaps a store of this process nobody holds any more
                    collected = True
                    gc.collect()
                    continue
                who = f"pid {pid}" if pid else "pid unknown"
                raise SweepMismatchError(f"another process ({who}) is writing to {self.dir}; wait for it to finish "
                                         "or use another --out directory") from None
            try:  # the file locked must still be the one at the path (a closing writer removes it)
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._lock_fd, self._lock_pid = fd, os.getpid()
            _OPEN_STORES.add(self)
            return
        raise SweepMismatchError(f"cannot lock {self.dir}: its lock file keeps changing; is another process "
                                 "writing there? use another --out directory")

    def close(self) -> None:
        """Release the directory (idempotent); the store can still be read, not written."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            return
        try:
            if self._lock_pid == os.getpid():  # a forked child shares the lock: only its owner releases it
                lock = self.dir / LOCK_FILE
                try:
                    if os.path.samestat(os.fstat(fd), os.stat(lock)):
                        os.unlink(lock)
                except OSError:
                    pass
                fcntl.flock(fd, fcntl.LOCK_UN)
        except Exception:  # pragma: no cover - e.g. at interpreter shutdown
            pass
        finally:
            try:
                os.close(fd)
            except Exception:  # pragma: no cover
                pass

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover
            pass

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- records ---------------------------------------------------------------------------------
    def _read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out, seen, good_bytes = [], set(), 0
        with open(self.path, "rb") as f:
            for n, line in enumerate(f, 1):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut short by a crash: drop it and everything after
                if not line.endswith(b"\n"):
                    break
                if not (isinstance(rec, dict) and isinstance(rec.get("key"), (str, int, float)) and isinstance(rec.get("rows"), list)):
                    raise SweepMismatchError(f"{self.path}:{n} is not a result record ({{\"key\": ..., \"rows\": [...]}}); "
                                             "the file was edited or written by something else: move it away and re-run")
                good_bytes += len(line)
                if rec["key"] in seen:  # written twice (e.g. by a second writer before locks): keep the first
                    continue
                seen.add(rec["key"])
                out.append(rec)
        if good_bytes != self.path.stat().st_size and not self.read_only:
            with open(self.path, "r+b") as f:
                f.truncate(good_bytes)
        return out

    @property
    def done(self) -> set[str]:
        return set(self._keys)

    def add(self, key: str, rows: list[dict]) -> None:
        """Record a finished unit (its rows) durably."""
        self.add_many([(key, rows)])

    def add_many(self, units: list[tuple[str, list[dict]]]) -> None:
        """Record several finished units with one write and one ``fsync`` (a key already recorded is
        kept as first recorded)."""
        if self._lock_fd is None:
            raise SweepMismatchError(f"this store of {self.dir} is " + ("read-only" if self.read_only else "closed")
                                     + "; open a writing ResultStore to add results")
        recs, keys = [], set(self._keys)
        for k, rows in units:
            if k not in keys:
                keys.add(k)
                recs.append({"key": k, "rows": rows})
        if not recs:
            return
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(r, default=_json_default) + "\n" for r in recs))
            f.flush()
            os.fsync(f.fileno())
        self._records.extend(recs)
        self._keys = keys

    def frame(self) -> pd.DataFrame:
        rows = [dict(r, key=rec["key"]) for rec in self._records for r in rec["rows"]]
        return pd.DataFrame(rows)

    def reload(self) -> None:
        """Re-read the records (another process may have added some)."""
        self._records = self._read()
        self._keys = {r["key"] for r in self._records}


def _read_pid(fd: int) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return int(os.read(fd, 32).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None


@atexit.register
def _close_stores() -> None:
    for store in list(_OPEN_STORES):
        store.close()


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


def open_store(directory: str | Path, manifest: dict, reset: bool = False) -> ResultStore:
    """The result store of a run.  Under a multi-rank launch (:mod:`dleaf_analysis.distributed`)
    rank 0 opens it as the writer (with the lock, checking the manifest) and the other ranks, after
    a barrier, read it; each rank then records its own units in ``<dir>/.rank-<r>/``."""
    from dleaf_analysis import distributed

    p = distributed.place()
    if not distributed.active():
        return ResultStore(directory, manifest, reset=reset)
    store = None
    error = None
    if p.main:
        try:
            store = ResultStore(directory, manifest, reset=reset)
        except Exception as e:  # every rank must reach the barrier, then every rank fails alike
            error = e
    distributed.barrier()
    if error is not None:
        raise error
    return store if p.main else ResultStore(directory, manifest, read_only=True)


def _distributed_run(todo: list, work: Callable[[list], list[tuple[str, list[dict]]]], store: ResultStore,
                     order: list[str], progress: bool, desc: str) -> None:
    """Run ``todo`` (a list of chunks) across the ranks, each chunk exactly once, handed out through
    the c10d store; every rank records into its own store; rank 0 merges them into ``store`` in
    ``order`` after a barrier."""
    from dleaf_analysis import distributed

    p = distributed.place()
    if os.environ.get("DLEAF_TEST_LATE_RANK", "") == str(p.rank):  # test hook: this rank arrives late, after
        t0 = time.time()                                              # another has recorded a unit (or 5 s)
        while time.time() - t0 < 5 and not any(f.stat().st_size for f in store.dir.glob(".rank-*/results.jsonl")):
            time.sleep(0.02)
    done = set(store.done)
    for d in sorted(store.dir.glob(".rank-*")):  # units a crashed launch finished
        if (d / "manifest.json").is_file():
            done |= ResultStore(d, store.manifest, read_only=True).done
    todo = [c for c in todo if any(k not in done for k, _ in c)]
    # every rank must index the same list: no rank records a unit before all have read what is done
    distributed.barrier()
    mine = ResultStore(store.dir / f".rank-{p.rank}", store.manifest)
    queue = distributed.UnitQueue(f"{store.dir}:{desc}:{len(order)}", len(todo))
    with tqdm(total=len(todo), desc=f"{desc} (rank {p.rank}/{p.world_size})", disable=not progress or not todo) as bar:
        kill = os.environ.get("DLEAF_TEST_KILL_RANK", "")  # test hook "rank:n": that rank dies after n units
        n_done = 0
        for i in queue:
            chunk = [(k, u) for k, u in todo[i] if k not in done]
            with distributed.unit_scope():  # nested sweeps in this unit are this rank's alone
                rows = work(chunk)
            mine.add_many(rows)
            bar.update(1)
            n_done += 1
            if kill == f"{p.rank}:{n_done}":
                os._exit(9)
    mine.close()
    distributed.barrier()
    if p.main:
        records: dict[str, list[dict]] = {}
        for d in sorted(store.dir.glob(".rank-*")):
            for rec in ResultStore(d, store.manifest, read_only=True)._records:
                records.setdefault(rec["key"], rec["rows"])
        store.add_many([(k, records[k]) for k in order if k in records and k not in store.done])
        import shutil

        for d in sorted(store.dir.glob(".rank-*")):
            shutil.rmtree(d, ignore_errors=True)
    distributed.barrier()
    if not p.main:
        store.reload()
    distributed.barrier()  # every rank has read the merged store before rank 0 moves on (and may remove it)


def run_sweep(
    units: Iterable[tuple[str, object]],
    fn: Callable[[object], list[dict]],
    store: ResultStore,
    progress: bool = True,
    desc: str = "sweep",
) -> pd.DataFrame:
    """Run ``fn(unit) -> rows`` for every ``(key, unit)`` not yet in ``store``; returns all rows (in
    unit order for the units of this run).  Under a multi-rank launch the units are shared out
    dynamically (:mod:`dleaf_analysis.distributed`); the rows are the same as one process's."""
    from dleaf_analysis import distributed

    units = list(units)
    done = store.done
    todo = [(k, u) for k, u in units if k not in done]
    if distributed.active():
        _distributed_run([[x] for x in todo], lambda c: [(k, fn(u)) for k, u in c], store, [k for k, _ in units],
                         progress, desc)
    else:
        for key, unit in tqdm(todo, desc=desc, disable=not progress or not todo):
            store.add(key, fn(unit))
    frame = store.frame()
    if not len(frame):
        return frame
    order = {k: i for i, (k, _) in enumerate(units)}
    extra = ~frame["key"].isin(order)  # units of an earlier selection stay, after these
    rank = frame["key"].map(order).where(~extra, len(order))
    return frame.iloc[rank.argsort(kind="stable")].reset_index(drop=True)


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
    items that are missing, and no item is recorded twice.  Keys must be unique.  Under a
    multi-rank launch the batches are shared out dynamically.
    """
    from dleaf_analysis import distributed

    items = list(items)
    keys = [k for k, _ in items]
    if len(set(keys)) != len(keys):
        dup = pd.Series(keys)[pd.Series(keys).duplicated()].iloc[0]
        raise ValueError(f"item keys must be unique; {dup!r} appears more than once in the input")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    done = store.done
    todo = [(k, it) for k, it in items if k not in done]

    def work(batch):
        rows = fn([it for _, it in batch])
        if len(rows) != len(batch):
            raise RuntimeError(f"{desc}: the batch function returned {len(rows)} results for {len(batch)} items")
        return [(k, r) for (k, _), r in zip(batch, rows)]

    if distributed.active():
        _distributed_run([todo[i:i + batch_size] for i in range(0, len(todo), batch_size)], work, store, keys,
                         progress, desc)
    else:
        with tqdm(total=len(todo), desc=desc, disable=not progress or not todo) as bar:
            for i in range(0, len(todo), batch_size):
                batch = todo[i : i + batch_size]
                store.add_many(work(batch))
                bar.update(len(batch))
    frame = store.frame()
    if not len(frame):
        return frame
    order = {k: i for i, k in enumerate(keys)}
    frame = frame[frame["key"].isin(order)]
    return frame.iloc[frame["key"].map(order).argsort(kind="stable")].reset_index(drop=True)
