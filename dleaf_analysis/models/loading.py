"""Load a model directory: the embedded default or a user's llava-hf checkpoint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dleaf_analysis.paths import EMBEDDED_MODEL_DIR
from dleaf_analysis.errors import DleafError


class ModelLoadError(DleafError, RuntimeError):
    """A model directory that cannot be used; the message says what to do."""


@dataclass
class LoadedModel:
    """A model with its processor and provenance (``model_id``, ``weights_hash``)."""

    model: torch.nn.Module
    processor: object
    path: Path
    model_id: str
    weights_hash: str
    files_hash: str = ""  # config, processor, tokenizer and chat-template files (see :func:`files_hash`)

    @classmethod
    def wrap(cls, model: torch.nn.Module, processor=None, model_id: str | None = None) -> "LoadedModel":
        """Wrap an in-memory model (e.g. built from a config); ``weights_hash`` is over its state dict."""
        h = hashlib.sha256()
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().float().numpy().tobytes())
        cfg = hashlib.sha256(model.config.to_json_string().encode()).hexdigest()[:16]
        return cls(model=model.eval(), processor=processor, path=Path("."), model_id=model_id or type(model).__name__,
                   weights_hash=h.hexdigest()[:16], files_hash=cfg)

    def record(self) -> dict:
        """What identifies this model in a run's manifest: id, weights hash, a hash of its other files,
        and the dtype and device kind it runs in (both change numbers)."""
        p = next(self.model.parameters())
        return {"id": self.model_id, "weights_hash": self.weights_hash, "files_hash": self.files_hash,
                "dtype": str(p.dtype).replace("torch.", ""), "device": p.device.type}

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", None)

    def token_strs(self, ids: list[int]) -> list[str]:
        tok = self.tokenizer
        return tok.convert_ids_to_tokens(ids) if tok is not None else [str(i) for i in ids]

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @property
    def is_embedded(self) -> bool:
        """The embedded scene model (it takes exactly its training image size; others resize)."""
        return (self.path / "model_card.json").is_file()

    @property
    def input_size(self) -> int | None:
        """The image size inputs must have (the embedded model's), or ``None``: the processor resizes."""
        return self.image_size if self.is_embedded else None

    def inputs(self, images, prompts, continuation_ids: list[int] | None = None) -> dict:
        """Model inputs on the model's device (``pixel_values`` in its dtype): chat prompts with one
        image each, plus teacher-forced ``continuation_ids`` appended (one sequence only)."""
        from dleaf_analysis.models.inputs import PromptBuilder, append_ids

        inputs = dict(PromptBuilder(self.processor).inputs(images, prompts, self.input_size))
        if continuation_ids:
            inputs = append_ids(inputs, continuation_ids)
        return self.to_device(inputs)

    def to_device(self, inputs) -> dict:
        """``inputs`` on the model's device, ``pixel_values`` in its dtype."""
        p = next(self.model.parameters())
        return {k: (v.to(p.device, p.dtype) if k == "pixel_values" else v.to(p.device)) for k, v in inputs.items()}

    @property
    def pad_token_id(self) -> int | None:
        tok = self.tokenizer
        if tok is not None and tok.pad_token_id is not None:
            return tok.pad_token_id
        gc = self.model.generation_config
        return gc.pad_token_id if gc.pad_token_id is not None else gc.eos_token_id


WEIGHT_SUFFIXES = (".safetensors", ".bin")
NOT_MODEL_FILES = ("model_card.json", "MODEL_CARD.md", "loss_curve.png", "previous_model.json")


def files_hash(path: Path) -> str:
    """sha256 (16 hex) over every file of a model directory but its weights and card: config,
    generation config, processor, tokenizer and chat template (editing any of them changes results)."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).iterdir() if p.is_file() and p.suffix not in WEIGHT_SUFFIXES
                    and p.name not in NOT_MODEL_FILES and not p.name.endswith(".index.json")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def weights_hash(path: Path) -> str:
    """sha256 (16 hex) over the directory's weight files, in name order."""
    files = sorted(list(path.glob("*.safetensors")) + list(path.glob("*.bin")))
    if not files:
        raise ModelLoadError(f"no weight files (*.safetensors, *.bin) in {path}")
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


REDOWNLOAD = "the checkpoint is incomplete: re-download it (every weight file and its index)"


def check_weight_index(path: Path) -> None:
    """Refuse a sharded checkpoint whose index (``*.index.json``) lists a weight file that is absent."""
    for index in sorted(path.glob("*.index.json")):
        try:
            files = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise ModelLoadError(f"{index} is not a weight index (JSON with a weight_map); {REDOWNLOAD}") from None
        missing = sorted(f for f in files if not (path / f).is_file())
        if missing:
            raise ModelLoadError(f"{path}: {len(missing)} of the {len(files)} weight files that {index.name} lists are "
                                 f"missing (e.g. {', '.join(missing[:3])}); {REDOWNLOAD}")


def check_complete(path: Path, model: torch.nn.Module, info: dict | None) -> None:
    """Refuse a model whose weight files did not hold every tensor it expects (``transformers``
    initialises those at random and only prints a load report) or held one of the wrong shape.
    ``info`` is ``from_pretrained(..., output_loading_info=True)``'s report, whose ``missing_keys``
    already leave out the weights the class ties (e.g. ``lm_head`` to the embeddings) or initialises
    itself."""
    if not isinstance(info, dict):
        return
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(k[0] if isinstance(k, (tuple, list)) else k) for k in info.get("mismatched_keys") or ())
    if missing:
        n_all = len(model.state_dict())
        raise ModelLoadError(f"{path}: {len(missing)} of the model's {n_all} tensors are missing from its weight files "
                             f"(e.g. {', '.join(missing[:3])}); {REDOWNLOAD}")
    if mismatched:
        raise ModelLoadError(f"{path}: {len(mismatched)} tensors in its weight files do not have the shape its config.json "
                             f"gives (e.g. {', '.join(mismatched[:3])}); the weights and config.json are from different "
                             "models: re-download the checkpoint")


