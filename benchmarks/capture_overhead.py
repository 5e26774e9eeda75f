"""Cost of full diagnostic capture during greedy generation, as a ratio to plain generation.

Plain ``generate`` and ``trace_generation`` (nnsight and plain-hook backends; every layer and
head, every step: image attention, key-group masses, row entropy) are timed interleaved, in one
process, on (a) the embedded model and (b) a LLaVA-1.5-shaped random model (576 image tokens).

    python benchmarks/capture_overhead.py [--repeats 7] [--readme]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch

from dleaf_analysis import hooks
from dleaf_analysis.models import load_model
from dleaf_analysis.models.inputs import PromptBuilder
from dleaf_analysis.models.loading import LoadedModel
from dleaf_analysis.models.tiny import tiny_llava15
from dleaf_analysis.scenes import load_split
from dleaf_analysis.tracing import trace_generation


def bench(lm: LoadedModel, image, n_tokens: int | None, repeats: int) -> dict:
    hooks.install(lm.model)
    inputs = PromptBuilder(lm.processor).inputs([image], ["describe the image ."], lm.image_size)
    kw = dict(do_sample=False, pad_token_id=lm.pad_token_id, max_new_tokens=n_tokens or 32)
    if n_tokens:  # random weights: force a fixed length on every run
        kw["min_new_tokens"] = n_tokens
    extra = {"min_new_tokens": n_tokens} if n_tokens else None
    runs = {
        "plain generate": lambda: lm.model.generate(**inputs, **kw),
        # the same prebuilt inputs for all three: only generation and capture are timed
        "trace (hooks)": lambda: trace_generation(lm, None, inputs=inputs, max_new_tokens=kw["max_new_tokens"],
                                                  backend="hooks", generate_kwargs=extra),
        "trace (nnsight)": lambda: trace_generation(lm, None, inputs=inputs, max_new_tokens=kw["max_new_tokens"],
                                                    backend="nnsight", generate_kwargs=extra),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    steps: dict[str, int] = {}
    with torch.no_grad():
        for name, fn in runs.items():  # warm-up
            out = fn()
            steps[name] = out.shape[1] - inputs["input_ids"].shape[1] if torch.is_tensor(out) else out.n_steps
        for _ in range(repeats):
            for name, fn in runs.items():
                t = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t) / steps[name])
    base = min(times["plain generate"])  # best of N: the least disturbed run of each
    return {name: (min(v) * 1e3, min(v) / base, steps[name]) for name, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--readme", action="store_true", help="splice the table into README.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    lm = load_model()
    img = load_split("dev", limit=1).image(0)
    for name, (ms, ratio, n) in bench(lm, img, None, args.repeats).items():
        rows.append(("embedded (6 layers x 4 heads, 144 image tokens)", name, n, ms, ratio))
    model, proc = tiny_llava15(layers=4, hidden=256, heads=8)
    big = LoadedModel.wrap(model, proc, "llava-1.5-shaped random")
    img336 = (np.random.default_rng(0).random((336, 336, 3)) * 255).astype(np.uint8)
    for name, (ms, ratio, n) in bench(big, img336, 20, args.repeats).items():
        rows.append(("LLaVA-1.5-shaped random (4 layers x 8 heads, 576 image tokens)", name, n, ms, ratio))
    lines = [
        f"torch threads: {torch.get_num_threads()}; best of {args.repeats} interleaved repeats; time per generated token; "
        "the same prebuilt inputs for every run.",
        "",
        "| model | run | tokens | ms / token | ratio to plain |",
        "|---|---|---|---|---|",
    ] + [f"| {m} | {r} | {n} | {ms:.2f} | {ratio:.3f}x |" for m, r, n, ms, ratio in rows]
    text = "\n".join(lines)
    print(text)
    if args.readme:
        from dleaf_analysis.report import splice_readme

        splice_readme(text, "perf-capture")


if __name__ == "__main__":
    main()
