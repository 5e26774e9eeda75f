"""D-LEAF and the baselines it is compared to, as serialisable configs in one registry.

Every method is a dataclass config (``validate``, ``to_dict``, ``from_dict``) whose
``generate(lm, inputs, ...)`` decodes with the intervention attached, and whose
``attach(lm, inputs)`` context manager edits attention at the one hook point
(:mod:`dleaf_analysis.hooks`) and restores the model on exit.  Definitions:
``docs/method.md``.

- ``greedy``: no intervention.
- ``dleaf``: at each decoding step, layers whose LIAE exceeds a dynamic threshold (``running``
  mean + k std, or the ``bas`` best-attention-score rule; ``static`` = a fixed layer set, a
  control) have their low-IAF heads fused toward the best head:
  ``a_h <- (1 - gamma) a_h + gamma a_best`` on the current query row, post-softmax.
- ``uniform``: the same fusion in every candidate layer at every step (no localisation).
- ``pai``: PAI-style uniform amplification of image attention in a fixed layer range
  (post-softmax variant: image probabilities times ``1 + alpha``, row renormalised).
- ``vcd``: visual contrastive decoding against a noised image (Leng et al. 2024).
- ``ablate``: zero or mean ablation of chosen heads (their contribution to ``o_proj``).
"""

from __future__ import annotations

import hashlib

import json
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar, Iterator

import torch

from dleaf_analysis import diagnostics as D
from dleaf_analysis import hooks, lens
from dleaf_analysis.models.adapters import ModelAdapter
from dleaf_analysis.errors import DleafError


class ConfigError(DleafError, ValueError):
    """An invalid intervention config; the message names the valid choices."""


