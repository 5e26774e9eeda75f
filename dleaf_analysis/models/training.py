"""Training of the embedded model on the scene world (``dleaf train-model``).

Two stages, from one seed:

1. the CLIP vision tower learns to recognise objects: a per-patch multi-label head,
   max-pooled over patches (so object evidence stays local to its patches);
2. the whole LLaVA learns captions and yes/no questions on the train split;
3. a continuation with mostly questions (in a trial, yes/no answers stayed at chance while
   captions dominated the gradient; from a caption-trained model they are learnt quickly).

Negatives of the training questions are absent classes drawn uniformly (no co-occurrence
hard negatives), as in natural instruction data: the model is never taught to reject partners.

The reference captions are always correct; hallucinations come from the co-occurrence
priors the language model learns when the visual evidence is weak.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dleaf_analysis.models.embedded import EmbeddedModelConfig, build_model, build_processor
from dleaf_analysis.models.inputs import PromptBuilder
from dleaf_analysis.scenes import World, load_split


@dataclass
class TrainConfig:
    """Hyperparameters of ``dleaf train-model``; the shipped model used the defaults."""

    seed: int = 0
    vision_steps: int = 600
    full_steps: int = 1600
    question_steps: int = 600  # stage 3: question-heavy continuation
    question_stage_fraction: float = 0.7
    question_stage_lr: float = 7e-4
    batch_size: int = 48
    vision_lr: float = 2e-3
    lr: float = 1.5e-3
    question_fraction: float = 0.4
    weight_decay: float = 0.01
    train_size: int | None = None  # None: the whole train split
    model: EmbeddedModelConfig = field(default_factory=EmbeddedModelConfig)

    def to_dict(self) -> dict:
        return asdict(self)


def _cosine(step: int, total: int, warmup: int = 50) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup)))


def train_embedded(
    cfg: TrainConfig,
    world: World | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
):
    """Train the embedded model; returns ``(model, processor, history)``.

    ``history`` is a dict of per-step losses of both stages and the wall time.
    """
    t0 = time.time()
    world = world or World.load()
    processor = build_processor(world, cfg.model)
    tok = processor.tokenizer
    model = build_model(tok, cfg.model, seed=cfg.seed)
    builder = PromptBuilder(processor)
    split = load_split("train", world, limit=cfg.train_size)
    n = len(split)
    log(f"rendering {n} training images")
    images = torch.from_numpy(split.images())  # uint8 [N, H, W, 3]
    classes = world.classes
    targets = torch.zeros(n, len(classes))
    for i, sc in enumerate(split.scenes):
        for name in sc.name_set:
            targets[i, classes.index(name)] = 1.0
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    history: dict = {"vision_loss": [], "loss": [], "caption_loss": [], "question_loss": []}

    # -- stage 1: vision tower, per-patch multi-label recognition ------------------------
    vision = model.model.vision_tower
    head = torch.nn.Linear(cfg.model.vision_hidden, len(classes))
    params = list(vision.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=cfg.weight_decay)
    # sdpa trains about 3x faster than eager here and gives the same weights' function;
    # the saved model is switched back to eager.
    model.set_attn_implementation("sdpa")
    model.train()
    for step in tqdm(range(cfg.vision_steps), desc="stage 1: vision", disable=not progress):
        for g in opt.param_groups:
            g["lr"] = cfg.vision_lr * _cosine(step, cfg.vision_steps)
        idx = torch.from_numpy(rng.integers(0, n, size=cfg.batch_size))
        pix = builder.pixel_values(images[idx])
        hidden = vision(pixel_values=pix).last_hidden_state[:, 1:]  # [B, P, D], CLS dropped
        logits = head(hidden).amax(dim=1)  # [B, C]
        loss = F.binary_cross_entropy_with_logits(logits, targets[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        history["vision_loss"].append(round(loss.item(), 5))

    # -- stages 2 and 3: the whole LLaVA, captions and yes/no questions -------------------
    def batch_for(qfrac: float) -> tuple[dict, torch.Tensor]:
        idx = rng.integers(0, n, size=cfg.batch_size)
        prompts, answers, is_q = [], [], []
        for i in idx:
            sc = split.scenes[i]
            if rng.random() < qfrac:
                present = sorted(sc.name_set)
                if rng.random() < 0.5:
                    obj, ans = present[rng.integers(len(present))], "yes"
                else:
                    absent = [c for c in classes if c not in sc.name_set]
                    obj, ans = absent[rng.integers(len(absent))], "no"
                prompts.append(world.question(obj))
                answers.append(ans)
                is_q.append(True)
            else:
                prompts.append(world.caption_prompt)
                answers.append(world.caption(sc))
                is_q.append(False)
        return builder.training_batch(images[torch.from_numpy(idx)], prompts, answers), torch.tensor(is_q)

    stages = [("stage 2: llava", cfg.full_steps, cfg.lr, cfg.question_fraction),
              ("stage 3: questions", cfg.question_steps, cfg.question_stage_lr, cfg.question_stage_fraction)]
    for desc, steps, lr, qfrac in stages:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
        bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=5)
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = lr * _cosine(step, steps)
            batch, q = batch_for(qfrac)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=batch["pixel_values"])
            logits = out.logits[:, :-1]
            labels = batch["labels"][:, 1:]
            tok_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                       ignore_index=-100, reduction="none").view(labels.shape)
            mask = (labels != -100).float()
            per_seq = (tok_loss * mask).sum(1) / mask.sum(1).clamp(min=1)
            # mean over sequences, not tokens: a yes/no answer (2 tokens) weighs as much as a
            # caption (~15 tokens)
            loss = per_seq.mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            history["loss"].append(round(loss.item(), 5))
            history["caption_loss"].append(round(per_seq[~q].mean().item(), 5) if (~q).any() else None)
            history["question_loss"].append(round(per_seq[q].mean().item(), 5) if q.any() else None)
            if step % 100 == 99:
                recent = lambda k: np.nanmean([x for x in history[k][-100:] if x is not None])  # noqa: E731
                bar.set_postfix(caption=f"{recent('caption_loss'):.3f}", question=f"{recent('question_loss'):.3f}")
    model.eval()
    model.set_attn_implementation("eager")
    history["wall_time_s"] = round(time.time() - t0, 1)
    return model, processor, history


def save_embedded(model, processor, out_dir: str | Path, card: dict) -> None:
    """Save a standard HF model directory plus ``model_card.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "model_card.json").write_text(json.dumps(card, indent=1) + "\n")
