"""Visual contrastive decoding (Leng et al. 2024), greedy, against a noised image."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from dleaf_analysis import hooks
from dleaf_analysis.interventions.base import ConfigError, Method, RunRecord, check_range, register


@register
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
        check_range("alpha", self.alpha, 0.0, 100.0)
        check_range("beta", self.beta, 0.0, 1.0)
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

    def decode(self, lm, inputs: dict, max_new_tokens: int = 32, pad_token_id: int | None = None,
               **_) -> tuple[torch.Tensor, RunRecord]:
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
        return out_ids, RunRecord(self.name)
