"""Generation utilities every later module reuses: caption an image, answer a yes/no question.

All functions take a :class:`~dleaf_analysis.models.loading.LoadedModel`, batch the work and
show a progress bar.  Decoding is greedy unless ``do_sample`` is set (then ``seed`` fixes it).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from dleaf_analysis.models.loading import LoadedModel

DEFAULT_CAPTION_PROMPT = "describe the image in detail ."
DEFAULT_MAX_NEW_TOKENS = 144  # captions: the embedded model's descriptions run 70-136 tokens


def generate(
    lm: LoadedModel,
    images: Sequence,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 32,
    do_sample: bool = False,
    seed: int = 0,
    progress: bool = True,
    desc: str = "generating",
    decode: Callable[..., torch.Tensor] | None = None,
    return_ids: bool = False,
    **generate_kwargs,
) -> list[str] | list[list[int]]:
    """Generate a continuation for each (image, prompt); returns the decoded new text (or, with
    ``return_ids``, the new token ids up to and without the end-of-sequence token).

    ``decode(lm, inputs, **kwargs) -> ids [B, T]`` replaces ``model.generate`` (how decoding
    methods and interventions plug in; see :mod:`dleaf_analysis.interventions`).
    """
    out: list = []
    tok = lm.tokenizer
    g = torch.Generator().manual_seed(seed)
    starts = range(0, len(images), batch_size)
    for s in tqdm(starts, desc=desc, disable=not progress or len(starts) <= 1):
        inputs = lm.inputs(images[s : s + batch_size], prompts[s : s + batch_size])  # on the model's device
        if do_sample:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        kw = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=lm.pad_token_id, **generate_kwargs)
        with torch.no_grad():
            ids = decode(lm, inputs, **kw) if decode is not None else lm.model.generate(**inputs, **kw)
        new = ids[:, inputs["input_ids"].shape[1] :]
        if return_ids:
            out.extend(new_token_ids(new.tolist(), lm))
            continue
        out.extend(t.strip() for t in tok.batch_decode(new, skip_special_tokens=True))
    return out


def caption(lm: LoadedModel, images: Sequence, prompt: str = DEFAULT_CAPTION_PROMPT,
            max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, **kw) -> list[str]:
    """Caption each image (greedy by default)."""
    kw.setdefault("desc", "captioning")
    return generate(lm, images, [prompt] * len(images), max_new_tokens=max_new_tokens, **kw)


def new_token_ids(rows: list[list[int]], lm: LoadedModel) -> list[list[int]]:
    """Generated ids per sequence, cut at the first end-of-sequence token (exclusive)."""
    eos = lm.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {lm.tokenizer.eos_token_id}
    out = []
    for r in rows:
        cut = next((k for k, t in enumerate(r) if t in eos), len(r))
        out.append(r[:cut])
    return out


def caption_ids(lm: LoadedModel, images: Sequence, prompt: str = DEFAULT_CAPTION_PROMPT,
                max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                **kw) -> list[list[int]]:
    """Caption each image (greedy by default); the generated token ids (events are located in them)."""
    kw.setdefault("desc", "captioning")
    return generate(lm, images, [prompt] * len(images), max_new_tokens=max_new_tokens, return_ids=True, **kw)


def answer(lm: LoadedModel, images: Sequence, questions: Sequence[str], max_new_tokens: int = 3, **kw) -> list[str]:
    """Answer one question per image (e.g. POPE's "is there a knife in the image ?")."""
    kw.setdefault("desc", "answering")
    return generate(lm, images, list(questions), max_new_tokens=max_new_tokens, **kw)
