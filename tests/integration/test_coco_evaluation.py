"""Real-checkpoint path on COCO: a tiny LLaVA-1.5-shaped model directory answers POPE's own
questions and captions images from a (synthetic) COCO folder through the one ``evaluate``; shards
merge to the unsharded result; runs resume; missing images and malformed files are reported."""

import json

import numpy as np
import pytest
from PIL import Image

from dleaf_analysis.evaluation import runner
from dleaf_analysis.evaluation.runner import ProtocolMismatchError, evaluate, merge_evaluations
from dleaf_analysis.models import load_model
from dleaf_analysis.models.tiny import tiny_llava15
from dleaf_analysis.sources import CocoSource, parse_shard
from dleaf_analysis.sources.base import SourceError
from dleaf_analysis.sources.coco import load_pope_questions
from dleaf_analysis.sources.coco_chair import CocoDataError

VARIANT = ("adversarial",)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_model(tiny_llava15(tmp_path_factory.mktemp("m") / "llava-1.5-tiny"))


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """A COCO folder holding the images of the first 12 adversarial POPE questions (2 images)."""
    d = tmp_path_factory.mktemp("coco")
    rng = np.random.default_rng(0)
    for name in load_pope_questions("adversarial").head(12)["image"].unique():
        h, w = rng.integers(200, 500, size=2)  # COCO images come in any size: the processor resizes
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(d / name)
    return d


def pope(lm, coco, out=None, shard=None, batch_size=4, **kw):
    src = CocoSource.from_pope(coco, "adversarial")
    if shard:
        src = src.shard(*shard)
    return evaluate("pope", src, lm, pope_variants=VARIANT, batch_size=batch_size, out_dir=out, progress=False,
                    n_resamples=50, **kw)


def test_pope_versions():
    assert len(load_pope_questions("random")) == 3000
    assert len(load_pope_questions("random", "opera")) == 2910  # the snapshot OPERA's numbers refer to
    with pytest.raises(ValueError, match="choose one of"):
        load_pope_questions("random", "v2")


def test_pope_asks_the_files_questions_on_the_images_present(lm, coco):
    res = pope(lm, coco)
    q = load_pope_questions("adversarial")
    present = {p.name for p in coco.iterdir()}
    expected = q[q["image"].isin(present)]
    assert len(res.details) == len(expected) >= 12
    assert res.details["question"].tolist() == expected["text"].tolist()
    assert res.manifest["source"]["skipped_missing_images"] == q["image"].nunique() - len(present)


def test_shards_merge_to_the_unsharded_run(tmp_path, lm, coco):
    full = pope(lm, coco, tmp_path / "full", batch_size=1)
    parts = [tmp_path / f"s{i}" for i in range(2)]
    for i, p in enumerate(parts):
        pope(lm, coco, p, shard=(i, 2), batch_size=1)
    merged = merge_evaluations(parts)
    key = ["key", "label", "prediction"]
    a = merged.details.sort_values("key")[key].reset_index(drop=True)
    b = full.details.sort_values("key")[key].reset_index(drop=True)
    assert a.equals(b)
    assert merged.summary["value"].tolist() == full.summary["value"].tolist()
    with pytest.raises(Exception, match="incomplete"):
        merge_evaluations(parts[:1] + parts[:1])


def test_merge_refuses_an_unfinished_shard(tmp_path, lm, coco):
    done = tmp_path / "s0"
    pope(lm, coco, done, shard=(0, 2))
    with pytest.raises(ProtocolMismatchError, match="no finished evaluation"):
        merge_evaluations([done, tmp_path / "s1"])


