"""Decoding cost of each method, measured side by side in one run, in CPU process time.

For each model and dtype, every run decodes the same prebuilt inputs (batch 1) for a fixed number
of tokens, on one thread; runs are interleaved and repeated.  Wall-clock ratios on this shared
machine were incoherent (another process's load lands on whichever run is timed), so time is the
process's CPU time, and each ratio is taken *within* a repeat (a run against the greedy runs of
the same repeat) and reported as the median with its range over the repeats.  Reported per run:

- ``cpu_ms_per_token``: decode-only CPU time per token (the prefill excluded), from CPU
  timestamps taken by a logits processor at every generated token (VCD, which has its own loop:
  the difference between an N-token and a 1-token run);
- ``vs_eager`` (and its range ``vs_eager_lo``..``vs_eager_hi``) / ``vs_sdpa``: against greedy
  with eager attention and with the model's fast attention (sdpa), paired by repeat;
- ``ops_per_token``: non-view aten operators dispatched per decoded token (each a kernel launch
  on a GPU, where a batch-1 decode is paced by launches; :func:`dleaf_analysis.profiling.count_ops`)
  and ``ops_vs_eager``;
- ``host_reads_per_token``: values read back to the host inside the method's pattern editors per
  token (:func:`dleaf_analysis.profiling.count_host_reads`; each stalls a GPU's launch queue);
- ``peak_mib``: peak RSS growth during one decode, in a fresh process, after a warm-up.

Runs: greedy (sdpa), greedy (eager), D-LEAF, uniform fusion, PAI, VCD, and generation capture with
the hook backend and with nnsight.  Models: the embedded model, and a LLaVA-1.5-7B-width random
model (hidden 4096, 32 heads, MLP 11008, 576 image tokens, ``--layers`` layers, default 8: the
editors' share grows with the candidate layers, 30 of 32 in LLaVA-1.5-7B) in fp32 and bf16.

    python benchmarks/method_throughput.py [--repeats 5] [--tokens 16] [--layers 8] [--json] [--readme]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pandas as pd
import torch
from transformers import LogitsProcessor, LogitsProcessorList

RUNS = ("greedy-sdpa", "greedy-eager", "dleaf", "uniform", "pai", "vcd", "capture-hooks", "capture-nnsight")
MODELS = {"embedded": "embedded (8 layers x 4 heads, 144 image tokens)",
          "7b-width": "LLaVA-1.5-7B width ({layers} layers x 32 heads, hidden 4096, 576 image tokens)"}


def setup(which: str, dtype: str = "fp32", layers: int = 2):
    """``(lm, inputs)``: the model (hook point installed) and one prebuilt prompt."""
    from dleaf_analysis import hooks
    from dleaf_analysis.models import load_model
    from dleaf_analysis.models.embedded import EmbeddedModelConfig, build_model, build_processor
    from dleaf_analysis.models.inputs import PromptBuilder
    from dleaf_analysis.models.loading import LoadedModel
    from dleaf_analysis.scenes import World, load_split

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    if which == "embedded":
        lm = load_model(dtype=dtype)
        img = load_split("dev", limit=1).image(0)
    else:
        cfg = EmbeddedModelConfig(image_size=336, patch_size=14, vision_hidden=32, vision_layers=1, vision_heads=2,
                                  text_hidden=4096, text_layers=layers, text_heads=32, text_intermediate=11008,
                                  max_positions=1024)
        proc = build_processor(World.load(), cfg)
        lm = LoadedModel.wrap(build_model(proc.tokenizer, cfg, seed=0).to(dt).eval(), proc, "7b-width random")
        img = (np.random.default_rng(0).random((336, 336, 3)) * 255).astype(np.uint8)
    hooks.install(lm.model)
    from dleaf_analysis.models.generation import DEFAULT_CAPTION_PROMPT

    inputs = dict(PromptBuilder(lm.processor).inputs([img], [DEFAULT_CAPTION_PROMPT], lm.image_size))
    inputs["pixel_values"] = inputs["pixel_values"].to(dt)
    return lm, inputs


class _Stamp(LogitsProcessor):
    """Records the process's CPU time at every generated token."""

    def __init__(self) -> None:
        self.t: list[float] = []

    def __call__(self, input_ids, scores):
        self.t.append(time.process_time())
        return scores