# -- base ------------------------------------------------------------------------------------
@dataclass
class Method:
    """Base of all method configs."""

    name: ClassVar[str] = "greedy"

    def validate(self, n_layers: int | None = None, n_heads: int | None = None) -> "Method":
        return self

    @property
    def prompt_rows(self) -> str:
        """Which prefill query rows need explicit attention probabilities: ``"last"`` (the
        current query only; the others keep the fast sdpa kernel) or ``"all"``."""
        return "last"

    def to_dict(self) -> dict:
        return {"method": self.name, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "Method":
        d = dict(d)
        d.pop("method", None)
        valid = {f.name for f in fields(cls)}
        unknown = set(d) - valid
        if unknown:
            raise ConfigError(f"unknown key(s) {sorted(unknown)} for method {cls.name!r}; valid keys: {sorted(valid)}")
        return cls(**d)

    @contextmanager
    def attach(self, lm, inputs: dict) -> Iterator["Method"]:
        """Edit the model for one ``generate`` call on ``inputs``; restore it afterwards."""
        yield self

    def generate(self, lm, inputs: dict, **generate_kwargs) -> torch.Tensor:
        """Decode ``inputs`` with this method attached; returns ``generate``'s ids ``[B, T]``."""
        self.validate(ModelAdapter(lm.model).n_layers, ModelAdapter(lm.model).n_heads)
        with torch.no_grad(), hooks.prompt_rows(lm.model, self.prompt_rows), self.attach(lm, inputs):
            return lm.model.generate(**inputs, **generate_kwargs)


@dataclass
class Greedy(Method):
    name: ClassVar[str] = "greedy"


def _check_range(name: str, v: float, lo: float, hi: float) -> None:
    if not (lo <= v <= hi):
        raise ConfigError(f"{name} must be in [{lo}, {hi}], got {v}")


def _check_layers(name: str, layers, n_layers: int | None) -> None:
    if layers is None or n_layers is None:
        return
    bad = [l for l in layers if not (0 <= int(l) < n_layers)]
    if bad:
        raise ConfigError(f"{name}: layer(s) {bad} out of range; the model has layers 0..{n_layers - 1}")


class _StepCounter:
    """Counts decoding steps: a new step starts each time layer 0's hook point runs."""

    def __init__(self) -> None:
        self.step = -1

    def tick(self, layer: int) -> int:
        if layer == 0:
            self.step += 1
        return self.step


def image_key_mask(inputs: dict, adapter: ModelAdapter, K: int) -> torch.Tensor:
    """``[B, K]`` boolean: image-token key positions (prompt only; generated keys are text)."""
    m = adapter.image_mask(inputs["input_ids"])
    if K > m.shape[1]:
        m = torch.cat([m, torch.zeros(m.shape[0], K - m.shape[1], dtype=torch.bool, device=m.device)], 1)
    return m[:, :K]


def image_positions(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``img [B, K]`` bool -> key positions of each sequence's image tokens, in order, padded to the
    largest count ``n``: ``pos [B, n]`` (padding points at key 0) and ``valid [B, n]``.  Sequences
    may hold different numbers of image tokens (LLaVA-NeXT anyres, mixed image sizes)."""
    counts = img.sum(-1)
    n = int(counts.max()) if img.shape[0] else 0  # one host read per call, never per step
    order = torch.argsort((~img).to(torch.int8), dim=-1, stable=True)[:, :n]  # image positions first, in order
    valid = torch.arange(n, device=img.device)[None] < counts[:, None]
    return torch.where(valid, order, torch.zeros_like(order)), valid


def image_columns(row: torch.Tensor, img: torch.Tensor, with_valid: bool = False):
    """``row [B, H, K]``, ``img [B, K]`` -> image columns ``[B, H, n]`` (zeros where a sequence has
    fewer image tokens than the largest count); with ``with_valid`` also ``valid [B, n]``."""
    pos, valid = image_positions(img)
    cols = row.gather(-1, pos.unsqueeze(1).expand(-1, row.shape[1], -1)) * valid.unsqueeze(1).to(row.dtype)
    return (cols, valid) if with_valid else cols


FUSIONS = ("row", "image")


def fuse_heads(row: torch.Tensor, fuse: torch.Tensor, best: torch.Tensor, gamma: float,
               image_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mixed attention (paper Eq. 4) on one query row per head.

    ``row [B, H, K]``; ``fuse [B, H]`` bool (heads to correct); ``best [B]`` (index of the best
    head).  Returns ``a_h <- (1 - gamma) a_h + gamma a_best`` for the selected heads
    (``row`` fusion).  With ``image_mask [B, K]`` (``image`` fusion) only the image
    columns are mixed, the text columns are kept, and the row is renormalised to sum to 1.
    """
    a_best = row.gather(1, best.view(-1, 1, 1).expand(-1, 1, row.shape[-1]))  # [B, 1, K]
    mixed = (1 - gamma) * row + gamma * a_best
    if image_mask is not None:
        mixed = torch.where(image_mask[:, None, :].to(row.device), mixed, row)
        mixed = mixed / mixed.sum(-1, keepdim=True).clamp_min(1e-12)
    return torch.where(fuse.unsqueeze(-1), mixed, row)


# -- D-LEAF ------------------------------------------------------------------------------------
THRESHOLDS = ("running", "bas", "static")
RUNNING_SEEDS = ("prefill-last", "prefill-rows")
HEAD_SELECTIONS = ("below-mean", "bottom-k", "below-rho", "all")


@dataclass
class DLeaf(Method):
    """D-LEAF: dynamic layer selection by LIAE, head correction by IAF (docs/method.md)."""

    name: ClassVar[str] = "dleaf"
    # defaults = the settings chosen by the tuning study on the embedded model's dev split
    # (data/tuned_methods.json; a test keeps them equal)
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
    record: bool = True

    def validate(self, n_layers: int | None = None, n_heads: int | None = None) -> "DLeaf":
        _check_range("gamma", self.gamma, 0.0, 1.0)
        if self.running_seed not in RUNNING_SEEDS:
            raise ConfigError(f"unknown running_seed {self.running_seed!r}; choose one of {RUNNING_SEEDS}")
        if self.threshold not in THRESHOLDS:
            raise ConfigError(f"unknown threshold {self.threshold!r}; choose one of {THRESHOLDS}")
        if self.head_selection not in HEAD_SELECTIONS:
            raise ConfigError(f"unknown head_selection {self.head_selection!r}; choose one of {HEAD_SELECTIONS}")
        if self.liae_variant not in D.LIAE_VARIANTS:
            raise ConfigError(f"unknown liae_variant {self.liae_variant!r}; choose one of {D.LIAE_VARIANTS}")
        if self.iaf_variant not in D.IAF_VARIANTS:
            raise ConfigError(f"unknown iaf_variant {self.iaf_variant!r}; choose one of {D.IAF_VARIANTS}")
        if self.fusion not in FUSIONS:
            raise ConfigError(f"unknown fusion {self.fusion!r}; choose one of {FUSIONS}")
        if self.k < 0 or self.delta < 0:
            raise ConfigError("k and delta must be >= 0")
        _check_range("rho", self.rho, 0.0, 1.0)
        if n_heads is not None and not (1 <= self.bottom_k < n_heads):
            raise ConfigError(f"bottom_k must be in [1, {n_heads - 1}] for {n_heads} heads, got {self.bottom_k}")
        _check_layers("layers", self.layers, n_layers)
        return self

    @property
    def prompt_rows(self) -> str:
        return "all" if self.threshold != "static" and self.running_seed == "prefill-rows" else "last"

    def candidate_layers(self, n_layers: int) -> list[int]:
        return list(self.layers) if self.layers is not None else list(range(min(2, n_layers - 1), n_layers))

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
    def attach(self, lm, inputs: dict) -> Iterator["DLeaf"]:
        adapter = ModelAdapter(lm.model)
        self.validate(adapter.n_layers, adapter.n_heads)
        state = _DLeafState(self, adapter, inputs)
        self.log: list[dict] = []  # what it did: one dict per (step, layer) decision that fired, read at the end
        try:
            with hooks.attach_editor(lm.model, state):
                yield self
        finally:
            self.log = state.materialize_log()


class _DLeafState:
    """Per-call state of D-LEAF: step counter, threshold statistics, log."""

    def __init__(self, cfg: DLeaf, adapter: ModelAdapter, inputs: dict) -> None:
        self.cfg = cfg
        self.adapter = adapter
        self.inputs = inputs
        self.counter = _StepCounter()
        self.candidates = set(cfg.candidate_layers(adapter.n_layers))
        self.B = inputs["input_ids"].shape[0]
        self.L = adapter.n_layers
        # running statistics [B, L], created on the device of the first pattern they meet
        self.n = self.mean = self.m2 = self.best = None
        self.records: list[tuple] = []  # per (step, layer) call: device tensors, read once at the end
        img = adapter.image_mask(inputs["input_ids"])  # [B, P]
        self.img_mask = img
        self.img_pos, self.img_valid = image_positions(img)  # [B, n] each, once per call (not per step)
        self.ragged = not bool(self.img_valid.all())  # different image-token counts per sequence

    def _state_on(self, device: torch.device) -> None:
        if self.n is None or self.n.device != device:
            z = torch.zeros(self.B, self.L, device=device)
            self.n, self.mean, self.m2 = z.clone(), z.clone(), z.clone()  # Welford count, mean, sum of squares
            self.best = torch.full((self.B, self.L), float("inf"), device=device)  # BAS: lowest LIAE so far

    def _seed_from_prompt_rows(self, pattern: torch.Tensor, pos: torch.Tensor, img: torch.Tensor, layer: int) -> None:
        """Seed a layer's statistics with the LIAE of the prompt query rows after the image (the
        last row excluded: it is step 0's own observation).  Masked tensor operations, no host sync."""
        B, H, T, K = pattern.shape
        a = pattern.float().gather(-1, pos[:, None, None, :].expand(B, H, T, pos.shape[-1]))  # [B, H, T, n]
        valid = None
        if self.ragged:
            valid = self.img_valid.to(pattern.device)
            a = a * valid[:, None, None, :]
            valid = valid[:, None, :]
        v = D.liae(a.transpose(1, 2), self.cfg.liae_variant, valid)  # [B, T]
        idx = torch.arange(T, device=pattern.device)
        last_img = (img[:, :T] * idx).amax(-1, keepdim=True)  # [B, 1]
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

    def __call__(self, pattern: torch.Tensor, layer: int) -> torch.Tensor:
        step = self.counter.tick(layer)
        if layer not in self.candidates:
            return pattern
        cfg = self.cfg
        row = pattern[:, :, -1, :]  # [B, H, K] the current query
        self._state_on(row.device)
        pos = self.img_pos.to(row.device)
        valid = self.img_valid.to(row.device) if self.ragged else None  # None: every sequence has n image tokens
        if step == 0 and cfg.threshold != "static" and cfg.running_seed == "prefill-rows" and pattern.shape[2] > 1:
            self._seed_from_prompt_rows(pattern, pos, self.img_mask.to(row.device), layer)
        a_img = row.float().gather(-1, pos.unsqueeze(1).expand(-1, row.shape[1], -1))  # [B, H, n]
        if valid is not None:
            a_img = a_img * valid[:, None, :]
        liae = D.liae(a_img, cfg.liae_variant, valid)  # [B]
        if cfg.threshold == "static":
            fire = torch.ones_like(liae, dtype=torch.bool)
            thr = torch.full_like(liae, float("nan"))
        elif cfg.threshold == "running":
            cnt = self.n[:, layer]  # [B] observations so far
            mu = self.mean[:, layer]
            sd = (self.m2[:, layer] / cnt.clamp_min(1)).sqrt()
            thr = mu + cfg.k * sd
            fire = (cnt > 0) & (liae > thr)
            # Welford update with this step's LIAE
            cnt1 = cnt + 1
            delta = liae - mu
            self.mean[:, layer] = mu + delta / cnt1
            self.m2[:, layer] = self.m2[:, layer] + delta * (liae - self.mean[:, layer])
            self.n[:, layer] = cnt1
        else:  # bas
            b = self.best[:, layer]
            thr = b * (1 + cfg.delta)
            fire = torch.isfinite(b) & (liae > thr)
            self.best[:, layer] = torch.minimum(b, liae)
        if cfg.gamma == 0:
            return pattern
        # decisions stay on the device: rows that do not fire are written back unchanged
        iaf = D.iaf(a_img, cfg.iaf_variant, valid)  # [B, H]
        sel = self.cfg.select_heads(iaf) & fire.unsqueeze(-1)
        best = iaf.argmax(-1)
        key_img = image_key_mask(self.inputs, self.adapter, row.shape[-1]) if cfg.fusion == "image" else None
        new_row = fuse_heads(row, sel, best, cfg.gamma, key_img).to(pattern.dtype)
        if torch.is_grad_enabled():
            pattern = pattern.clone()  # keep autograd's saved tensors intact
        pattern[:, :, -1, :] = new_row
        if cfg.record:
            self.records.append((step, layer, fire.detach(), liae.detach(), thr.detach(), best.detach(), sel.detach()))
        return pattern

    def materialize_log(self) -> list[dict]:
        """The firing log, one dict per (sequence, step, layer) that fired; reads the device
        tensors once (a single host transfer per tensor kind), after decoding."""
        if not self.records:
            return []
        fire = torch.stack([r[2] for r in self.records]).cpu()  # [N, B]
        liae = torch.stack([r[3] for r in self.records]).cpu()
        thr = torch.stack([r[4] for r in self.records]).cpu()
        best = torch.stack([r[5] for r in self.records]).cpu()
        sel = torch.stack([r[6] for r in self.records]).cpu()  # [N, B, H]
        counts = self.img_valid.sum(-1).cpu()  # image tokens of each sequence
        out = []
        for i, (step, layer, *_rest) in enumerate(self.records):
            for b in torch.nonzero(fire[i]).flatten().tolist():
                out.append({"batch": b, "step": step, "layer": layer, "liae": float(liae[i, b]),
                            "threshold": float(thr[i, b]), "best_head": int(best[i, b]),
                            "heads": torch.nonzero(sel[i, b]).flatten().tolist(), "n_image": int(counts[b])})
        out.sort(key=lambda r: (r["step"], r["layer"], r["batch"]))
        return out


@dataclass
class UniformFusion(DLeaf):
    """Baseline: D-LEAF's fusion in every candidate layer (``layers``; default: all but the first
    two, D-LEAF's own candidates) at every step, with no LIAE threshold."""

    name: ClassVar[str] = "uniform"
    threshold: str = "static"
    # tuned (data/tuned_methods.json)
    gamma: float = 0.25
    head_selection: str = "below-mean"
    fusion: str = "image"

    def validate(self, n_layers=None, n_heads=None) -> "UniformFusion":
        if self.threshold != "static":
            raise ConfigError("uniform fusion has no threshold; use method 'dleaf' for dynamic thresholds")
        return super().validate(n_layers, n_heads)


# -- PAI-style amplification --------------------------------------------------------------------
@dataclass
class PAI(Method):
    """Uniform amplification of image attention in a fixed layer range, every head, every step.

    Post-softmax variant of PAI (Liu et al. 2024): image probabilities of the current query
    are multiplied by ``1 + alpha`` and the row is renormalised.
    """

    name: ClassVar[str] = "pai"
    alpha: float = 2.0  # tuned; the tuned layer range ([4, 5] of 6) is model-specific
    layers: list[int] | None = None  # None: all but the first two

    def validate(self, n_layers=None, n_heads=None) -> "PAI":
        _check_range("alpha", self.alpha, 0.0, 100.0)
        _check_layers("layers", self.layers, n_layers)
        return self

    @contextmanager
    def attach(self, lm, inputs: dict) -> Iterator["PAI"]:
        adapter = ModelAdapter(lm.model)
        self.validate(adapter.n_layers)
        layers = set(self.layers if self.layers is not None else range(min(2, adapter.n_layers - 1), adapter.n_layers))

        def edit(pattern: torch.Tensor, layer: int) -> torch.Tensor:
            if layer not in layers or self.alpha == 0:
                return pattern
            row = pattern[:, :, -1, :]
            img = image_key_mask(inputs, adapter, row.shape[-1]).to(row.device).unsqueeze(1)
            new = torch.where(img, row * (1 + self.alpha), row)
            pattern = pattern.clone()
            pattern[:, :, -1, :] = new / new.sum(-1, keepdim=True)
            return pattern

        with hooks.attach_editor(lm.model, edit):
            yield self


# -- VCD ---------------------------------------------------------------------------------------
@dataclass
class VCD(Method):
    """Visual contrastive decoding (Leng et al. 2024), greedy:
    ``logits = (1 + alpha) l(x, v) - alpha l(x, v')`` with ``v'`` the image under Gaussian
    noise (``noise_steps`` of a linear-beta diffusion schedule), restricted to tokens whose
    probability is at least ``beta`` times the maximum (adaptive plausibility)."""

    name: ClassVar[str] = "vcd"
    alpha: float = 0.5  # tuned (data/tuned_methods.json)
    beta: float = 0.1
    noise_steps: int = 500
    seed: int = 0

    def validate(self, n_layers=None, n_heads=None) -> "VCD":
        _check_range("alpha", self.alpha, 0.0, 100.0)
        _check_range("beta", self.beta, 0.0, 1.0)
        if not (0 <= self.noise_steps <= 999):
            raise ConfigError(f"noise_steps must be in [0, 999], got {self.noise_steps}")
        return self

    def noised(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Diffusion-style noised image ``[B, ...]``.  Each row's noise is drawn from a seed derived
        from ``seed`` and the row's own pixels, so an image gets the same noise whatever its batch
        size and position (batch invariance)."""
        from dleaf_analysis.seeding import derive_seed

        betas = torch.linspace(-6, 6, 1000).sigmoid() * (0.5e-2 - 1e-5) + 1e-5
        abar = torch.cumprod(1 - betas, 0)[self.noise_steps]
        host = pixel_values.detach().float().cpu()  # once per call, not per decoding step
        noise = torch.stack([
            torch.randn(row.shape, generator=torch.Generator().manual_seed(
                derive_seed(self.seed, hashlib.sha256(row.numpy().tobytes()).hexdigest())))
            for row in host
        ]).to(pixel_values)
        return abar.sqrt() * pixel_values + (1 - abar).sqrt() * noise

    def generate(self, lm, inputs: dict, max_new_tokens: int = 32, pad_token_id: int | None = None, **_) -> torch.Tensor:
        self.validate()
        model = lm.model
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        pad = pad_token_id if pad_token_id is not None else lm.pad_token_id
        ids = inputs["input_ids"]
        B = ids.shape[0]
        clean = dict(inputs)
        noisy = {**inputs, "pixel_values": self.noised(inputs["pixel_values"])}
        past = [None, None]
        mask = inputs["attention_mask"]
        out_ids = ids
        done = torch.zeros(B, dtype=torch.bool, device=ids.device)
        eos_ids = torch.tensor(sorted(e for e in eos if e is not None), device=ids.device)
        cur = [clean, noisy]
        with torch.no_grad(), hooks.prompt_rows(model, self.prompt_rows):
            for _ in range(max_new_tokens):
                logits = []
                for j in range(2):
                    o = model(**cur[j], past_key_values=past[j], use_cache=True)
                    past[j] = o.past_key_values
                    logits.append(o.logits[:, -1].float())
                lc, ln = logits
                cutoff = lc.softmax(-1).max(-1, keepdim=True).values * self.beta
                cd = (1 + self.alpha) * lc - self.alpha * ln
                cd = cd.masked_fill(lc.softmax(-1) < cutoff, float("-inf"))
                nxt = cd.argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                out_ids = torch.cat([out_ids, nxt[:, None]], 1)
                done |= torch.isin(nxt, eos_ids)
                mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=mask.device)], 1)
                step = {"input_ids": nxt[:, None], "attention_mask": mask}
                cur = [step, step]
                if bool(done.all()):  # one read per token to stop early, as generate's own stopping criteria
                    break
        return out_ids


# -- head ablation -----------------------------------------------------------------------------
@dataclass
class HeadAblation(Method):
    """Zero or mean ablation of heads ``[(layer, head), ...]``: their slice of ``o_proj``'s input
    is set to zero or to its mean over the prompt positions (``mean`` over the current call)."""

    name: ClassVar[str] = "ablate"
    heads: list[tuple[int, int]] = field(default_factory=list)
    mode: str = "zero"

    def validate(self, n_layers=None, n_heads=None) -> "HeadAblation":
        if self.mode not in ("zero", "mean"):
            raise ConfigError(f"unknown ablation mode {self.mode!r}; choose one of ('zero', 'mean')")
        for l, h in self.heads:
            if n_layers is not None and not (0 <= l < n_layers):
                raise ConfigError(f"layer {l} out of range; the model has layers 0..{n_layers - 1}")
            if n_heads is not None and not (0 <= h < n_heads):
                raise ConfigError(f"head {h} out of range; the model has heads 0..{n_heads - 1}")
        return self

    @contextmanager
    def attach(self, lm, inputs: dict) -> Iterator["HeadAblation"]:
        adapter = ModelAdapter(lm.model)
        self.validate(adapter.n_layers, adapter.n_heads)
        by_layer: dict[int, list[int]] = {}
        for l, h in self.heads:
            by_layer.setdefault(int(l), []).append(int(h))
        means: dict[int, torch.Tensor] = {}

        def make(l: int, hs: list[int]):
            def edit(z):  # [B, T, H, d]
                z = z.clone()
                for h in hs:
                    if self.mode == "zero":
                        z[..., h, :] = 0
                    else:
                        if l not in means or z.shape[1] > 1:  # the prefill defines the mean
                            means[l] = z.mean(1, keepdim=True)
                        z[..., h, :] = means[l][..., h, :]
                return z
            return edit

        with ExitStack() as st:
            for l, hs in by_layer.items():
                st.enter_context(lens.hook(lm.model, f"blocks.{l}.attn.hook_z", make(l, hs)))
            yield self


# -- grounding probes --------------------------------------------------------------------------
PROBE_KINDS = ("uniform", "shuffle", "single")


@dataclass
class ImageAttentionProbe(Method):
    """Destroys *where* attention falls inside the image while keeping *how much* falls there.

    In every layer and head, for every text query row (prompt text and generated tokens), the
    row's image columns are replaced by: ``uniform`` (the same mass spread evenly), ``shuffle``
    (the same values permuted across image positions) or ``single`` (all of the mass on one
    image position).  Permutations and positions are drawn per call from ``seed``.  On a
    grounded model recall must collapse; it is the model card's acceptance probe.
    """

    name: ClassVar[str] = "probe"
    kind: str = "uniform"
    seed: int = 0

    def validate(self, n_layers=None, n_heads=None) -> "ImageAttentionProbe":
        if self.kind not in PROBE_KINDS:
            raise ConfigError(f"unknown probe kind {self.kind!r}; choose one of {PROBE_KINDS}")
        return self

    @property
    def prompt_rows(self) -> str:
        return "all"  # edits every text query row of the prompt

    @contextmanager
    def attach(self, lm, inputs: dict) -> Iterator["ImageAttentionProbe"]:
        adapter = ModelAdapter(lm.model)
        self.validate()
        gen = torch.Generator().manual_seed(self.seed)

        def edit(pattern: torch.Tensor, layer: int) -> torch.Tensor:
            B, H, Q, K = pattern.shape
            img = image_key_mask(inputs, adapter, K).to(pattern.device)  # [B, K]
            q_text = ~img[:, K - Q:]  # [B, Q]: query rows that are not image tokens
            sel = img[:, None, None, :] & q_text[:, None, :, None]  # [B, 1, Q, K]
            mass = (pattern * img[:, None, None, :]).sum(-1, keepdim=True)  # [B, H, Q, 1]
            n = img.sum(-1).view(B, 1, 1, 1).clamp(min=1)
            if self.kind == "uniform":
                new = (mass / n).expand_as(pattern)
            else:
                new = torch.zeros_like(pattern)
                for b in range(B):
                    pos = img[b].nonzero().flatten()
                    if self.kind == "shuffle":
                        perm = pos[torch.randperm(len(pos), generator=gen).to(pos.device)]
                        new[b][..., pos] = pattern[b][..., perm]
                    else:
                        j = pos[torch.randint(len(pos), (1,), generator=gen).to(pos.device)]
                        new[b][..., j] = mass[b]
            return torch.where(sel, new, pattern)

        with hooks.attach_editor(lm.model, edit):
            yield self


# -- registry ------------------------------------------------------------------------------------
METHODS: dict[str, type[Method]] = {m.name: m for m in (Greedy, DLeaf, UniformFusion, PAI, VCD, HeadAblation,
                                                        ImageAttentionProbe)}


def get_method(name: str, config: dict | None = None) -> Method:
    """A method config by name, with overrides from ``config``."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name].from_dict(config or {}).validate()


def load_config(path: str | Path) -> dict:
    """Read a JSON method config file (``{"method": "dleaf", "gamma": 0.5, ...}``)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} does not parse as JSON: {e}") from None


def method_from_dict(d: dict) -> Method:
    if "method" not in d:
        raise ConfigError(f"config has no 'method' key; choose one of {sorted(METHODS)}")
    d = dict(d)
    return get_method(d.pop("method"), d)


__all__ = ["FUSIONS", "METHODS", "PROBE_KINDS", "ConfigError", "DLeaf", "Greedy", "HeadAblation", "ImageAttentionProbe", "Method", "PAI", "UniformFusion", "VCD",
           "fuse_heads", "get_method", "load_config", "method_from_dict"]