def load_model(
    path: str | Path | None = None,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    device_map: str | None = None,
) -> LoadedModel:
    """Load a supported vision-language model directory (default: the embedded model).

    Attention is set to eager in the language model (sdpa returns no attention weights).
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from dleaf_analysis.models.families import FAMILIES

    path = Path(path) if path is not None else EMBEDDED_MODEL_DIR
    if not path.is_dir():
        hint = (
            "the embedded model ships in data/embedded-llava; re-create it with `dleaf train-model`"
            if path == EMBEDDED_MODEL_DIR
            else "give the local directory of a downloaded checkpoint (config.json, weights, processor files)"
        )
        raise ModelLoadError(f"model directory not found: {path}; {hint}")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {e}") from None
    if config.model_type not in FAMILIES:
        raise ModelLoadError(
            f"model type {config.model_type!r} in {path} is not supported; supported: "
            f"{sorted(FAMILIES)}"
        )
    family = FAMILIES[config.model_type]
    if isinstance(dtype, str):
        dtype = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}[dtype]
    wh = weights_hash(path)
    check_weight_index(path)
    try:
        loaded = AutoModelForImageTextToText.from_pretrained(
            path, local_files_only=True, dtype=dtype, device_map=device_map, attn_implementation="eager",
            output_loading_info=True,
        )
    except Exception as e:
        if "ignore_mismatched_sizes" in str(e):  # transformers' words for tensors of the wrong shape
            raise ModelLoadError(f"{path}: tensors in its weight files do not have the shapes its config.json gives; the "
                                 "weights and config.json are from different models: re-download the checkpoint") from None
        raise ModelLoadError(f"cannot load the model in {path}: {type(e).__name__}: {e}") from None
    model, info = loaded if isinstance(loaded, tuple) else (loaded, None)
    check_complete(path, model, info)
    try:
        if family.load_processor is not None:  # e.g. Qwen2-VL: images only (its video processor needs torchvision)
            processor = family.load_processor(path)
        else:
            processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"cannot load the model in {path}: {type(e).__name__}: {e}") from None
    if device_map is None:
        model.to(device)
    model.eval()
    model_id = path.name
    card = path / "model_card.json"
    if card.is_file():
        model_id = json.loads(card.read_text()).get("model_id", model_id)
    return LoadedModel(model=model, processor=processor, path=path, model_id=model_id, weights_hash=wh,
                       files_hash=files_hash(path))
