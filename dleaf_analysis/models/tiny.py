"""Tiny randomly initialised models of the real transformers classes, for tests, benchmarks and
the real-checkpoint code path (no weights are downloaded anywhere).

``tiny_llava15`` has LLaVA-1.5's image geometry (336 px, patch 14: 576 image tokens) and is
saved as a complete model directory (config, weights, processor, tokenizer) in the llava-hf
layout.  The other classes are returned as ``(model, inputs)`` built from their configs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dleaf_analysis.models.embedded import EmbeddedModelConfig, build_model, build_processor
from dleaf_analysis.scenes.world import World


def tiny_llava15(out_dir: str | Path | None = None, layers: int = 2, hidden: int = 64, heads: int = 4, seed: int = 0):
    """A LLaVA-1.5-shaped random model (576 image tokens).  With ``out_dir`` it is saved there as a
    model directory and the directory is returned; otherwise ``(model, processor)``."""
    cfg = EmbeddedModelConfig(image_size=336, patch_size=14, vision_hidden=32, vision_layers=1, vision_heads=2,
                              text_hidden=hidden, text_layers=layers, text_heads=heads,
                              text_intermediate=2 * hidden, max_positions=1024)
    world = World.load()
    processor = build_processor(world, cfg)
    model = build_model(processor.tokenizer, cfg, seed=seed)
    if out_dir is None:
        return model, processor
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _text_cfg(vocab: int, hidden: int = 32, layers: int = 2, heads: int = 4, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512, **kw)


def tiny_llava_next(seed: int = 0):
    """``LlavaNextForConditionalGeneration`` with inputs whose image-token count matches its features."""
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14)
    cfg = LlavaNextConfig(vision_config=vision, text_config=_text_cfg(80), image_token_id=79,
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
    cfg = LlavaNextConfig(vision_config=vision, text_config=_text_cfg(80), image_token_id=79,
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


def tiny_instructblip(seed: int = 0):
    """``InstructBlipForConditionalGeneration`` (Q-Former, Llama decoder) with 4 query tokens."""
    from transformers import (InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipQFormerConfig,
                              InstructBlipVisionConfig)

    torch.manual_seed(seed)
    vision = InstructBlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      image_size=28, patch_size=14)
    qformer = InstructBlipQFormerConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64, encoder_hidden_size=32, vocab_size=50)
    cfg = InstructBlipConfig(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                             text_config=_text_cfg(80).to_dict(), num_query_tokens=4, image_token_index=79)
    cfg.text_config.model_type = "llama"
    cfg.architectures = ["InstructBlipForConditionalGeneration"]
    model = InstructBlipForConditionalGeneration(cfg).eval()
    ids = torch.tensor([[1] + [79] * 4 + [5, 6, 7, 8]])
    qf = torch.tensor([[1, 2, 3]])
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(1, 3, 28, 28),
                   "qformer_input_ids": qf, "qformer_attention_mask": torch.ones_like(qf)}


OTHER_CLASSES = {"llava_next": tiny_llava_next, "qwen2_vl": tiny_qwen2_vl, "instructblip": tiny_instructblip}


def _word_tokenizer(extra: list[str], eos: str = "</s>"):
    """A word-level fast tokenizer over the scene world's words plus ``extra`` special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dleaf_analysis.models.embedded import PROMPT_WORDS, SPECIAL_TOKENS

    words = list(dict.fromkeys(SPECIAL_TOKENS + PROMPT_WORDS + World.load().words + extra))
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=eos, pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left")
    fast.add_special_tokens({"additional_special_tokens": [t for t in extra if t.startswith("<")]})
    return fast


QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|> {{ message['role'] }} {% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|> <|image_pad|> <|vision_end|> {% else %}{{ c['text'] }} {% endif %}"
    "{% endfor %}<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def tiny_qwen2_vl_dir(out_dir: str | Path, seed: int = 0) -> Path:
    """A random ``Qwen2VLForConditionalGeneration`` saved in the layout of a released Qwen2-VL
    directory (``preprocessor_config.json`` with a ``Qwen2VLImageProcessor``, tokenizer files,
    ``chat_template.jinja``; no video processor).  Images of 56-112 px give 4-16 image tokens."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    special = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>"]
    tok = _word_tokenizer(special + ["user", "assistant", "system"], eos="<|im_end|>")
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


def tiny_instructblip_dir(out_dir: str | Path, seed: int = 0) -> Path:
    """A random ``InstructBlipForConditionalGeneration`` (Q-Former, Llama decoder, 4 query tokens)
    saved as a released InstructBLIP directory is: processor with a Q-Former tokenizer and **no
    chat template**."""
    from transformers import (InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipProcessor,
                              InstructBlipQFormerConfig, InstructBlipVisionConfig)
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tok = _word_tokenizer(["<image>"])
    qtok = _word_tokenizer([])
    torch.manual_seed(seed)
    vision = InstructBlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      image_size=28, patch_size=14)
    qformer = InstructBlipQFormerConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64, encoder_hidden_size=32, vocab_size=len(qtok))
    text = _text_cfg(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id)
    cfg = InstructBlipConfig(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                             text_config=text.to_dict(), num_query_tokens=4,
                             image_token_index=tok.convert_tokens_to_ids("<image>"))
    cfg.text_config.model_type = "llama"
    cfg.architectures = ["InstructBlipForConditionalGeneration"]
    model = InstructBlipForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    out = Path(out_dir)
    model.save_pretrained(out)
    ip = BlipImageProcessorPil(size={"height": 28, "width": 28})
    InstructBlipProcessor(image_processor=ip, tokenizer=tok, qformer_tokenizer=qtok, num_query_tokens=4).save_pretrained(out)
    return out


def tiny_llava_next_dir(out_dir: str | Path, seed: int = 0) -> Path:
    """A random ``LlavaNextForConditionalGeneration`` (anyres: 28 px tiles, grids up to 56x56)
    saved as a llava-hf LLaVA-NeXT directory; images of different sizes give different numbers
    of image tokens."""
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from dleaf_analysis.models.embedded import CHAT_TEMPLATE

    tok = _word_tokenizer(["<image>"])
    tok.chat_template = CHAT_TEMPLATE
    pinpoints = [[28, 28], [28, 56], [56, 28], [56, 56]]
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14)
    text = _text_cfg(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
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
                       chat_template=CHAT_TEMPLATE).save_pretrained(out)
    return out


SAVED_CLASSES = {"llava": tiny_llava15, "llava_next": tiny_llava_next_dir, "qwen2_vl": tiny_qwen2_vl_dir, "instructblip": tiny_instructblip_dir}


LLAVA15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% else %}ASSISTANT: "
    "{% for c in message['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
SUBWORD_OBJECTS = ("person", "dog", "cat", "frisbee", "car", "bench", "bicycle", "umbrella", "teddy bear", "horse",
                   "bird", "boat", "chair", "cup", "kite", "train", "truck", "pizza", "bowl", "clock")
SUBWORD_CAPTION = "A person and a dog play with a frisbee near a teddy bear and a bicycle."


def subword_tokenizer(vocab_size: int = 110):
    """A small SentencePiece-style BPE tokenizer (``▁`` word marker, like LLaVA-1.5's Llama
    tokenizer) trained with the ``tokenizers`` library on COCO's category names and caption
    words; with its small vocabulary most object words split into several sub-tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [SUBWORD_CAPTION, "Please describe this image in detail.", "USER: ASSISTANT:",
              "a an the and with near on in of is are there two three people"]
    corpus += [f"a {c} and {c}s" for c in SUBWORD_OBJECTS]
    special = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    alphabet = sorted(set("".join(corpus)) | set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'-\n"))
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                        initial_alphabet=alphabet, show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def tiny_llava15_subword_dir(out_dir: str | Path, seed: int = 0, caption: str = SUBWORD_CAPTION,
                             steps: int = 400) -> Path:
    """A tiny ``LlavaForConditionalGeneration`` in the llava-hf LLaVA-1.5 layout (CLIP tower at
    56 px: 16 image tokens; LLaVA-1.5's chat template; a 4-layer Llama, so that D-LEAF has
    candidate layers 2 and 3) with a sub-word tokenizer
    (:func:`subword_tokenizer`), trained for a few seconds to answer every image with ``caption``
    -- so that its greedy captions mention COCO objects, several of them absent from any given
    image.  Saved to ``out_dir`` (returned)."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from dleaf_analysis.models.inputs import PromptBuilder

    tok = subword_tokenizer()
    tok.chat_template = LLAVA15_TEMPLATE
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=56, patch_size=14)
    text = _text_cfg(len(tok), hidden=64, layers=4, heads=4, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-1, vision_feature_select_strategy="default")
    cfg.architectures = ["LlavaForConditionalGeneration"]
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    ip = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    processor = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=LLAVA15_TEMPLATE)
    # teach it one answer, whatever the image (random images; the prompt of COCO captioning)
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(4, 56, 56, 3, generator=g) * 255).to(torch.uint8)
    batch = PromptBuilder(processor).training_batch(images, ["Please describe this image in detail."] * 4,
                                                    [" " + caption] * 4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 1e-3:
            break
    model.eval()
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
