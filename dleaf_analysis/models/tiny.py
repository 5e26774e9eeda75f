"""Tiny randomly initialised LLaVA-1.5 models and the helpers every family's tiny builder uses
(no weights are downloaded anywhere).  The other classes' builders are in their family files
(:mod:`dleaf_analysis.models.families`).

``tiny_llava15`` has LLaVA-1.5's image geometry (336 px, patch 14: 576 image tokens) and is
saved as a complete model directory (config, weights, processor, tokenizer) in the llava-hf
layout; ``tiny_llava15_subword_dir`` has a sub-word tokenizer and is trained for seconds to
mention COCO objects.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dleaf_analysis.models.embedded import EmbeddedModelConfig, build_model, build_processor
from dleaf_analysis.scenes.world import World

def tiny_llava15(out_dir: str | Path | None = None, layers: int = 2, hidden: int = 64, heads: int = 4, seed: int = 0,
                 image_size: int = 336):
    """A LLaVA-1.5-shaped random model (576 image tokens at the default 336 px).  With ``out_dir`` it
    is saved there as a model directory and the directory is returned; otherwise ``(model, processor)``."""
    cfg = EmbeddedModelConfig(image_size=image_size, patch_size=14, vision_hidden=32, vision_layers=1, vision_heads=2,
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

def text_config(vocab: int, hidden: int = 32, layers: int = 2, heads: int = 4, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512, **kw)

def word_tokenizer(extra: list[str], eos: str = "</s>"):
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
    text = text_config(len(tok), hidden=64, layers=4, heads=4, bos_token_id=tok.bos_token_id,
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


def synthetic_event(layers: int, heads: int, prompt: str = "describe the image in detail .", image_size: int = 112,
                    seed: int = 1):
    """One causal-study event on a random LLaVA-1.5 (``layers`` x ``heads``, hidden 64): ``(lm,
    inputs, counterfactual inputs, token, position)``.  The clean image is seeded noise and the
    counterfactual greys one square region ([30:70, 30:70]); the pair is token 7 at position 9.
    Used by the study-cost benchmark and the causal-engine tests (the same event in both)."""
    import numpy as np

    from dleaf_analysis.models.inputs import PromptBuilder
    from dleaf_analysis.models.loading import LoadedModel

    model, processor = tiny_llava15(layers=layers, hidden=64, heads=heads, seed=seed, image_size=image_size)
    lm = LoadedModel.wrap(model.eval(), processor)
    img = np.random.default_rng(0).integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)
    cf = img.copy()
    cf[30:70, 30:70] = 128
    b = PromptBuilder(processor)
    return lm, dict(b.inputs([img], [prompt], image_size)), dict(b.inputs([cf], [prompt], image_size)), 7, 9
