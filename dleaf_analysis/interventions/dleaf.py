"""D-LEAF (docs/method.md): at each decoding step, the layers whose LIAE exceeds a dynamic
threshold have their low-IAF heads fused toward the best head on the current query row,
post-softmax: ``a_h <- (1 - gamma) a_h + gamma a_best``.

Thresholds: ``running`` (the layer's running mean + ``k`` running std over the steps so far),
``bas`` (best attention score: ``(1 + delta)`` times the lowest LIAE so far), ``static`` (a
fixed layer set fires at every step: a control).  Variants (named, tunable): ``warmup`` (no
firing in the first steps, where the running std rests on one or two observations),
``target_rate`` (``k`` set so that a Gaussian statistic fires at that rate), candidate
``layers`` (any set, early layers included), and ``running_seed="prefill-rows"`` (statistics
seeded from the prompt's rows, so step 0 -- a one-token answer -- can fire).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch

from dleaf_analysis import diagnostics as D
from dleaf_analysis import hooks
from dleaf_analysis.interventions.base import (ConfigError, Method, RunRecord, check_layers, check_range,
                                               default_layers, register)
import dleaf_analysis.interventions.fused  # noqa: F401  (registers dleaf::layer_step)
from dleaf_analysis.interventions.ops import FUSIONS, last_row, with_last_row
from dleaf_analysis.models.adapters import ModelAdapter

THRESHOLDS = ("running", "bas", "static")
RUNNING_SEEDS = ("prefill-last", "prefill-rows")
HEAD_SELECTIONS = ("below-mean", "bottom-k", "below-rho", "all")


@register
@dataclass
class DLeaf(Method):
    """D-LEAF: dynamic layer selection by LIAE, head correction by IAF (docs/method.md)."""

    name: ClassVar[str] = "dleaf"
    # defaults = the paper's description where it gives one; the tuned settings of a model are in
    # data/tuned_methods.json (read by every command)
    gamma: float = 0.5
    threshold: str = "running"
    k: float = 0.5
    delta: float = 0.05
    layers: list[int] | None = None  # candidate layers (running/bas) or the fixed set (static); None: all but the first two
    head_selection: str = "below-mean"
    bottom_k: int = 1
    rho: float = 0.5
    liae_variant: str = "mean-map"
    iaf_variant: str = "mass"
    # "row": the best head's whole row is mixed in (Eq. 4 as written); "image": only
    # the image columns are mixed, text columns kept, row renormalised
    fusion: str = "row"
    # how the running statistics start: "prefill-last" (the prefill's last query row only: no layer
    # can fire at step 0) or "prefill-rows" (every prompt query row after the image: step 0, and so a
    # one-token answer such as POPE's, can be corrected)
    running_seed: str = "prefill-last"
    warmup: int = 0  # no layer fires before this decoding step (its statistics are still updated)
    target_rate: float | None = None  # running threshold only: k = Phi^-1(1 - target_rate), overriding k
    record: bool = True

    def validate(self, n_layers: int | None = None, n_heads: int | None = None) -> "DLeaf":
        check_range("gamma", self.gamma, 0.0, 1.0)
        for name, value, choices in (("running_seed", self.running_seed, RUNNING_SEEDS),
                                     ("threshold", self.threshold, THRESHOLDS),
                                     ("head_selection", self.head_selection, HEAD_SELECTIONS),
                                     ("liae_variant", self.liae_variant, D.LIAE_VARIANTS),
                                     ("iaf_variant", self.iaf_variant, D.IAF_VARIANTS),
                                     ("fusion", self.fusion, FUSIONS)):
            if value not in choices:
                raise ConfigError(f"unknown {name} {value!r}; choose one of {choices}")
        if self.k < 0 or self.delta < 0:
            raise ConfigError("k and delta must be >= 0")
        if self.warmup < 0:
            raise ConfigError(f"warmup must be >= 0 steps, got {self.warmup}")
        if self.target_rate is not None:
            if isinstance(self.target_rate, bool) or not isinstance(self.target_rate, (int, float)):
                raise ConfigError(f"target_rate must be a number in (0, 1), got {self.target_rate!r}")
            check_range("target_rate", self.target_rate, 1e-6, 1 - 1e-6)
            if self.threshold != "running":
                raise ConfigError("target_rate sets the running threshold's k; use it with threshold 'running'")
        check_range("rho", self.rho, 0.0, 1.0)
        if isinstance(self.bottom_k, bool) or not isinstance(self.bottom_k, int):
            raise ConfigError(f"bottom_k must be an integer, got {self.bottom_k!r}")
        if self.bottom_k < 1 or (n_heads is not None and self.bottom_k >= n_heads):
            hi = f"{n_heads - 1}" if n_heads is not None else "H - 1"
            raise ConfigError(f"bottom_k must be in [1, {hi}], got {self.bottom_k}")
        check_layers("layers", self.layers, n_layers)
        return self

    @property
    def effective_k(self) -> float:
        """The running threshold's multiplier: ``k``, or the normal quantile of ``target_rate``."""
        if self.target_rate is None:
            return self.k
        from scipy.stats import norm

        return float(norm.ppf(1 - self.target_rate))

    @property
    def prompt_rows(self) -> str:
        return "all" if self.threshold != "static" and self.running_seed == "prefill-rows" else "last"

    def candidate_layers(self, n_layers: int) -> list[int]:
        return list(self.layers) if self.layers is not None else default_layers(n_layers)

    def select_heads(self, iaf: torch.Tensor) -> torch.Tensor:
        """``iaf [B, H]`` -> heads to correct ``[B, H]`` (never the best head)."""
        best = iaf.argmax(-1, keepdim=True)
        if self.head_selection == "all":  # no IAF ranking: every head but the best
            sel = torch.ones_like(iaf, dtype=torch.bool)
        elif self.head_selection == "below-mean":
            sel = iaf < iaf.mean(-1, keepdim=True)
        elif self.head_selection == "bottom-k":
            sel = torch.zeros_like(iaf, dtype=torch.bool).scatter(-1, iaf.argsort(-1)[:, : self.bottom_k], True)
        else:
            sel = iaf < self.rho * iaf.gather(-1, best)
        return sel & ~torch.zeros_like(sel).scatter(-1, best, True)

    @contextmanager
    def attach(self, lm, inputs: dict, decisions: bool = False) -> Iterator[RunRecord]:
        """Attach for one decoding of ``inputs``; the record's ``log`` lists the firings (with
        ``decisions``, ``record.decisions`` also lists every decision, fired or not)."""
        adapter = ModelAdapter(lm.model)
        self.validate(adapter.n_layers, adapter.n_heads)
        state = DLeafState(self, adapter.n_layers, inputs["input_ids"].shape[0])
        record = RunRecord(self.name)
        try:
            with hooks.attach_editor(lm.model, state, inputs):
                yield record
        finally:
            record.log = state.materialize_log()
            if decisions:
                record.decisions = state.decisions()

    def replay(self, lm, inputs: dict, continuation_ids: list[int], decisions: bool = False) -> RunRecord:
        """D-LEAF over a teacher-forced decoding: the prompt (step 0), then each token of
        ``continuation_ids`` fed one at a time with the KV cache, exactly as ``generate`` steps, with
        this config attached (with ``gamma > 0`` its corrections apply to the later steps as in
        decoding).  One firing rule: the editor that decodes is the one that decides here."""
        cfg = type(self).from_dict({**self.to_dict(), "record": True})
        model = lm.model
        with torch.no_grad(), hooks.prompt_rows(model, cfg.prompt_rows), cfg.attach(lm, inputs, decisions) as record:
            out = model(**inputs, use_cache=True)
            past, am = out.past_key_values, inputs["attention_mask"]
            for t in continuation_ids:
                am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
                ids = torch.tensor([[int(t)]], device=inputs["input_ids"].device)
                out = model(input_ids=ids, attention_mask=am, past_key_values=past, use_cache=True)
                past = out.past_key_values
        return record


