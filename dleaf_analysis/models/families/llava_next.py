"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres tiling, so sequences of one batch can
hold different numbers of image tokens."""

from __future__ import annotations

from pathlib import Path

import torch

from dleaf_analysis.models.families import Family, register
from dleaf_analysis.models.tiny import text_config, word_tokenizer
from dleaf_analysis.scenes.world import World


def tiny_llava_next(seed: int = 0):
    """``LlavaNextForConditionalGeneration`` with inputs whose image-token count matches its features."""
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text_config(80), image_token_id=79,
                          image_grid_pinpoints=[[28, 28]], vision_feature_layer=-1)
    cfg.architectures = ["LlavaNextForConditionalGeneration"]
    model = LlavaNextForConditionalGeneration(cfg).eval()
    pixel_values = torch.randn(1, 2, 3, 28, 28)  # base image + one 28x28 tile
    image_sizes = torch.tensor([[28, 28]])
    with torch.no_grad():
        n = model.model.get_image_features(pixel_values, image_sizes).pooler_output[0].shape[0]
    ids = torch.tensor([[1, 5, 6] + [79] * n + [7, 8, 9]])
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixel_values,
                   "image_sizes": image_sizes}


def tiny_llava_next_mixed(seed: int = 0, sizes: tuple[tuple[int, int], ...] = ((28, 28), (56, 56))):
    """``LlavaNextForConditionalGeneration`` (anyres) with images of different sizes, hence different
    image-token counts per sequence.  Returns ``(model, singles, batch)``: each image's own inputs,
    and the same sequences left-padded into one batch (tiles padded, as the processor does)."""
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text_config(80), image_token_id=79,
                          image_grid_pinpoints=[[28, 28], [28, 56], [56, 56]], vision_feature_layer=-1)
    cfg.architectures = ["LlavaNextForConditionalGeneration"]
    model = LlavaNextForConditionalGeneration(cfg).eval()
    singles = []
    for h, w in sizes:
        pv = torch.randn(1, 1 + (h // 28) * (w // 28), 3, 28, 28)  # base image + tiles
        isz = torch.tensor([[h, w]])
        with torch.no_grad():
            n = model.model.get_image_features(pv, isz).pooler_output[0].shape[0]
        ids = torch.tensor([[1, 5, 6] + [79] * n + [7, 8, 9]])
        singles.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pv, "image_sizes": isz})
    T = max(x["input_ids"].shape[1] for x in singles)
    P = max(x["pixel_values"].shape[1] for x in singles)
    B = len(singles)
    ids, am = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
    pv = torch.zeros(B, P, 3, 28, 28)
    for i, x in enumerate(singles):
        t = x["input_ids"].shape[1]
        ids[i, T - t:], am[i, T - t:] = x["input_ids"][0], 1
        pv[i, : x["pixel_values"].shape[1]] = x["pixel_values"][0]
    batch = {"input_ids": ids, "attention_mask": am, "pixel_values": pv,
             "image_sizes": torch.cat([x["image_sizes"] for x in singles])}
    return model, singles, batch


def tiny_llava_next_dir(out_dir: str | Path, seed: int = 0) -> Path:
    """A random ``LlavaNextForConditionalGeneration`` (anyres: 28 px tiles, grids up to 56x56)
    saved as a llava-hf LLaVA-NeXT directory; images of different sizes give different numbers
    of image tokens."""
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from dleaf_analysis.models.embedded import chat_template

    tok = word_tokenizer(["<image>"])
    template = chat_template(World.load().system_prompt)
    tok.chat_template = template
    pinpoints = [[28, 28], [28, 56], [56, 28], [56, 56]]
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14)
    text = text_config(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                          image_grid_pinpoints=pinpoints, vision_feature_layer=-1)
    cfg.architectures = ["LlavaNextForConditionalGeneration"]
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    out = Path(out_dir)
    model.save_pretrained(out)
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                    image_grid_pinpoints=pinpoints)
    LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                       num_additional_image_tokens=1,
                       chat_template=template).save_pretrained(out)
    return out


FAMILY = register(Family(
    model_type="llava_next", hf_class="LlavaNextForConditionalGeneration", decoder=("model.language_model",),
    tiny_model=tiny_llava_next, tiny_dir=tiny_llava_next_dir,
))
