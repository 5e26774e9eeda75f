"""InstructBLIP (``InstructBlipForConditionalGeneration``): a Q-Former's query tokens stand for the
image in a Llama decoder.  Released checkpoints ship no chat template: the plain prompt format is
the instruction as is (the processor prepends the query tokens)."""

from __future__ import annotations

from pathlib import Path

import torch

from dleaf_analysis.models.families import Family, register
from dleaf_analysis.models.tiny import text_config, word_tokenizer


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
                             text_config=text_config(80).to_dict(), num_query_tokens=4, image_token_index=79)
    cfg.text_config.model_type = "llama"
    cfg.architectures = ["InstructBlipForConditionalGeneration"]
    model = InstructBlipForConditionalGeneration(cfg).eval()
    ids = torch.tensor([[1] + [79] * 4 + [5, 6, 7, 8]])
    qf = torch.tensor([[1, 2, 3]])
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(1, 3, 28, 28),
                   "qformer_input_ids": qf, "qformer_attention_mask": torch.ones_like(qf)}


def tiny_instructblip_dir(out_dir: str | Path, seed: int = 0) -> Path:
    """A random ``InstructBlipForConditionalGeneration`` (Q-Former, Llama decoder, 4 query tokens)
    saved as a released InstructBLIP directory is: processor with a Q-Former tokenizer and **no
    chat template**."""
    from transformers import (InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipProcessor,
                              InstructBlipQFormerConfig, InstructBlipVisionConfig)
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tok = word_tokenizer(["<image>"])
    qtok = word_tokenizer([])
    torch.manual_seed(seed)
    vision = InstructBlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      image_size=28, patch_size=14)
    qformer = InstructBlipQFormerConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64, encoder_hidden_size=32, vocab_size=len(qtok))
    text = text_config(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
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


FAMILY = register(Family(
    model_type="instructblip", hf_class="InstructBlipForConditionalGeneration",
    decoder=("language_model.model", "language_model"), plain_prompt="{prompt}",
    tiny_model=tiny_instructblip, tiny_dir=tiny_instructblip_dir,
))
