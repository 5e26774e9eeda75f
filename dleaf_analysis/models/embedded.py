"""The embedded default model: a small LLaVA (CLIP vision tower + Llama decoder).

Everything here uses the real transformers classes: ``LlavaForConditionalGeneration``,
a word-level ``PreTrainedTokenizerFast`` and a ``LlavaProcessor`` with a
``CLIPImageProcessorPil``, saved as a standard HF model directory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from dleaf_analysis.scenes.world import World

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
PROMPT_WORDS = ["system", "user", ":", "assistant"]


def chat_template(system_prompt: str) -> str:
    """LLaVA-1.5-style template, word-level, with a system prompt first (a message of role
    ``system`` replaces the default): ``<s> system : {system} user : <image> {prompt} assistant :``."""
    text = "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}"
    return (
        "{% if messages[0]['role'] != 'system' %}system : " + system_prompt + " {% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}system : " + text +
        "{% elif message['role'] == 'user' %}user : " + text +
        "{% else %}assistant : " + text + "</s> {% endif %}"
        "{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
    )


@dataclass
class EmbeddedModelConfig:
    """Sizes of the embedded model.

    The vision tower is a CLIP whose LLaVA features are taken, as in LLaVA-1.5, from its
    penultimate hidden state (``vision_feature_layer=-2``).  With ``vision_layers=1`` that is
    the patch embedding (conv with kernel = stride = ``patch_size``, plus position embedding
    and CLIP's pre-layernorm): each image token's receptive field is exactly its own patch,
    so no token can encode the whole scene.  The last CLIP layer exists but feeds nothing,
    like LLaVA-1.5's last CLIP layer.
    """

    image_size: int = 96
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 1
    vision_heads: int = 4
    vision_feature_layer: int = -2
    text_hidden: int = 128
    text_layers: int = 8
    text_heads: int = 4
    text_intermediate: int = 256
    max_positions: int = 384

    def to_dict(self) -> dict:
        return asdict(self)


def build_tokenizer(world: World) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the world's words (one token per word or punctuation)."""
    vocab = {t: i for i, t in enumerate(dict.fromkeys(SPECIAL_TOKENS + PROMPT_WORDS + world.words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        add_bos_token=True,
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    fast.chat_template = chat_template(world.system_prompt)
    return fast


def build_processor(world: World, cfg: EmbeddedModelConfig) -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
        do_center_crop=True,
        do_resize=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(world),
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template(world.system_prompt),
    )


def build_model(tokenizer: PreTrainedTokenizerFast, cfg: EmbeddedModelConfig, seed: int = 0) -> LlavaForConditionalGeneration:
    """A randomly initialised embedded LLaVA (eager attention everywhere)."""
    import torch

    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_hidden * 2,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=cfg.vision_feature_layer,
        projector_hidden_act="gelu",
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation("eager")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model
