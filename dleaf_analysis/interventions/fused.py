"""The per-layer work of the decoding editors as single operators (one fused region per layer).

D-LEAF's work in a candidate layer at one decoding step -- gather the image columns of the
current query row, LIAE, IAF, the threshold update (running Welford statistics, or the BAS
minimum), head selection and the fusion -- is one custom operator, ``dleaf::layer_step``; PAI's
amplification is ``dleaf::pai_step``.  To the dispatcher (and to ``torch.compile`` graphs around
them) each is one call, so a decoding step adds two operators per candidate layer (the step and
writing the row back) instead of about fifty.  The operator's implementation is the eager
function below, or the same function compiled by ``torch.compile(fullgraph=True)`` with the
inductor backend (:func:`set_compile`; ``"auto"``: inductor where a CUDA device runs it, eager
on the CPU, where compiling costs more than it saves on short decodes).  Both give the same
tokens and firings as the step-by-step editor of earlier versions (tested).

Shapes: ``row [B, H, K]`` (one query row per head, ``K`` keys), ``pos, valid [B, n]`` (image key
positions, padded; ``valid`` empty when every sequence has ``n`` image tokens), ``key_img [B, K]``
(image fusion only, else empty), state ``n, mean, m2, best [B, L]`` (updated in place in column
``layer``).  Outputs: the new row, ``fire [B]``, ``liae [B]``, ``threshold [B]``, ``best_head [B]``,
``selected [B, H]``.
"""

from __future__ import annotations

import torch

from dleaf_analysis import diagnostics as D
from dleaf_analysis.interventions.ops import fuse_heads

COMPILE_MODES = ("auto", "eager", "inductor")
_MODE = {"mode": "auto"}
_COMPILED: dict = {}


def set_compile(mode: str) -> None:
    """How the fused operators run: ``eager``, ``inductor`` (``torch.compile(fullgraph=True)``) or
    ``auto`` (inductor on CUDA tensors, eager otherwise)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {COMPILE_MODES}")
    _MODE["mode"] = mode


def _select_heads(iaf: torch.Tensor, head_selection: str, bottom_k: int, rho: float) -> torch.Tensor:
    best = iaf.argmax(-1, keepdim=True)
    if head_selection == "all":
        sel = torch.ones_like(iaf, dtype=torch.bool)
    elif head_selection == "below-mean":
        sel = iaf < iaf.mean(-1, keepdim=True)
    elif head_selection == "bottom-k":
        sel = torch.zeros_like(iaf, dtype=torch.bool).scatter(-1, iaf.argsort(-1)[:, :bottom_k], True)
    else:
        sel = iaf < rho * iaf.gather(-1, best)
    return sel & ~torch.zeros_like(sel).scatter(-1, best, True)


def layer_step_eager(row, pos, valid, key_img, n, mean, m2, best_liae, layer: int, threshold: str, k: float,
                     delta: float, gamma: float, head_selection: str, bottom_k: int, rho: float, liae_variant: str,
                     iaf_variant: str, warm: bool):
    """D-LEAF's decision and fusion in one layer (see the module doc); mutates the state column."""
    v = valid if valid.numel() else None
    a_img = row.float().gather(-1, pos.unsqueeze(1).expand(-1, row.shape[1], -1))  # [B, H, n]
    if v is not None:
        a_img = a_img * v[:, None, :]
    liae = D.liae(a_img, liae_variant, v)  # [B]
    if threshold == "static":
        fire = torch.ones_like(liae, dtype=torch.bool)
        thr = torch.full_like(liae, float("nan"))
    elif threshold == "running":
        cnt = n[:, layer]
        mu = mean[:, layer]
        sd = (m2[:, layer] / cnt.clamp_min(1)).sqrt()
        thr = mu + k * sd
        fire = (cnt > 0) & (liae > thr)
        cnt1 = cnt + 1
        dlt = liae - mu
        new_mean = mu + dlt / cnt1
        m2[:, layer] = m2[:, layer] + dlt * (liae - new_mean)
        mean[:, layer] = new_mean
        n[:, layer] = cnt1
    else:  # bas
        b = best_liae[:, layer]
        thr = b * (1 + delta)
        fire = torch.isfinite(b) & (liae > thr)
        best_liae[:, layer] = torch.minimum(b, liae)
    if warm:
        fire = torch.zeros_like(fire)
    iaf = D.iaf(a_img, iaf_variant, v)  # [B, H]
    sel = _select_heads(iaf, head_selection, bottom_k, rho) & fire.unsqueeze(-1)
    bh = iaf.argmax(-1)
    new_row = fuse_heads(row, sel, bh, gamma, key_img if key_img.numel() else None).to(row.dtype) if gamma != 0 \
        else row.clone()
    return new_row, fire, liae, thr, bh, sel


def _impl(fn, *args):
    mode = _MODE["mode"]
    if mode == "inductor" or (mode == "auto" and args[0].is_cuda):
        key = fn.__name__
        if key not in _COMPILED:
            try:
                _COMPILED[key] = torch.compile(fn, fullgraph=True, backend="inductor", dynamic=True)
            except Exception:  # no compiler available: the eager function, same numbers
                _COMPILED[key] = fn
        return _COMPILED[key](*args)
    return fn(*args)


@torch.library.custom_op("dleaf::layer_step", mutates_args=("n", "mean", "m2", "best_liae"))
def layer_step(row: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, key_img: torch.Tensor, n: torch.Tensor,
               mean: torch.Tensor, m2: torch.Tensor, best_liae: torch.Tensor, layer: int, threshold: str, k: float,
               delta: float, gamma: float, head_selection: str, bottom_k: int, rho: float, liae_variant: str,
               iaf_variant: str, warm: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _impl(layer_step_eager, row, pos, valid, key_img, n, mean, m2, best_liae, layer, threshold, k, delta, gamma,
                 head_selection, bottom_k, rho, liae_variant, iaf_variant, warm)


@layer_step.register_fake
def _layer_step_fake(row, pos, valid, key_img, n, mean, m2, best_liae, layer, threshold, k, delta, gamma,
                     head_selection, bottom_k, rho, liae_variant, iaf_variant, warm):
    B, H, _ = row.shape
    f = lambda *s, dtype=torch.float32: row.new_empty(s, dtype=dtype)  # noqa: E731
    return (torch.empty_like(row), f(B, dtype=torch.bool), f(B), f(B), f(B, dtype=torch.long),
            f(B, H, dtype=torch.bool))


def pai_step_eager(row: torch.Tensor, key_img: torch.Tensor, alpha: float) -> torch.Tensor:
    """PAI: the row's image probabilities times ``1 + alpha``, renormalised."""
    new = torch.where(key_img.unsqueeze(1), row * (1 + alpha), row)
    return new / new.sum(-1, keepdim=True)


@torch.library.custom_op("dleaf::pai_step", mutates_args=())
def pai_step(row: torch.Tensor, key_img: torch.Tensor, alpha: float) -> torch.Tensor:
    return _impl(pai_step_eager, row, key_img, alpha)


@pai_step.register_fake
def _pai_step_fake(row, key_img, alpha):
    return torch.empty_like(row)