class DLeafState:
    """Per-call state of D-LEAF (threshold statistics, firing records); the pattern editor."""

    def __init__(self, cfg: DLeaf, n_layers: int, batch: int) -> None:
        self.cfg = cfg
        self.candidates = set(cfg.candidate_layers(n_layers))
        self.B, self.L = batch, n_layers
        self.k = cfg.effective_k
        # running statistics [B, L], created on the device of the first pattern they meet
        self.n = self.mean = self.m2 = self.best = None
        self.records: list[tuple] = []  # per (step, layer) call: device tensors, read once at the end
        self.counts: torch.Tensor | None = None

    def _state_on(self, device: torch.device) -> None:
        if self.n is None or self.n.device != device:
            z = torch.zeros(self.B, self.L, device=device)
            self.n, self.mean, self.m2 = z.clone(), z.clone(), z.clone()  # Welford count, mean, sum of squares
            self.best = torch.full((self.B, self.L), float("inf"), device=device)  # BAS: lowest LIAE so far

    def _seed_from_prompt_rows(self, pattern: torch.Tensor, ctx: hooks.EditContext, layer: int) -> None:
        """Seed a layer's statistics with the LIAE of the prompt query rows after the image (the
        last row excluded: it is step 0's own observation).  Masked tensor operations, no host sync."""
        B, H, T, K = pattern.shape
        pos, valid_n = ctx.image_positions(pattern.device)
        img = ctx.image_keys(T, pattern.device)
        a = pattern.float().gather(-1, pos[:, None, None, :].expand(B, H, T, pos.shape[-1]))  # [B, H, T, n]
        valid = None
        if ctx.ragged:
            a = a * valid_n[:, None, None, :]
            valid = valid_n[:, None, :]
        v = D.liae(a.transpose(1, 2), self.cfg.liae_variant, valid)  # [B, T]
        idx = torch.arange(T, device=pattern.device)
        last_img = (img * idx).amax(-1, keepdim=True)  # [B, 1]
        rows = (idx[None] > last_img) & (idx[None] < T - 1)  # [B, T]
        cnt = rows.sum(-1).float()
        mean = (v * rows).sum(-1) / cnt.clamp_min(1)
        m2 = (((v - mean[:, None]) ** 2) * rows).sum(-1)
        vmin = torch.where(rows, v, torch.full_like(v, float("inf"))).amin(-1)
        has = cnt > 0
        self.n[:, layer] = torch.where(has, cnt, self.n[:, layer])
        self.mean[:, layer] = torch.where(has, mean, self.mean[:, layer])
        self.m2[:, layer] = torch.where(has, m2, self.m2[:, layer])
        self.best[:, layer] = torch.where(has, vmin, self.best[:, layer])

    def __call__(self, pattern: torch.Tensor, ctx: hooks.EditContext) -> torch.Tensor:
        layer, step = ctx.layer, ctx.step
        if layer not in self.candidates:
            return pattern
        cfg = self.cfg
        row = last_row(pattern)  # [B, H, K] the current query
        self._state_on(row.device)
        pos, valid_n = ctx.image_positions(row.device)
        if self.counts is None:
            self.counts = valid_n.sum(-1)
        valid = valid_n if ctx.ragged else None  # None: every sequence has n image tokens
        if step == 0 and cfg.threshold != "static" and cfg.running_seed == "prefill-rows" and pattern.shape[2] > 1:
            self._seed_from_prompt_rows(pattern, ctx, layer)
        empty = self._empty(row.device)
        key_img = ctx.image_keys(row.shape[-1], row.device) if cfg.fusion == "image" else empty
        # the layer's whole decision and fusion: one operator (interventions.fused)
        new_row, fire, liae, thr, best, sel = torch.ops.dleaf.layer_step(
            row, pos, valid if valid is not None else empty, key_img, self.n, self.mean, self.m2, self.best, layer,
            cfg.threshold, self.k, cfg.delta, cfg.gamma, cfg.head_selection, cfg.bottom_k, cfg.rho, cfg.liae_variant,
            cfg.iaf_variant, step < cfg.warmup)
        if cfg.record:
            self.records.append((step, layer, fire, liae, thr, best, sel))
        if cfg.gamma == 0:  # the trigger alone (e.g. the trigger study): decide and record, change nothing
            return pattern
        return with_last_row(pattern, new_row)

    def _empty(self, device) -> torch.Tensor:
        e = getattr(self, "_empty_t", None)
        if e is None or e.device != device:
            e = self._empty_t = torch.empty(0, dtype=torch.bool, device=device)
        return e

    def _host(self):
        """The records as host arrays (one transfer per tensor kind, after decoding)."""
        stack = lambda i: torch.stack([r[i] for r in self.records]).cpu().numpy()  # noqa: E731
        return stack(2), stack(3), stack(4), stack(5), stack(6)  # fire [N, B], liae, thr, best [N, B], sel [N, B, H]

    def decisions(self) -> list[dict]:
        """Every decision, fired or not: one dict per (sequence, step, candidate layer) with the
        layer's LIAE, its threshold and whether it fired."""
        if not self.records:
            return []
        fire, liae, thr, _, _ = self._host()
        return [{"batch": b, "step": step, "layer": layer, "liae": float(liae[i, b]), "threshold": float(thr[i, b]),
                 "fired": bool(fire[i, b])}
                for i, (step, layer, *_rest) in enumerate(self.records) for b in range(fire.shape[1])]

    def materialize_log(self) -> list[dict]:
        """The firing log, one dict per (sequence, step, layer) that fired; reads the device
        tensors once (a single host transfer per tensor kind), after decoding."""
        if not self.records:
            return []
        import numpy as np

        fire, liae, thr, best, sel = self._host()
        counts = self.counts.cpu().numpy()  # image tokens of each sequence
        out = []
        for i, b in zip(*np.nonzero(fire)):
            step, layer = self.records[i][0], self.records[i][1]
            out.append({"batch": int(b), "step": step, "layer": layer, "liae": float(liae[i, b]),
                        "threshold": float(thr[i, b]), "best_head": int(best[i, b]),
                        "heads": [int(h) for h in np.nonzero(sel[i, b])[0]], "n_image": int(counts[b])})
        out.sort(key=lambda r: (r["step"], r["layer"], r["batch"]))
        return out
