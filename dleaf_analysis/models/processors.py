"""Processors of the supported classes that load from a local directory with this project's
pins (no torchvision, no hub), and the prompt format of checkpoints without a chat template.

- **Qwen2-VL**: transformers' ``Qwen2VLProcessor`` also requires a video processor, and every
  video processor needs torchvision, which the constraints keep out (it would pull a CUDA
  build of torch).  :class:`Qwen2VLImageProcessor` is the same processor without video: its
  images, chat template and image-token expansion are ``Qwen2VLProcessor``'s own; passing
  ``videos`` is refused with a message.
- **InstructBLIP**: released checkpoints ship no chat template; :data:`PLAIN_FORMATS` names the
  prompt they were trained with (the instruction as is; the processor prepends the query
  tokens), used by :class:`~dleaf_analysis.models.inputs.PromptBuilder` when a processor has
  no template.
"""

from __future__ import annotations

from pathlib import Path

from transformers import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

from dleaf_analysis.errors import DleafError

# model_type -> prompt format (``{prompt}``: the user's text) for checkpoints without a chat template
PLAIN_FORMATS: dict[str, str] = {"instructblip": "{prompt}"}


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
            import json

            template = f.read_text() if name.endswith(".jinja") else json.loads(f.read_text())["chat_template"]
            break
    return Qwen2VLImageProcessor(image_processor=ip, tokenizer=tok, chat_template=template or tok.chat_template)
