"""The embedded model: a standard HF directory, deterministic training, template captions,
the fast training inputs equal the processor's, and clear errors for bad images."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from dleaf_analysis.models import InputError, PromptBuilder, caption
from dleaf_analysis.models.inputs import as_pil
from dleaf_analysis.paths import EMBEDDED_MODEL_DIR


def test_loads_like_any_llava_hf_checkpoint(dev_split):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(EMBEDDED_MODEL_DIR, local_files_only=True)
    proc = AutoProcessor.from_pretrained(EMBEDDED_MODEL_DIR, local_files_only=True)
    inputs = proc(images=[dev_split.image(0)], text=["user : <image> describe the image . assistant :"], return_tensors="pt")
    n_tokens = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    assert n_tokens == 144 and int((inputs["input_ids"] == model.config.image_token_id).sum()) == n_tokens
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_captions_are_finished_descriptions_in_the_world_s_words(embedded, dev_split, world):
    """Greedy captions of the shipped model are what the scene world's descriptions are: an opening,
    object sentences, ended within the caption budget, no degenerate output."""
    from dleaf_analysis.evaluation.validity import degenerate

    caps = caption(embedded, [dev_split.image(i) for i in range(12)], progress=False)
    vocab = set(world.words)
    assert all(set(c.split()) <= vocab for c in caps), caps
    from dleaf_analysis.sources import SceneSource

    n_mentions = [len(SceneSource.load("dev", limit=12).mentions(c)) for c in caps]
    assert all(degenerate(c, n) is None for c, n in zip(caps, n_mentions)), caps
    assert sum(c.startswith("the image shows") for c in caps) >= 11, caps
    assert sum(c.endswith(" .") and len(c.split()) >= 30 for c in caps) >= 10, caps  # long and finished


def test_fast_training_inputs_equal_processor(embedded, dev_split):
    b = PromptBuilder(embedded.processor)
    imgs = torch.from_numpy(dev_split.images()[:3])
    proc = b.inputs([dev_split.image(i) for i in range(3)], ["describe the image ."] * 3)
    fast = b.training_batch(imgs, ["describe the image ."] * 3, ["a photo of a cup ."] * 3)
    T = proc["input_ids"].shape[1]
    assert torch.equal(fast["input_ids"][:, :T], proc["input_ids"])
    torch.testing.assert_close(fast["pixel_values"], proc["pixel_values"], rtol=0, atol=1e-6)
    assert (fast["labels"][:, :T] == -100).all() and (fast["labels"][:, T:] != -100).any()


def test_training_is_deterministic():
    from dleaf_analysis.models.training import TrainConfig, train_embedded

    cfg = TrainConfig(vision_steps=3, text_steps=2, align_steps=2, full_steps=3, question_steps=2, batch_size=4,
                      train_size=32)
    runs = [train_embedded(cfg, progress=False, log=lambda s: None) for _ in range(2)]
    (m1, _, h1), (m2, _, h2) = runs
    assert h1["vision_loss"] == h2["vision_loss"] and h1["loss"] == h2["loss"] and h1["text_loss"] == h2["text_loss"]
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    # the vision tower is frozen after stage 1: later stages leave it as stage 1 left it
    from dataclasses import replace

    vision_only = replace(cfg, text_steps=0, align_steps=0, full_steps=0, question_steps=0)
    m0, _, _ = train_embedded(vision_only, progress=False, log=lambda s: None)
    for (k, a), (_, b) in zip(m0.model.vision_tower.state_dict().items(), m1.model.vision_tower.state_dict().items()):
        assert torch.equal(a, b), k
    assert not torch.equal(m0.model.multi_modal_projector.linear_1.weight, m1.model.multi_modal_projector.linear_1.weight)
    cfg.seed = 1
    _, _, h3 = train_embedded(cfg, progress=False, log=lambda s: None)
    assert h3["loss"] != h1["loss"]


def test_a_killed_training_run_resumes_to_the_same_weights(tmp_path):
    """Killed mid-stage (after a checkpoint and one more step) and started again with the same
    configuration, training ends with the weights of an uninterrupted run, bit for bit; a
    checkpoint of another configuration is refused."""
    from dataclasses import replace

    from dleaf_analysis.models.training import Trainer, TrainConfig

    cfg = TrainConfig(vision_steps=3, text_steps=3, align_steps=2, full_steps=4, question_steps=2, batch_size=4,
                      train_size=32, checkpoint_every=2, threads=1)
    quiet = dict(progress=False, log=lambda s: None)
    ref, _, h_ref = Trainer(cfg, None, **quiet).run()
    ck = tmp_path / "checkpoints"
    assert Trainer(cfg, ck, **quiet).run(stop_after=11) is None  # in stage 4, one step past its step-2 checkpoint
    assert (ck / "checkpoint.pt").is_file()
    model, _, h = Trainer(cfg, ck, **quiet).run()
    assert h["loss"] == h_ref["loss"] and h["question_loss"] == h_ref["question_loss"]
    for (k, a), (_, b) in zip(ref.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(Exception, match="config"):
        Trainer(replace(cfg, full_steps=5), ck, **quiet).run()


def test_image_checks():
    good = np.zeros((64, 64, 3), np.uint8)
    assert as_pil(good, 64).size == (64, 64)
    assert as_pil(Image.new("L", (64, 64)), 64).mode == "RGB"  # grayscale is converted
    with pytest.raises(InputError, match="64x64"):
        as_pil(np.zeros((32, 32, 3), np.uint8), 64)
    with pytest.raises(InputError, match="uint8"):
        as_pil(np.zeros((64, 64, 3), np.float32), 64)
    with pytest.raises(InputError, match="uint8"):
        as_pil(np.zeros((64, 64), np.uint8), 64)
    with pytest.raises(InputError, match="mode"):
        as_pil(Image.new("F", (64, 64)), 64)
    with pytest.raises(InputError, match="not found"):
        as_pil("/nonexistent.png")


def test_generation_rejects_wrong_size_image(embedded):
    with pytest.raises(InputError, match="resize"):
        caption(embedded, [np.zeros((80, 80, 3), np.uint8)], progress=False)


def test_batched_generation_equals_one_by_one(embedded, dev_split):
    imgs = [dev_split.image(i) for i in range(5)]
    batched = caption(embedded, imgs, batch_size=5, progress=False)
    single = [caption(embedded, [im], progress=False)[0] for im in imgs]
    assert batched == single


def test_patch_appearance_is_each_patch_own_colour_statistics():
    """The appearance target of the vision pretraining, against a hand computation on one patch."""
    from dleaf_analysis.models.training import patch_appearance

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    out = patch_appearance(torch.from_numpy(img), patch_size=8)  # [2, 4, 6]
    assert out.shape == (2, 4, 6)
    patch = img[1, 8:16, 0:8].reshape(-1, 3) / 255.0  # row 1, column 0 -> patch index 2
    want = np.concatenate([patch.mean(0), patch.std(0, ddof=1)])
    np.testing.assert_allclose(out[1, 2].numpy() * 0.2 + 0.3, want, rtol=1e-5, atol=1e-6)


def test_text_format_option_of_the_language_stage():
    """``text_format="chat"`` puts each stage-2 description after the chat prompt without its image
    (BOS, system prompt, user turn), as later stages see it; the default keeps the recipe of the
    shipped weights and its configuration hash; an unknown format is refused."""
    import json

    from dleaf_analysis.models.training import Trainer, TrainConfig, TrainingError
    from dleaf_analysis.paths import EMBEDDED_MODEL_DIR

    shipped = json.loads((EMBEDDED_MODEL_DIR / "model_card.json").read_text())["config"]
    assert TrainConfig.from_dict(shipped).text_format == "plain"
    assert TrainConfig.from_dict(shipped).to_dict() == shipped  # the new field leaves old configurations as they were
    quiet = dict(progress=False, log=lambda s: None)
    plain = Trainer(TrainConfig(train_size=8), None, **quiet)
    chat = Trainer(TrainConfig(train_size=8, text_format="chat"), None, **quiet)
    text = " ".join(chat.world.words[:3])  # three words of the world's vocabulary
    assert plain.text_sample(text) == text + " </s>"
    ids = chat.tok(chat.text_sample(text))["input_ids"]
    words = chat.tok.convert_ids_to_tokens(ids)
    system = chat.world.system_prompt.split()
    assert words[:3 + len(system)] == ["<s>", "system", ":"] + system
    assert words[-6:] == ["assistant", ":", *text.split(), "</s>"] and "<unk>" not in words
    assert "<image>" not in words and chat.world.caption_prompt.split()[0] in words
    assert TrainConfig(text_format="chat").hash != TrainConfig().hash
    with pytest.raises(TrainingError, match="text_format"):
        TrainConfig(text_format="poems")
