"""Training of the embedded model on the scene world (``dleaf train-model``).

LLaVA-1.5's recipe, in five stages from one seed:

1. **vision pretraining, then frozen**: the CLIP vision tower learns per-patch object labels
   (:func:`~dleaf_analysis.scenes.render.patch_labels`: the class covering most of each
   patch, or background) through a small MLP head that is thrown away, and, with two linear
   heads also thrown away, where the patch is (its row and column) and what its pixels look
   like (per-channel mean and standard deviation): cross-entropy on labels alone collapses
   every background patch of an image onto one point, while CLIP's patch tokens carry their
   position and local appearance.  The LLaVA features
   are the patch embedding (receptive field: one patch), so each image token stays about its
   own patch.  The tower is frozen from here on, as LLaVA-1.5's CLIP is in both its stages;
2. **language pretraining**: the language model alone learns the train captions as plain text
   (no image), the stand-in for an LLM's pretraining and the source of its co-occurrence prior;
3. **projector alignment**: the projector alone learns captions while the vision tower and the
   language model stay frozen (LLaVA-1.5's stage 1);
4. **instruction tuning**: projector and language model on captions and yes/no questions
   (LLaVA-1.5's stage 2);
5. a continuation with mostly questions (from a caption-trained model yes/no answers are
   learnt quickly; with captions dominating the gradient they stay near chance).

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
from dleaf_analysis.scenes.render import patch_labels


@dataclass
class TrainConfig:
    """Hyperparameters of ``dleaf train-model``; the shipped model used the defaults."""

    seed: int = 0
    vision_steps: int = 800  # stage 1: vision tower on per-patch labels
    text_steps: int = 600  # stage 2: language model on captions, text only
    align_steps: int = 300  # stage 3: projector only
    full_steps: int = 2400  # stage 4: projector + language model
    question_steps: int = 600  # stage 5: question-heavy continuation
    question_stage_fraction: float = 0.7
    question_stage_lr: float = 7e-4
    batch_size: int = 48
    vision_lr: float = 2e-3
    vision_position_weight: float = 0.5  # stage 1: weight of each of the row / column cross-entropies
    vision_appearance_weight: float = 1.0  # stage 1: weight of the patch colour-statistics regression
    lr: float = 1.5e-3
    question_fraction: float = 0.4
    weight_decay: float = 0.01
    train_size: int | None = None  # None: the whole train split
    model: EmbeddedModelConfig = field(default_factory=EmbeddedModelConfig)

    def to_dict(self) -> dict:
        return asdict(self)


def patch_appearance(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Per-patch colour statistics, ``uint8 [B, H, W, 3] -> float [B, P, 6]`` (per-channel mean
    and standard deviation of each row-major patch, standardised to about zero mean and unit
    scale): the appearance target of the vision pretraining."""
    B, H, W, _ = images.shape
    g = H // patch_size
    x = images[:, : g * patch_size, : g * patch_size].float() / 255.0
    x = x.reshape(B, g, patch_size, g, patch_size, 3).permute(0, 1, 3, 2, 4, 5).reshape(B, g * g, -1, 3)
    return (torch.cat([x.mean(2), x.std(2)], -1) - 0.3) / 0.2


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
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    history: dict = {"text_loss": [], "vision_loss": [], "loss": [], "caption_loss": [], "question_loss": []}

    # -- stage 1: vision tower, per-patch object labels; then frozen ---------------------
    vision = model.model.vision_tower
    feature_layer = model.config.vision_feature_layer
    patch_targets = torch.from_numpy(np.stack([patch_labels(world, sc, cfg.model.patch_size) for sc in split.scenes]))
    head = torch.nn.Sequential(torch.nn.Linear(cfg.model.vision_hidden, 256), torch.nn.GELU(),
                               torch.nn.Linear(256, len(classes) + 1))
    grid = cfg.model.image_size // cfg.model.patch_size
    pos_head = torch.nn.Linear(cfg.model.vision_hidden, 2 * grid)  # row and column logits
    look_head = torch.nn.Linear(cfg.model.vision_hidden, 6)  # per-channel mean and std of the patch
    rows_t, cols_t = torch.arange(grid * grid) // grid, torch.arange(grid * grid) % grid
    params = list(vision.parameters()) + list(head.parameters()) + list(pos_head.parameters()) + \
        list(look_head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=cfg.weight_decay)
    # sdpa trains about 3x faster than eager here and gives the same weights' function;
    # the saved model is switched back to eager.
    model.set_attn_implementation("sdpa")
    model.train()
    for step in tqdm(range(cfg.vision_steps), desc="stage 1: vision", disable=not progress, mininterval=5):
        for g in opt.param_groups:
            g["lr"] = cfg.vision_lr * _cosine(step, cfg.vision_steps)
        idx = torch.from_numpy(rng.integers(0, n, size=cfg.batch_size))
        pix = builder.pixel_values(images[idx])
        feats = vision(pixel_values=pix, output_hidden_states=True).hidden_states[feature_layer][:, 1:]  # [B, P, D]
        logits = head(feats)  # [B, P, C+1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), patch_targets[idx].reshape(-1))
        if cfg.vision_position_weight:
            pl = pos_head(feats)  # [B, P, 2 * grid]
            B = len(idx)
            loss = loss + cfg.vision_position_weight * (
                F.cross_entropy(pl[..., :grid].reshape(-1, grid), rows_t.repeat(B))
                + F.cross_entropy(pl[..., grid:].reshape(-1, grid), cols_t.repeat(B)))
        if cfg.vision_appearance_weight:
            loss = loss + cfg.vision_appearance_weight * F.mse_loss(
                look_head(feats), patch_appearance(images[idx], cfg.model.patch_size))
        opt.zero_grad()
        loss.backward()
        opt.step()
        history["vision_loss"].append(round(loss.item(), 5))
    vision.requires_grad_(False)

    # -- stage 2: the language prior, text only ------------------------------------------
    lm_params = [p for n_, p in model.named_parameters() if "language_model" in n_ or n_.startswith("lm_head")]
    opt = torch.optim.AdamW(lm_params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    tok.padding_side = "right"
    for step in tqdm(range(cfg.text_steps), desc="stage 2: language", disable=not progress, mininterval=5):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _cosine(step, cfg.text_steps)
        idx = rng.integers(0, n, size=cfg.batch_size)
        enc = tok([world.caption(split.scenes[i]) + " " + tok.eos_token for i in idx], return_tensors="pt", padding=True)
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, :-1]
        labels = enc["input_ids"][:, 1:].masked_fill(enc["attention_mask"][:, 1:] == 0, -100)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history["text_loss"].append(round(loss.item(), 5))
    tok.padding_side = "left"

    # -- stages 3 to 5: projector alignment, then projector + language model -------------
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

    projector = model.model.multi_modal_projector
    trainable = [p for p in model.parameters() if p.requires_grad]  # all but the frozen tower
    stages = [("stage 3: align projector", cfg.align_steps, cfg.lr, 0.0, list(projector.parameters())),
              ("stage 4: llava", cfg.full_steps, cfg.lr, cfg.question_fraction, trainable),
              ("stage 5: questions", cfg.question_steps, cfg.question_stage_lr, cfg.question_stage_fraction, trainable)]
    for desc, steps, lr, qfrac, params in stages:
        if steps <= 0:
            continue
        ids_ = {id(p) for p in params}
        for p in trainable:  # frozen parts get no gradient at all in this stage
            p.requires_grad_(id(p) in ids_)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
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
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            history["loss"].append(round(loss.item(), 5))
            history["caption_loss"].append(round(per_seq[~q].mean().item(), 5) if (~q).any() else None)
            history["question_loss"].append(round(per_seq[q].mean().item(), 5) if q.any() else None)
            if step % 100 == 99:
                def recent(k: str) -> float:
                    xs = [x for x in history[k][-100:] if x is not None]
                    return float(np.mean(xs)) if xs else float("nan")
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
