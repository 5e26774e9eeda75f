"""Prompt + image inputs: the processor route (any LLaVA-style model) and a fast tensor
route for training the embedded model, which must give identical tensors (tested)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from dleaf_analysis.errors import DleafError


class InputError(DleafError, ValueError):
    """Bad user input (image, prompt): the message says what to do."""


def as_pil(image, expected_size: int | None = None) -> Image.Image:
    """Check and convert an image (PIL, ``uint8 [H, W, 3]`` array, or a file path) to RGB PIL."""
    if isinstance(image, (str,)) or hasattr(image, "__fspath__"):
        try:
            with Image.open(image) as im:
                im.load()
                image = im.copy()
        except FileNotFoundError:
            raise InputError(f"image file not found: {image}") from None
        except Exception as e:  # PIL raises several types for broken files
            raise InputError(f"cannot read image {image}: {e}; give a PNG or JPEG file") from None
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InputError(
                f"image array must be uint8 [H, W, 3] RGB, got dtype {image.dtype} shape {image.shape}"
            )
        image = Image.fromarray(image, mode="RGB")
    if not isinstance(image, Image.Image):
        raise InputError(f"unsupported image type {type(image).__name__}; give a PIL image, array or path")
    if image.mode != "RGB":
        if image.mode in ("L", "RGBA", "P", "LA", "I;16", "CMYK"):
            image = image.convert("RGB")
        else:
            raise InputError(f"image mode {image.mode!r} is not supported; convert it to RGB")
    if expected_size is not None and image.size != (expected_size, expected_size):
        raise InputError(
            f"image is {image.size[0]}x{image.size[1]} px but this model takes "
            f"{expected_size}x{expected_size}; resize it (e.g. image.resize(({expected_size}, {expected_size})))"
        )
    return image


def append_ids(inputs: dict, ids: list[int]) -> dict:
    """``inputs`` of one sequence with ``ids`` appended as text (attention 1; Qwen2-VL's
    ``mm_token_type_ids`` 0)."""
    if inputs["input_ids"].shape[0] != 1:
        raise InputError("teacher-forced continuations take one sequence at a time (batch size 1)")
    inputs = dict(inputs)
    extra = torch.tensor([list(ids)], dtype=inputs["input_ids"].dtype, device=inputs["input_ids"].device)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], 1)
    if "attention_mask" in inputs:
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], 1)
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], 1)
    return inputs


class PromptBuilder:
    """Builds chat prompts and model inputs for a LLaVA-style processor."""

    def __init__(self, processor) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        ip = processor.image_processor
        self.mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        tok = processor.image_token
        self.image_token = getattr(tok, "content", tok)  # InstructBLIP keeps an AddedToken
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.plain_format = None
        if not (getattr(processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)):
            from dleaf_analysis.models.families import FAMILIES

            kind = type(processor).__name__.removesuffix("Processor").lower()
            fam = FAMILIES.get(kind)
            if fam is None or fam.plain_prompt is None:
                raise InputError(f"{type(processor).__name__} has no chat template and no known plain prompt format; "
                                 "add a chat_template.jinja to the model directory")
            self.plain_format = fam.plain_prompt

    def chat(self, prompt: str) -> str:
        """The prompt text in the model's chat template, with one image placeholder (or, for a
        checkpoint without a template, its plain format; its processor places the image tokens)."""
        if self.plain_format is not None:
            return self.plain_format.format(prompt=prompt)
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    def inputs(self, images: Sequence, prompts: Sequence[str], image_size: int | None = None):
        """Processor inputs (left-padded batch): ``input_ids [B, T]``, ``pixel_values [B, 3, H, W]``."""
        if len(images) != len(prompts):
            raise InputError(f"{len(images)} images but {len(prompts)} prompts")
        pil = [as_pil(im, image_size) for im in images]
        texts = [self.chat(p) for p in prompts]
        self.tokenizer.padding_side = "left"
        return self.processor(images=pil, text=texts, return_tensors="pt", padding=True)

    # -- fast tensor route (embedded model training) --------------------------------------
    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """``uint8 [B, H, W, 3]`` -> normalised ``float32 [B, 3, H, W]`` (no resize)."""
        x = images.permute(0, 3, 1, 2).float() / 255.0
        return (x - self.mean) / self.std

    def expanded_prompt_ids(self, prompt: str, n_image_tokens: int) -> list[int]:
        text = self.chat(prompt).replace(self.image_token, self.image_token * n_image_tokens)
        return self.tokenizer(text)["input_ids"]

    def training_batch(self, images: torch.Tensor, prompts: Sequence[str], answers: Sequence[str]) -> dict:
        """Right-padded teacher-forcing batch; ``labels`` are -100 outside the answers."""
        n_img = self.n_image_tokens(images.shape[1])
        eos = self.tokenizer.eos_token_id
        seqs, labels = [], []
        for p, a in zip(prompts, answers):
            pid = self.expanded_prompt_ids(p, n_img)
            aid = self.tokenizer(a, add_special_tokens=False)["input_ids"] + [eos]
            seqs.append(pid + aid)
            labels.append([-100] * len(pid) + aid)
        T = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        lab = torch.full((len(seqs), T), -100, dtype=torch.long)
        att = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, (s, l) in enumerate(zip(seqs, labels)):
            ids[i, : len(s)] = torch.tensor(s)
            lab[i, : len(l)] = torch.tensor(l)
            att[i, : len(s)] = 1
        return {"input_ids": ids, "attention_mask": att, "labels": lab, "pixel_values": self.pixel_values(images)}

    def n_image_tokens(self, image_size: int) -> int:
        p = self.processor
        n = (image_size // p.patch_size) ** 2 + p.num_additional_image_tokens
        if p.vision_feature_select_strategy == "default":
            n -= 1
        return n
