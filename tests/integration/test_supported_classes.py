"""Supported means loadable: a tiny random model of every supported class, saved to a directory in
the layout its released checkpoints use, loads through ``load_model`` and runs ``dleaf trace`` (both
capture backends, which must agree) and ``dleaf evaluate --method dleaf``.

Qwen2-VL loads without torchvision (an image-only processor; videos are refused), InstructBLIP
without a chat template (its plain prompt format), LLaVA-NeXT with anyres image-token counts."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dleaf_analysis.cache import AttentionCache
from dleaf_analysis.cli import app
from dleaf_analysis.models import SUPPORTED_MODEL_TYPES, load_model
from dleaf_analysis.models.families import FAMILIES

SAVED_CLASSES = {k: f.tiny_dir for k, f in FAMILIES.items() if f.tiny_dir is not None}


def test_every_supported_class_has_a_saved_tiny_model():
    assert set(SAVED_CLASSES) == set(SUPPORTED_MODEL_TYPES)


@pytest.fixture(scope="module", params=sorted(SAVED_CLASSES))
def saved(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param) / f"tiny-{request.param}"
    SAVED_CLASSES[request.param](d)
    return request.param, d


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_saved_class_loads_traces_and_evaluates(saved, tmp_path):
    kind, d = saved
    lm = load_model(d)
    assert lm.model.config.model_type == kind
    assert not (d / "video_preprocessor_config.json").exists()
    caches = {}
    for backend in ("nnsight", "hooks"):
        r = _run("trace", "--model", d, "--split", "dev", "--max-new-tokens", 4, "--backend", backend,
                 "--out", tmp_path / backend, "--cache-dtype", "fp32")
        assert r.exit_code == 0, r.output
        caches[backend] = AttentionCache.load(tmp_path / backend, expect_weights_hash=lm.weights_hash)
    a, b = caches["nnsight"], caches["hooks"]
    assert a.n_steps >= 1 and a.tokens == b.tokens
    torch.testing.assert_close(a.image_attn, b.image_attn, rtol=0, atol=1e-5)
    assert a.n_image == len(a.image_positions) > 0
    assert a.image_positions == b.image_positions
    r = _run("evaluate", "--model", d, "--method", "dleaf", "--split", "dev", "--limit", 2, "--json",
             "--out", tmp_path / "eval")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["protocol"]["model"]["weights_hash"] == lm.weights_hash and res["protocol"]["config"]["method"] == "dleaf"
    assert (tmp_path / "eval" / "interventions.jsonl").is_file()


def test_qwen2_vl_loads_without_torchvision_and_refuses_videos(tmp_path):
    from dleaf_analysis.models.families.qwen2_vl import Qwen2VLImageProcessor, VideoNotSupportedError

    lm = load_model(SAVED_CLASSES["qwen2_vl"](tmp_path / "q"))
    assert isinstance(lm.processor, Qwen2VLImageProcessor)
    with pytest.raises(VideoNotSupportedError, match="images only"):
        lm.processor(text=["x"], videos=[np.zeros((2, 28, 28, 3), np.uint8)])


def test_instructblip_without_chat_template_uses_its_plain_prompt(tmp_path):
    from dleaf_analysis.models import PromptBuilder

    lm = load_model(SAVED_CLASSES["instructblip"](tmp_path / "i"))
    assert not lm.processor.chat_template
    b = PromptBuilder(lm.processor)
    assert b.chat("Describe this image.") == "Describe this image."
    x = b.inputs([np.zeros((28, 28, 3), np.uint8)], ["describe the image ."])
    n_query = lm.model.config.num_query_tokens
    assert int((x["input_ids"] == b.image_token_id).sum()) == n_query  # the processor places the query tokens
