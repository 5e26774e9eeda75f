"""Resumable sweeps: kill -9 mid-run, re-run, nothing lost, nothing finished redone."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from dleaf_analysis.sweeps import ResultStore, SweepMismatchError, run_sweep

SCRIPT = textwrap.dedent("""
    import sys, time
    from dleaf_analysis.sweeps import ResultStore, run_sweep
    out, calls = sys.argv[1], sys.argv[2]
    def fn(u):
        with open(calls, "a") as f:
            f.write(f"{u}\\n")
        time.sleep(0.15)
        return [{"unit": u, "value": u * u}]
    store = ResultStore(out, {"model": "m", "n": 20})
    run_sweep([(f"u{i}", i) for i in range(20)], fn, store, progress=False)
""")


def test_kill_dash_nine_and_resume(tmp_path):
    script = tmp_path / "sweep.py"
    script.write_text(SCRIPT)
    out, calls = tmp_path / "out", tmp_path / "calls.txt"
    p = subprocess.Popen([sys.executable, str(script), str(out), str(calls)])
    deadline = time.time() + 60
    while time.time() < deadline:
        if (out / "results.jsonl").is_file() and len((out / "results.jsonl").read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    finished_before = len((out / "results.jsonl").read_text().splitlines())
    assert 5 <= finished_before < 20
    # simulate a line cut short by the crash
    with open(out / "results.jsonl", "a") as f:
        f.write('{"key": "u99", "rows": [{"unit"')
    subprocess.run([sys.executable, str(script), str(out), str(calls)], check=True)
    recs = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    keys = [r["key"] for r in recs]
    assert sorted(keys) == sorted(f"u{i}" for i in range(20)) and len(keys) == 20
    assert all(r["rows"][0]["value"] == r["rows"][0]["unit"] ** 2 for r in recs)
    called = [int(x) for x in calls.read_text().split()]
    # every finished unit ran once; at most the one in flight at the kill ran twice
    assert len(called) - 20 <= 1
    assert all(called.count(i) == 1 for i in range(finished_before))


def test_other_manifest_is_refused(tmp_path):
    ResultStore(tmp_path, {"model": "a"})
    with pytest.raises(SweepMismatchError, match='model: this run has "b", the directory has "a"'):
        ResultStore(tmp_path, {"model": "b"})


def test_unwritable_directory_is_refused_before_compute(tmp_path, monkeypatch):
    import dleaf_analysis.sweeps as sweeps

    # CI runs as root, where permission bits are not enforced: simulate a read-only directory
    monkeypatch.setattr(sweeps.os, "access", lambda path, mode: False)
    with pytest.raises(SweepMismatchError, match="not writable"):
        ResultStore(tmp_path / "out", {"x": 1})
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_run_sweep_skips_done(tmp_path):
    store = ResultStore(tmp_path, {"x": 1})
    seen = []
    fn = lambda u: seen.append(u) or [{"u": u}]  # noqa: E731
    run_sweep([("a", 1), ("b", 2)], fn, store, progress=False)
    store.close()  # one writer per directory: the next run's store takes over
    df = run_sweep([("a", 1), ("b", 2), ("c", 3)], fn, ResultStore(tmp_path, {"x": 1}), progress=False)
    assert seen == [1, 2, 3] and sorted(df["u"]) == [1, 2, 3]
