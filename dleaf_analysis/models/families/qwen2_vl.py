"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): M-RoPE, merged image patches.

transformers' ``Qwen2VLProcessor`` also requires a video processor, and every video processor
needs torchvision, which this project keeps out (it would pull a CUDA build of torch):
:class:`Qwen2VLImageProcessor` is the same processor without video -- its images, chat template
and image-token expansion are ``Qwen2VLProcessor``'s own; passing ``videos`` is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

from dleaf_analysis.errors import DleafError
from dleaf_analysis.models.families import Family, register
from dleaf_analysis.models.tiny import word_tokenizer


class VideoNotSupportedError(DleafError, ValueError):
    """Videos were passed to an image-only processor."""


class Qwen2VLImageProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without its video processor (images only; no torchvision needed)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise VideoNotSupportedError("this Qwen2-VL processor handles images only (video processing needs "
                                         "torchvision, which this project does not install)")
        return super().__call__(images=images, text=text, **kwargs)


def load_qwen2_vl_processor(path: str | Path) -> Qwen2VLImageProcessor:
    """The image-only Qwen2-VL processor of a checkpoint directory (its tokenizer, image
    processor settings and chat template)."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    ip = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)
    template = None
    for name in ("chat_template.jinja", "chat_template.json"):
        f = path / name
        if f.is_file():
            template = f.read_text() if name.endswith(".jinja") else json.loads(f.read_text())["chat_template"]
            break
    return Qwen2VLImageProcessor(image_processor=ip, tokenizer=tok, chat_template=template or tok.chat_template)


QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|> {{ message['role'] }} {% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|> <|image_pad|> <|vision_end|> {% else %}{{ c['text'] }} {% endif %}"
    "{% endfor %}<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def tiny_qwen2_vl(seed: int = 0):
    """``Qwen2VLForConditionalGeneration`` with a 4x4-patch image (4 merged image tokens)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=512, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
                bos_token_id=1, eos_token_id=2)
    vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, in_chans=3)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=99, video_token_id=98,
                        vision_start_token_id=97, vision_end_token_id=96)
    cfg.architectures = ["Qwen2VLForConditionalGeneration"]
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    grid = torch.tensor([[1, 4, 4]])  # t, h, w in patches
    n_patches = int(grid.prod())
    pixel_values = torch.randn(n_patches, 3 * 2 * 14 * 14)
    n_tokens = n_patches // 4
    ids = torch.tensor([[1, 5, 97] + [99] * n_tokens + [96, 7, 8]])
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixel_values,
                   "image_grid_thw": grid, "mm_token_type_ids": (ids == 99).int()}


def tiny_qwen2_vl_dir(out_dir: str | Path, seed: int = 0) -> Path:
    """A random ``Qwen2VLForConditionalGeneration`` saved in the layout of a released Qwen2-VL
    directory (``preprocessor_config.json`` with a ``Qwen2VLImageProcessor``, tokenizer files,
    ``chat_template.jinja``; no video processor).  Images of 56-112 px give 4-16 image tokens."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    special = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>"]
    tok = word_tokenizer(special + ["user", "assistant", "system"], eos="<|im_end|>")
    ids = tok.convert_tokens_to_ids
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=1024,
                rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, in_chans=3)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                        vision_end_token_id=ids("<|vision_end|>"))
    cfg.architectures = ["Qwen2VLForConditionalGeneration"]
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.chat_template = QWEN2_VL_TEMPLATE
    tok.save_pretrained(out)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2,
                             temporal_patch_size=2).save_pretrained(out)
    (out / "chat_template.jinja").write_text(QWEN2_VL_TEMPLATE)
    return out


FAMILY = register(Family(
    model_type="qwen2_vl", hf_class="Qwen2VLForConditionalGeneration", decoder=("model.language_model",),
    load_processor=load_qwen2_vl_processor, tiny_model=tiny_qwen2_vl, tiny_dir=tiny_qwen2_vl_dir,
))
