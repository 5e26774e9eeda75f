"""Throughput of decoding methods as a ratio to greedy, measured side by side in one run.

Time per generated token (median of interleaved repeats, fixed length via min_new_tokens) for
greedy, D-LEAF, PAI, uniform fusion and VCD, on the embedded model and on a LLaVA-1.5-shaped
random model (576 image tokens); peak resident memory of one run of each, in a fresh process.

    python benchmarks/method_throughput.py [--repeats 7] [--readme]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch

METHODS = ("greedy", "dleaf", "pai", "uniform", "vcd")
N_TOKENS = 20


def _setup(which: str):
    from dleaf_analysis import hooks
    from dleaf_analysis.models import load_model
    from dleaf_analysis.models.inputs import PromptBuilder
    from dleaf_analysis.models.loading import LoadedModel
    from dleaf_analysis.models.tiny import tiny_llava15
    from dleaf_analysis.scenes import load_split

    if which == "embedded":
        lm = load_model()
        img = load_split("dev", limit=1).image(0)
    else:
        model, proc = tiny_llava15(layers=4, hidden=256, heads=8)
        lm = LoadedModel.wrap(model, proc, "llava-1.5-shaped random")
        img = (np.random.default_rng(0).random((336, 336, 3)) * 255).astype(np.uint8)
    hooks.install(lm.model)
    inputs = PromptBuilder(lm.processor).inputs([img], ["describe the image ."], lm.image_size)
    return lm, inputs


def _method(name: str, lm):
    """The method at its tuned settings for this model (generic defaults for other models)."""
    from dleaf_analysis.settings import tuned_config
    from dleaf_analysis.interventions import get_method

    return get_method(name, tuned_config(name, lm.weights_hash))


def _run(lm, inputs, m):
    kw = dict(max_new_tokens=N_TOKENS, do_sample=False, pad_token_id=lm.pad_token_id)
    if m.name != "vcd":
        kw["min_new_tokens"] = N_TOKENS
    return m.generate(lm, inputs, **kw)


def _sampled_peak(fn) -> float:
    """Peak RSS growth (MiB) while ``fn`` runs, sampled every millisecond by a thread."""
    import threading

    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    t = threading.Thread(target=sample)
    t.start()
    try:
        fn()
    finally:
        stop.set()
        t.join()
    return (peak[0] - base) / 2**20


def peak_memory(which: str, method: str) -> float:
    """Peak RSS growth (MiB) during one decode with ``method``, in a fresh process (after a warm-up decode)."""
    code = (f"import sys; sys.path.insert(0, {os.getcwd()!r}); "
            f"from benchmarks.method_throughput import _setup, _method, _run, _sampled_peak; "
            f"lm, inp = _setup({which!r}); m = _method({method!r}, lm); _run(lm, inp, m); "
            f"print(_sampled_peak(lambda: _run(lm, inp, m)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench(which: str, repeats: int) -> list[tuple]:
    lm, inputs = _setup(which)
    methods = {n: _method(n, lm) for n in METHODS}
    times: dict[str, list[float]] = {n: [] for n in METHODS}
    lengths = {}
    with torch.no_grad():
        for n, m in methods.items():
            lengths[n] = _run(lm, inputs, m).shape[1] - inputs["input_ids"].shape[1]
        for _ in range(repeats):
            for n, m in methods.items():
                t = time.perf_counter()
                _run(lm, inputs, m)
                times[n].append((time.perf_counter() - t) / lengths[n])
    base = min(times["greedy"])
    rows = []
    for n in METHODS:
        med = min(times[n])
        rows.append((which, n, lengths[n], med * 1e3, med / base, peak_memory(which, n)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--readme", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = bench("embedded", args.repeats) + bench("llava-1.5-shaped", args.repeats)
    names = {"embedded": "embedded (6 layers, 64 image tokens)",
             "llava-1.5-shaped": "LLaVA-1.5-shaped random (4 x 8 heads, 576 image tokens)"}
    lines = [f"torch threads: {torch.get_num_threads()}; best of {args.repeats} interleaved repeats, batch 1, "
             f"{N_TOKENS} tokens; methods at their tuned settings (`data/tuned_methods.json`; generic defaults on the "
             "random model); peak RSS growth during one decode (after a warm-up) in a fresh process, sampled every ms.",
             "",
             "| model | method | ms / token | ratio to greedy | peak RSS growth (MiB) |", "|---|---|---|---|---|"]
    lines += [f"| {names[w]} | {n} | {ms:.2f} | {r:.3f}x | {mem:.1f} |" for w, n, _, ms, r, mem in rows]
    text = "\n".join(lines)
    print(text)
    import pandas as pd

    res = Path(__file__).parent / "results"
    res.mkdir(exist_ok=True)
    pd.DataFrame(rows, columns=["model", "method", "tokens", "ms_per_token", "ratio_to_greedy", "peak_rss_growth_mib"]).replace(
        names).to_csv(res / "method_throughput.csv", index=False)
    if args.readme:
        from dleaf_analysis.report import splice_readme

        splice_readme(text, "perf-methods")


if __name__ == "__main__":
    main()
