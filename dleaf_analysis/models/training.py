"""Training of the embedded model on the scene world (``dleaf train-model``), resumable.

LLaVA-1.5's recipe, in five stages from one seed:

1. **vision pretraining, then frozen**: the CLIP vision tower learns per-patch object labels
   (:func:`~dleaf_analysis.scenes.render.patch_labels`: the class covering most of each
   patch, or background) through a small MLP head that is thrown away, and, with two linear
   heads also thrown away, where the patch is (its row and column) and what its pixels look
   like (per-channel mean and standard deviation): cross-entropy on labels alone collapses
   every background patch of an image onto one point, while CLIP's patch tokens carry their
   position and local appearance.  The LLaVA features are the patch embedding (receptive
   field: one patch), so each image token stays about its own patch.  The tower is frozen from
   here on, as LLaVA-1.5's CLIP is in both its stages;
2. **language pretraining**: the language model alone learns the train descriptions as plain
   text (no image), the stand-in for an LLM's pretraining and the source of its co-occurrence
   prior;
3. **projector alignment**: the projector alone learns descriptions while the vision tower and
   the language model stay frozen (LLaVA-1.5's stage 1);
4. **instruction tuning**: projector and language model on descriptions and yes/no questions
   (LLaVA-1.5's stage 2); every step takes a batch of descriptions and a batch of questions,
   each padded on its own;
5. a continuation with mostly questions at a lower learning rate.

Negatives of the training questions are absent classes drawn uniformly (no co-occurrence
hard negatives), as in natural instruction data: the model is never taught to reject partners.
The descriptions are correct except for the world's ``p_absent_context`` share, whose last
sentence guesses an absent group-typical object (see :mod:`dleaf_analysis.scenes.world`).

**Resumable.**  A checkpoint (weights, optimiser, the batch sampler's and torch's random
states, the loss history) is written atomically after every stage and every
``checkpoint_every`` steps to ``<out>/checkpoints/``; a killed run started again with the same
configuration resumes there and ends with the same weights, bit for bit, as an uninterrupted
run (the thread count is part of the configuration: float sums depend on it).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dleaf_analysis.errors import DleafError
from dleaf_analysis.models.embedded import EmbeddedModelConfig, build_model, build_processor
from dleaf_analysis.models.inputs import PromptBuilder
from dleaf_analysis.scenes import World, load_split
from dleaf_analysis.scenes.render import patch_labels

STAGES = ("vision", "text", "align", "llava", "questions")
TEXT_FORMATS = ("plain", "chat")


class TrainingError(DleafError, RuntimeError):
    """A training run that cannot continue as asked (e.g. a checkpoint of another configuration)."""


@dataclass
class TrainConfig:
    """Hyperparameters of ``dleaf train-model``; the shipped model used the defaults."""

    seed: int = 0
    threads: int = 2  # torch intra-op threads (results are bitwise reproducible for a fixed count)
    vision_steps: int = 800  # stage 1: vision tower on per-patch labels
    text_steps: int = 800  # stage 2: language model on descriptions, text only
    align_steps: int = 300  # stage 3: projector only
    full_steps: int = 3500  # stage 4: projector + language model
    question_steps: int = 500  # stage 5: question-heavy continuation
    batch_size: int = 32  # descriptions per step (stages 2-4)
    question_batch: int = 24  # questions per step (stage 4)
    question_stage_batches: tuple[int, int] = (8, 48)  # (descriptions, questions) per step in stage 5
    question_stage_lr: float = 5e-4
    vision_batch: int = 48
    vision_lr: float = 2e-3
    vision_position_weight: float = 0.5  # stage 1: weight of each of the row / column cross-entropies
    vision_appearance_weight: float = 1.0  # stage 1: weight of the patch colour-statistics regression
    lr: float = 1.5e-3
    weight_decay: float = 0.01
    # stage 2 text: "plain" (the description alone after BOS) or "chat" (inside the chat template,
    # without the image: the constant BOS + system-prompt prefix exists from language
    # pretraining on, where an attention sink can form on it)
    text_format: str = "plain"
    train_size: int | None = None  # None: the whole train split
    checkpoint_every: int = 250
    model: EmbeddedModelConfig = field(default_factory=EmbeddedModelConfig)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["question_stage_batches"] = list(self.question_stage_batches)
        if d["text_format"] == "plain":  # the default of the recipe before the option existed: same hash
            del d["text_format"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["model"] = EmbeddedModelConfig(**d.get("model", {}))
        if "question_stage_batches" in d:
            d["question_stage_batches"] = tuple(d["question_stage_batches"])
        return cls(**d)

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def __post_init__(self) -> None:
        if self.text_format not in TEXT_FORMATS:
            raise TrainingError(f"text_format must be one of {TEXT_FORMATS}, not {self.text_format!r}")

    def stage_steps(self) -> dict[str, int]:
        return {"vision": self.vision_steps, "text": self.text_steps, "align": self.align_steps,
                "llava": self.full_steps, "questions": self.question_steps}


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


class _Heads(torch.nn.Module):
    """The stage-1 auxiliary heads (thrown away): patch label, row/column, colour statistics."""

    def __init__(self, hidden: int, n_labels: int, grid: int) -> None:
        super().__init__()
        self.label = torch.nn.Sequential(torch.nn.Linear(hidden, 256), torch.nn.GELU(), torch.nn.Linear(256, n_labels))
        self.position = torch.nn.Linear(hidden, 2 * grid)
        self.look = torch.nn.Linear(hidden, 6)


class Trainer:
    """The five-stage recipe as a resumable loop (see the module doc).

    ``run()`` trains to the end (or, with ``stop_after``, returns after that many optimiser
    steps in total, as a crash would, leaving the last checkpoint behind) and returns
    ``(model, processor, history)``.
    """

    def __init__(self, cfg: TrainConfig, checkpoint_dir: str | Path | None = None, world: World | None = None,
                 progress: bool = True, log: Callable[[str], None] = print) -> None:
        self.cfg, self.progress, self.log = cfg, progress, log
        self.world = world or World.load()
        self.ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        torch.set_num_threads(cfg.threads)
        self.processor = build_processor(self.world, cfg.model)
        self.tok = self.processor.tokenizer
        self.model = build_model(self.tok, cfg.model, seed=cfg.seed)
        self.builder = PromptBuilder(self.processor)
        grid = cfg.model.image_size // cfg.model.patch_size
        torch.manual_seed(cfg.seed)
        self.heads = _Heads(cfg.model.vision_hidden, len(self.world.classes) + 1, grid)
        self.rng = np.random.default_rng(cfg.seed)
        self.history: dict = {k: [] for k in ("vision_loss", "text_loss", "loss", "caption_loss", "question_loss")}
        self.stage, self.step, self.elapsed = 0, 0, 0.0
        self._opt_state = None
        self._data_ready = False

    # -- data ------------------------------------------------------------------------------
    def _data(self) -> None:
        if self._data_ready:
            return
        split = load_split("train", self.world, limit=self.cfg.train_size)
        self.scenes = split.scenes
        self.log(f"rendering {len(split)} training images")
        self.images = torch.from_numpy(split.images())  # uint8 [N, H, W, 3]
        p = self.cfg.model.patch_size
        self.patch_targets = torch.from_numpy(np.stack([patch_labels(self.world, sc, p) for sc in self.scenes]))
        self.captions = [self.world.caption(sc) for sc in self.scenes]
        self._data_ready = True

    def _question(self, i: int) -> tuple[str, str]:
        sc = self.scenes[i]
        if self.rng.random() < 0.5:
            present = sorted(sc.name_set)
            return self.world.question(present[self.rng.integers(len(present))]), "yes"
        absent = [c for c in self.world.classes if c not in sc.name_set]
        return self.world.question(absent[self.rng.integers(len(absent))]), "no"

    # -- checkpoints -----------------------------------------------------------------------
    @property
    def _ckpt_file(self) -> Path | None:
        return self.ckpt_dir / "checkpoint.pt" if self.ckpt_dir is not None else None

    def save_checkpoint(self, opt: torch.optim.Optimizer | None) -> None:
        if self._ckpt_file is None:
            return
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "config": self.cfg.to_dict(), "config_hash": self.cfg.hash, "stage": self.stage, "step": self.step,
            "model": self.model.state_dict(), "heads": self.heads.state_dict(),
            "optimizer": opt.state_dict() if opt is not None else None,
            "rng": self.rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
            "history": self.history, "elapsed": self.elapsed + (time.time() - self._t0),
        }
        tmp = self._ckpt_file.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self._ckpt_file)

    def load_checkpoint(self) -> bool:
        """Restore the last checkpoint, if any; refuse one of another configuration."""
        f = self._ckpt_file
        if f is None or not f.is_file():
            return False
        state = torch.load(f, weights_only=False)
        if state["config_hash"] != self.cfg.hash:
            diff = sorted(k for k in set(state["config"]) | set(self.cfg.to_dict())
                          if state["config"].get(k) != self.cfg.to_dict().get(k))
            raise TrainingError(f"{f} is a checkpoint of another training configuration (differs in {diff}); "
                                "use another --out, or delete the checkpoints directory to start over")
        self.model.load_state_dict(state["model"])
        self.heads.load_state_dict(state["heads"])
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        self.history, self.stage, self.step = state["history"], state["stage"], state["step"]
        self.elapsed = state["elapsed"]
        self._opt_state = state["optimizer"]
        self.log(f"resuming from {f}: stage {self.stage + 1} ({STAGES[self.stage]}), step {self.step}")
        return True

    # -- one optimiser step per stage --------------------------------------------------------
    def _params(self, stage: str) -> list[torch.nn.Parameter]:
        m = self.model.model
        lm = [p for n_, p in self.model.named_parameters() if "language_model" in n_ or n_.startswith("lm_head")]
        if stage == "vision":
            return list(m.vision_tower.parameters()) + list(self.heads.parameters())
        if stage == "text":
            return lm
        if stage == "align":
            return list(m.multi_modal_projector.parameters())
        return list(m.multi_modal_projector.parameters()) + lm

    def _vision_step(self) -> torch.Tensor:
        cfg = self.cfg
        grid = cfg.model.image_size // cfg.model.patch_size
        idx = torch.from_numpy(self.rng.integers(0, len(self.scenes), size=cfg.vision_batch))
        pix = self.builder.pixel_values(self.images[idx])
        feats = self.model.model.vision_tower(pixel_values=pix, output_hidden_states=True).hidden_states[
            self.model.config.vision_feature_layer][:, 1:]  # [B, P, D]
        logits = self.heads.label(feats)  # [B, P, C+1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.patch_targets[idx].reshape(-1))
        B = len(idx)
        rows, cols = torch.arange(grid * grid) // grid, torch.arange(grid * grid) % grid
        if cfg.vision_position_weight:
            pl = self.heads.position(feats)  # [B, P, 2 * grid]
            loss = loss + cfg.vision_position_weight * (
                F.cross_entropy(pl[..., :grid].reshape(-1, grid), rows.repeat(B))
                + F.cross_entropy(pl[..., grid:].reshape(-1, grid), cols.repeat(B)))
        if cfg.vision_appearance_weight:
            loss = loss + cfg.vision_appearance_weight * F.mse_loss(
                self.heads.look(feats), patch_appearance(self.images[idx], cfg.model.patch_size))
        self.history["vision_loss"].append(round(loss.item(), 5))
        return loss

    def _text_step(self) -> torch.Tensor:
        tok = self.tok
        idx = self.rng.integers(0, len(self.scenes), size=self.cfg.batch_size)
        tok.padding_side = "right"
        enc = tok([self.text_sample(self.captions[i]) for i in idx], return_tensors="pt", padding=True)
        tok.padding_side = "left"
        logits = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, :-1]
        labels = enc["input_ids"][:, 1:].masked_fill(enc["attention_mask"][:, 1:] == 0, -100)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        self.history["text_loss"].append(round(loss.item(), 5))
        return loss

    def text_sample(self, caption: str) -> str:
        """One stage-2 training text (the tokenizer adds BOS): the description, or with
        ``text_format="chat"`` the chat prompt without its image followed by the description."""
        if self.cfg.text_format == "chat":
            return self._chat_prefix + " " + caption + " " + self.tok.eos_token
        return caption + " " + self.tok.eos_token

    @functools.cached_property
    def _chat_prefix(self) -> str:
        """The chat prompt of the caption request without its image (the same for every sample)."""
        msgs = [{"role": "user", "content": [{"type": "text", "text": self.world.caption_prompt}]}]
        return self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    def _per_sequence_loss(self, idx: np.ndarray, prompts: list[str], answers: list[str]) -> torch.Tensor:
        batch = self.builder.training_batch(self.images[torch.from_numpy(idx)], prompts, answers)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=batch["pixel_values"])
        logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
        tok_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=-100, reduction="none").view(labels.shape)
        mask = (labels != -100).float()
        return (tok_loss * mask).sum(1) / mask.sum(1).clamp(min=1)  # [B]

    def _llava_step(self, n_captions: int, n_questions: int) -> torch.Tensor:
        n = len(self.scenes)
        parts, cap_l, q_l = [], None, None
        if n_captions:
            idx = self.rng.integers(0, n, size=n_captions)
            cap_l = self._per_sequence_loss(idx, [self.world.caption_prompt] * len(idx), [self.captions[i] for i in idx])
            parts.append(cap_l)
        if n_questions:
            idx = self.rng.integers(0, n, size=n_questions)
            qa = [self._question(i) for i in idx]
            q_l = self._per_sequence_loss(idx, [q for q, _ in qa], [a for _, a in qa])
            parts.append(q_l)
        # mean over sequences, not tokens: a yes/no answer weighs as much as a description
        loss = torch.cat(parts).mean()
        self.history["loss"].append(round(loss.item(), 5))
        self.history["caption_loss"].append(round(cap_l.mean().item(), 5) if cap_l is not None else None)
        self.history["question_loss"].append(round(q_l.mean().item(), 5) if q_l is not None else None)
        return loss

    def _loss(self, stage: str) -> torch.Tensor:
        if stage == "vision":
            return self._vision_step()
        if stage == "text":
            return self._text_step()
        if stage == "align":
            return self._llava_step(self.cfg.batch_size, 0)
        if stage == "llava":
            return self._llava_step(self.cfg.batch_size, self.cfg.question_batch)
        return self._llava_step(*self.cfg.question_stage_batches)

    def _lr(self, stage: str) -> float:
        return {"vision": self.cfg.vision_lr, "questions": self.cfg.question_stage_lr}.get(stage, self.cfg.lr)

    # -- the loop ----------------------------------------------------------------------------
    def run(self, stop_after: int | None = None):
        self._t0 = time.time()
        self.load_checkpoint()
        self._data()
        # sdpa trains about 3x faster than eager here and computes the same function; the
        # saved model is switched back to eager.
        self.model.set_attn_implementation("sdpa")
        self.model.train()
        steps = self.cfg.stage_steps()
        done = 0
        while self.stage < len(STAGES):
            name = STAGES[self.stage]
            total = steps[name]
            params = self._params(name)
            ids_ = {id(p) for p in params}
            for p in list(self.model.parameters()) + list(self.heads.parameters()):
                p.requires_grad_(id(p) in ids_)
            opt = torch.optim.AdamW(params, lr=self._lr(name), weight_decay=self.cfg.weight_decay)
            if self._opt_state is not None:
                opt.load_state_dict(self._opt_state)
                self._opt_state = None
            bar = tqdm(range(self.step, total), desc=f"stage {self.stage + 1}: {name}", disable=not self.progress,
                       mininterval=10, initial=self.step, total=total)
            for step in bar:
                for g in opt.param_groups:
                    g["lr"] = self._lr(name) * _cosine(step, total)
                loss = self._loss(name)
                opt.zero_grad()
                loss.backward()
                if name not in ("vision", "text"):
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                self.step = step + 1
                done += 1
                if self.step % self.cfg.checkpoint_every == 0 and self.step < total:
                    self.save_checkpoint(opt)
                if stop_after is not None and done >= stop_after:
                    return None
            self.stage, self.step = self.stage + 1, 0
            self.save_checkpoint(None)
        self.model.eval()
        self.model.requires_grad_(False)
        self.model.set_attn_implementation("eager")
        self.history["wall_time_s"] = round(self.elapsed + time.time() - self._t0, 1)
        self.history["threads"] = self.cfg.threads
        return self.model, self.processor, self.history


def train_embedded(cfg: TrainConfig, world: World | None = None, progress: bool = True,
                   log: Callable[[str], None] = print, checkpoint_dir: str | Path | None = None):
    """Train the embedded model; returns ``(model, processor, history)`` (per-step losses of every
    stage and the wall time).  With ``checkpoint_dir`` the run is resumable (see the module doc)."""
    return Trainer(cfg, checkpoint_dir, world, progress, log).run()


def save_embedded(model, processor, out_dir: str | Path, card: dict) -> None:
    """Save a standard HF model directory plus ``model_card.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "model_card.json").write_text(json.dumps(card, indent=1) + "\n")


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, world: World | None = None) -> Path:
    """Write the weights of a training checkpoint as a model directory (to look at a run before it
    ends); the directory loads with :func:`~dleaf_analysis.models.loading.load_model`."""
    state = torch.load(checkpoint, weights_only=False)
    cfg = TrainConfig.from_dict(state["config"])
    world = world or World.load()
    processor = build_processor(world, cfg.model)
    model = build_model(processor.tokenizer, cfg.model, seed=cfg.seed)
    model.load_state_dict(state["model"])
    model.eval()
    save_embedded(model, processor, out_dir, {"train": cfg.to_dict(), "history": state["history"],
                                              "checkpoint": {"stage": state["stage"], "step": state["step"]}})
    return Path(out_dir)
