"""The first-run check of a checkpoint on a user's device: does everything work there?

``check_device`` loads the model twice, on the target device/dtype and on the CPU in float32,
feeds both the same inputs, and compares: the prompt's next-token logits (within a tolerance set
by the dtype), the greedy tokens, D-LEAF's tokens and D-LEAF's logged firings (step, layer); it
also times greedy and D-LEAF decoding per token on the target.  Disagreements are reported, not
raised: in bf16 a late token may legitimately differ; the report says where the runs part.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from dleaf_analysis.interventions import DLeaf
from dleaf_analysis.models.loading import LoadedModel, load_model
from dleaf_analysis.settings import tuned_config

# max |logit difference| accepted against the float32 CPU run, by the target's parameter dtype
LOGIT_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.25, torch.float16: 0.05}


@dataclass
class DeviceReport:
    device: str
    dtype: str
    n_tokens: int
    max_logit_diff: float
    logit_tolerance: float
    greedy_tokens_agree: int  # leading generated tokens equal to the CPU run's
    dleaf_tokens_agree: int
    dleaf_firings_agree: bool  # same (step, layer) firings over the agreeing steps
    n_firings: int
    greedy_ms_per_token: float
    dleaf_ms_per_token: float
    ok: bool = False
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _probe_image(lm: LoadedModel, seed: int):
    """A deterministic image: a scene of the dev split for the embedded model, else seeded noise."""
    if lm.is_embedded:
        from dleaf_analysis.scenes import load_split

        return load_split("dev", limit=1).image(0)
    rng = np.random.default_rng(seed)
    return (rng.random((lm.image_size, lm.image_size, 3)) * 255).astype(np.uint8)


def _decode(lm: LoadedModel, inputs: dict, n: int, method: DLeaf | None) -> tuple[list[int], list[tuple], float]:
    """Generated ids, D-LEAF's firings ``(step, layer)`` and seconds per token (device-synchronised)."""
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=lm.pad_token_id)
    dev = next(lm.model.parameters()).device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        ids, record = method.decode(lm, inputs, **kw) if method is not None else (lm.model.generate(**inputs, **kw), None)
    sync()
    dt = (time.perf_counter() - t0) / n
    new = ids[0, inputs["input_ids"].shape[1]:].tolist()
    log = [(int(r["step"]), int(r["layer"])) for r in record.log] if record is not None else []
    return new, sorted(log), dt


def _leading_agreement(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def check_device(model: str | Path | None = None, device: str = "cuda", dtype: str | None = None, n_tokens: int = 8,
                 prompt: str | None = None, seed: int = 0, reference: LoadedModel | None = None,
                 target: LoadedModel | None = None) -> DeviceReport:
    """Compare greedy and D-LEAF on ``device``/``dtype`` with a float32 CPU run of the same model.

    ``reference``/``target`` may be passed already loaded (tests); otherwise both are loaded
    from ``model`` (default: the embedded model).
    """
    ref = reference or load_model(model, device="cpu", dtype="fp32")
    tgt = target or (load_model(model, dtype=dtype, device_map="auto") if device == "auto"
                     else load_model(model, device=device, dtype=dtype))
    prompt = prompt or ("describe the image ." if ref.is_embedded else "Please describe this image in detail.")
    image = _probe_image(ref, seed)
    cfg = tuned_config("dleaf", ref.weights_hash)
    r_in, t_in = ref.inputs([image], [prompt]), tgt.inputs([image], [prompt])
    with torch.no_grad():
        r_logits = ref.model(**r_in).logits[0, -1].float()
        t_logits = tgt.model(**t_in).logits[0, -1].float().cpu()
    diff = float((r_logits - t_logits).abs().max())
    p_dtype = next(tgt.model.parameters()).dtype
    tol = LOGIT_TOLERANCE.get(p_dtype, 0.25)

    r_greedy, _, _ = _decode(ref, r_in, n_tokens, None)
    t_greedy, _, t_greedy_dt = _decode(tgt, t_in, n_tokens, None)
    r_dleaf, r_log, _ = _decode(ref, r_in, n_tokens, DLeaf(**cfg))
    t_dleaf, t_log, t_dleaf_dt = _decode(tgt, t_in, n_tokens, DLeaf(**cfg))

    g_agree, d_agree = _leading_agreement(r_greedy, t_greedy), _leading_agreement(r_dleaf, t_dleaf)
    # firings are comparable up to (and including) the first step whose inputs are still identical
    upto = d_agree
    firings_agree = [f for f in r_log if f[0] <= upto] == [f for f in t_log if f[0] <= upto]
    rep = DeviceReport(device=str(next(tgt.model.parameters()).device), dtype=str(p_dtype).replace("torch.", ""),
                       n_tokens=n_tokens, max_logit_diff=diff, logit_tolerance=tol, greedy_tokens_agree=g_agree,
                       dleaf_tokens_agree=d_agree, dleaf_firings_agree=firings_agree, n_firings=len(t_log),
                       greedy_ms_per_token=1e3 * t_greedy_dt, dleaf_ms_per_token=1e3 * t_dleaf_dt)
    if diff > tol:
        rep.problems.append(f"prompt logits differ from the CPU float32 run by {diff:.3g} (tolerance {tol:g})")
    strict = p_dtype == torch.float32
    for name, k in (("greedy", g_agree), ("D-LEAF", d_agree)):
        if k < n_tokens and strict:
            rep.problems.append(f"{name} tokens part from the CPU run at token {k}")
    if not firings_agree:
        rep.problems.append("D-LEAF fired at different (step, layer) cells than on the CPU")
    rep.ok = not rep.problems
    return rep