@contextmanager
def _attention(model, impl: str):
    """The language model's attention implementation for the block (the hook point after)."""
    from dleaf_analysis import hooks

    model.set_attn_implementation(impl)
    try:
        yield
    finally:
        hooks.install(model)


def _method(name: str, lm):
    from dleaf_analysis.interventions import get_method
    from dleaf_analysis.settings import tuned_config

    return get_method(name, tuned_config(name, lm.weights_hash))


def decode(lm, inputs, run: str, n: int) -> float:
    """Seconds per decoded token (prefill excluded) of one run."""
    from dleaf_analysis.tracing import trace_generation

    stamp = _Stamp()
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=lm.pad_token_id,
              logits_processor=LogitsProcessorList([stamp]))
    with torch.no_grad():
        if run in ("greedy-sdpa", "greedy-eager"):
            with _attention(lm.model, run.split("-")[1]):
                lm.model.generate(**inputs, **kw)
        elif run.startswith("capture-"):
            trace_generation(lm, None, inputs=inputs, max_new_tokens=n, backend=run.split("-")[1],
                             generate_kwargs={"min_new_tokens": n, "logits_processor": LogitsProcessorList([stamp])})
        elif run == "vcd":  # its own loop (no logits processor, stops at EOS): difference of two runs
            m = _method("vcd", lm)
            t0 = time.process_time()
            m.generate(lm, inputs, max_new_tokens=1)
            t1 = time.process_time()
            ids = m.generate(lm, inputs, max_new_tokens=n)
            t2 = time.process_time()
            k = ids.shape[1] - inputs["input_ids"].shape[1]  # tokens actually decoded
            return max((t2 - t1) - (t1 - t0), 0.0) / (k - 1) if k > 1 else float("nan")
        else:
            _method(run, lm).generate(lm, inputs, **kw)
    return (stamp.t[-1] - stamp.t[0]) / (len(stamp.t) - 1)


def _generate(lm, inputs, run: str, tokens: int) -> None:
    kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=lm.pad_token_id)
    if run in ("greedy-sdpa", "greedy-eager"):
        with _attention(lm.model, run.split("-")[1]):
            lm.model.generate(**inputs, **kw)
    elif run.startswith("capture-"):
        from dleaf_analysis.tracing import trace_generation

        trace_generation(lm, None, inputs=inputs, max_new_tokens=tokens, backend=run.split("-")[1],
                         generate_kwargs={"min_new_tokens": tokens})
    elif run == "vcd":
        _method("vcd", lm).generate(lm, inputs, max_new_tokens=tokens)
    else:
        _method(run, lm).generate(lm, inputs, **kw)


def counts_per_token(lm, inputs, run: str, n: int) -> tuple[float, float]:
    """``(non-view aten ops, host reads inside pattern editors)`` per decoded token: the difference
    between a ``1 + n``-token and a 1-token decode, divided by ``n`` (the prefill cancels)."""
    from dleaf_analysis.profiling import count_host_reads, count_ops

    ops, reads = [], []
    for tokens in (1, 1 + n):
        with count_ops() as c, count_host_reads() as r, torch.no_grad():
            _generate(lm, inputs, run, tokens)
        ops.append(sum(c.values()))
        reads.append(len(r))
    return (ops[1] - ops[0]) / n, (reads[1] - reads[0]) / n


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