def test_resume_after_a_crash_with_another_batch_size(tmp_path, lm, coco, monkeypatch):
    """A run that dies after its first batch and is resumed with a smaller batch (what one does
    after running out of GPU memory) answers every question exactly once, keeps the finished
    answers as written, and gives the answers of an uninterrupted run."""
    ref = pope(lm, coco, batch_size=1)
    real, calls = runner.generate, []

    def dies_on_second_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("CUDA out of memory (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(runner, "generate", dies_on_second_batch)
    out = tmp_path / "r"
    with pytest.raises(MemoryError):
        pope(lm, coco, out, batch_size=5)
    first = (out / ".partial" / "results.jsonl").read_text()
    assert len(first.splitlines()) == 5
    calls.clear()

    def counts(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(runner, "generate", counts)
    res = pope(lm, coco, out, batch_size=3)
    assert res.details["key"].is_unique and len(res.details) == len(ref.details)
    assert res.details["answer"].tolist() == ref.details["answer"].tolist()
    assert len(calls) == -(-(len(ref.details) - 5) // 3)  # only the unfinished questions were decoded


def test_resume_with_other_inputs_is_refused(tmp_path, lm, coco):
    """Another parser, method setting or image set in the same directory is refused, naming the
    field that differs."""
    out = tmp_path / "p"
    pope(lm, coco, out)
    with pytest.raises(ProtocolMismatchError, match="answer_parser"):
        pope(lm, coco, out, answer_parser="first-token")
    with pytest.raises(ProtocolMismatchError, match="shard"):
        pope(lm, coco, out, shard=(0, 2))


def test_captions_and_chair_on_coco_without_annotations(tmp_path, lm, coco):
    """caption-coco's path: image ids only (no instance file): the captions are written and scored
    against the shipped CHAIR ground truth."""
    ids = sorted(CocoSource.from_pope(coco, "adversarial")._items)
    src = CocoSource(coco, image_ids=ids)
    res = evaluate("chair", src, lm, max_new_tokens=6, batch_size=2, progress=False, n_resamples=50,
                   out_dir=tmp_path / "c")
    assert len(res.details) == len(ids)
    assert {"CHAIR_s", "CHAIR_i", "recall"} <= set(res.summary["metric"])
    with pytest.raises(SourceError, match="not in"):
        CocoSource(coco, image_ids=ids + [999999999])
    assert len(CocoSource(coco, image_ids=ids + [999999999], skip_missing=True)) == len(ids)


def test_bad_inputs(tmp_path):
    bad = tmp_path / "q.json"
    bad.write_text(json.dumps({"question_id": 1, "image": "x.jpg", "text": "Is there a dog?"}) + "\n")
    with pytest.raises(CocoDataError, match="missing"):
        load_pope_questions(path=bad)
    bad.write_text("not json\n")
    with pytest.raises(CocoDataError, match="not JSON"):
        load_pope_questions(path=bad)
    for s in ("3/2", "a/b", "1-2"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(s)
    assert parse_shard("1/4") == (1, 4)


def test_cli_pope_coco(tmp_path, lm, coco):
    from typer.testing import CliRunner

    from dleaf_analysis.cli import app

    r = CliRunner().invoke(app, ["pope-coco", "--coco-images", str(coco), "--model", str(lm.path), "--limit", "1",
                                 "--out", str(tmp_path / "p"), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["protocol"]["model"]["weights_hash"] == lm.weights_hash and out["protocol"]["n_items"] == 1
    r = CliRunner().invoke(app, ["pope-coco", "--coco-images", str(tmp_path / "nope"), "--model", str(lm.path)])
    assert r.exit_code == 2 and "not found" in r.output


def test_device_map_auto_loads(lm):
    m = load_model(lm.path, device_map="auto")  # accelerate's placement (all on CPU here)
    assert m.weights_hash == lm.weights_hash
    assert {p.device.type for p in m.model.parameters()} == {"cpu"}


def test_every_model_command_runs_on_a_llava_hf_directory(tmp_path, lm):
    """The tiny LLaVA-1.5-shaped directory through evaluate, trace and diagnose (any image size)."""
    from typer.testing import CliRunner

    from dleaf_analysis.cli import app

    run = lambda *a: CliRunner().invoke(app, list(a), catch_exceptions=False)  # noqa: E731
    for bench in ("chair", "pope"):
        r = run("evaluate", "--model", str(lm.path), "--benchmark", bench, "--split", "dev", "--limit", "2", "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["protocol"]["model"]["weights_hash"] == lm.weights_hash
    r = run("evaluate", "--model", str(lm.path), "--method", "dleaf", "--split", "dev", "--limit", "2", "--json")
    assert r.exit_code == 0, r.output
    r = run("trace", "--model", str(lm.path), "--split", "dev", "--max-new-tokens", "4", "--out", str(tmp_path / "c"))
    assert r.exit_code == 0, r.output
    r = run("diagnose", "--cache", str(tmp_path / "c"), "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)