def peak_memory(which: str, dtype: str, layers: int, run: str, n: int) -> float:
    """Peak RSS growth (MiB) of one decode in a fresh process (after a warm-up decode)."""
    here = str(Path(__file__).resolve().parent.parent)
    code = (f"import sys; sys.path.insert(0, {here!r}); "
            f"from benchmarks.method_throughput import setup, decode, _sampled_peak; "
            f"lm, inp = setup({which!r}, {dtype!r}, {layers}); decode(lm, inp, {run!r}, 2); "
            f"print(_sampled_peak(lambda: decode(lm, inp, {run!r}, {n})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench(which: str, dtype: str, layers: int, repeats: int, n: int, memory: bool, log) -> list[dict]:
    lm, inputs = setup(which, dtype, layers)
    times: dict[str, list[float]] = {r: [] for r in RUNS}
    for r in RUNS:  # warm-up
        decode(lm, inputs, r, 2)
    for i in range(repeats):
        for r in RUNS:
            times[r].append(decode(lm, inputs, r, n))
        log(f"{which} {dtype}: repeat {i + 1}/{repeats} done")
    t = {r: np.array(v) for r, v in times.items()}
    counts = {r: counts_per_token(lm, inputs, r, min(n, 4)) for r in RUNS}
    rows = []
    for r in RUNS:
        vs_eager = t[r] / t["greedy-eager"]  # paired: within each repeat
        vs_sdpa = t[r] / t["greedy-sdpa"]
        rows.append({"model": MODELS[which].format(layers=layers), "dtype": dtype, "method": r, "tokens": n,
                     "repeats": repeats, "cpu_ms_per_token": 1e3 * float(np.nanmedian(t[r])),
                     "vs_eager": float(np.nanmedian(vs_eager)), "vs_eager_lo": float(np.nanmin(vs_eager)),
                     "vs_eager_hi": float(np.nanmax(vs_eager)), "vs_sdpa": float(np.nanmedian(vs_sdpa)),
                     "ops_per_token": counts[r][0], "ops_vs_eager": counts[r][0] / counts["greedy-eager"][0],
                     "host_reads_per_token": counts[r][1],
                     "peak_mib": peak_memory(which, dtype, layers, r, n) if memory else float("nan")})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--layers", type=int, default=8, help="layers of the 7B-width model")
    ap.add_argument("--configs", default="embedded:fp32,7b-width:fp32,7b-width:bf16")
    ap.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory runs")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")
    ap.add_argument("--readme", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # CPU time of one thread: comparable between runs on a shared machine
    log = (lambda s: print(s, file=sys.stderr)) if args.json else print
    rows = []
    for c in args.configs.split(","):
        which, dtype = c.split(":")
        rows += bench(which, dtype, args.layers, args.repeats, args.tokens, not args.no_memory, log)
    df = pd.DataFrame(rows)
    res = Path(__file__).parent / "results"
    res.mkdir(exist_ok=True)
    df.to_csv(res / "method_throughput.csv", index=False)
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
    fmt = lambda v, f: "n/a" if v != v else format(v, f)  # noqa: E731
    lines = [f"torch {torch.__version__}, 1 thread, CPU process time; batch 1, {args.tokens} decoded tokens, "
             f"{args.repeats} interleaved repeats; decode-only time per token (prefill excluded, median of the "
             "repeats); ratios paired within each repeat (median, [min, max]); methods at their tuned settings "
             "(generic defaults on the random model); ops = non-view aten operators per decoded token (kernel "
             "launches on a GPU); host reads inside the method's pattern editors per token; peak RSS growth of one "
             "decode in a fresh process.", "",
             "| model | dtype | run | CPU ms / token | vs eager greedy [range] | vs sdpa greedy | ops / token "
             "| ops vs eager | host reads / token | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['dtype']} | {r['method']} | {r['cpu_ms_per_token']:.2f} "
              f"| {r['vs_eager']:.3f}x [{r['vs_eager_lo']:.3f}, {r['vs_eager_hi']:.3f}] | {r['vs_sdpa']:.3f}x "
              f"| {r['ops_per_token']:.0f} | {r['ops_vs_eager']:.3f}x | {r['host_reads_per_token']:.1f} "
              f"| {fmt(r['peak_mib'], '.0f')} |" for r in rows]
    text = "\n".join(lines)
    if not args.json:
        print(text)
    if args.readme:
        from dleaf_analysis.report import splice_readme

        splice_readme(text, "perf-methods", readme=Path(__file__).resolve().parent / "README.md")


if __name__ == "__main__":
    main()
