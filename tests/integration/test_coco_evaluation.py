"""Real-checkpoint path on COCO: a tiny LLaVA-1.5-shaped model directory answers POPE questions and
captions images from a (synthetic) COCO folder; shards merge to the unsharded result; runs resume;
missing images and malformed files are reported."""

import json

import numpy as np
import pytest
from PIL import Image

from dleaf_analysis.evaluation.coco_chair import CocoDataError
from dleaf_analysis.evaluation.coco_runs import (
    coco_image_path, load_pope_questions, merge_runs, parse_shard, run_captions, run_pope, score_captions, score_pope,
)
from dleaf_analysis.models import load_model
from dleaf_analysis.models.tiny import tiny_llava15


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_model(tiny_llava15(tmp_path_factory.mktemp("m") / "llava-1.5-tiny"))


@pytest.fixture(scope="module")
def questions():
    return load_pope_questions("adversarial").head(12)


@pytest.fixture(scope="module")
def coco(tmp_path_factory, questions):
    d = tmp_path_factory.mktemp("coco")
    rng = np.random.default_rng(0)
    for name in questions["image"].unique():
        h, w = rng.integers(200, 500, size=2)  # COCO images come in any size: the processor resizes
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(d / name)
    return d


def test_pope_versions():
    assert len(load_pope_questions("random")) == 3000
    assert len(load_pope_questions("random", "opera")) == 2910  # the snapshot OPERA's numbers refer to
    with pytest.raises(ValueError, match="choose one of"):
        load_pope_questions("random", "v2")


def test_shards_merge_to_the_unsharded_run(tmp_path, lm, questions, coco):
    full = run_pope(lm, questions, coco, tmp_path / "full", batch_size=1, progress=False)
    parts = [tmp_path / f"s{i}" for i in range(3)]
    for i, p in enumerate(parts):
        run_pope(lm, questions, coco, p, shard=(i, 3), batch_size=1, progress=False)
    merged = merge_runs(parts)
    key = ["question_id", "answer", "prediction"]
    assert merged.sort_values("question_id")[key].reset_index(drop=True).equals(
        full.sort_values("question_id")[key].reset_index(drop=True))
    a, b = score_pope(full), score_pope(merged)
    assert a["value"].tolist() == b["value"].tolist()
    with pytest.raises(ValueError, match="incomplete"):
        merge_runs(parts[:2])


def test_resume_and_missing_images(tmp_path, lm, questions, coco):
    out = tmp_path / "r"
    run_pope(lm, questions, coco, out, batch_size=4, progress=False)
    before = (out / "results.jsonl").read_text()
    run_pope(lm, questions, coco, out, batch_size=4, progress=False)  # nothing redone
    assert (out / "results.jsonl").read_text() == before
    gone = coco_image_path(coco, questions["image"].iloc[0])
    data = gone.read_bytes()
    gone.unlink()
    try:
        rows = run_pope(lm, questions, coco, tmp_path / "m", batch_size=4, progress=False)
    finally:
        gone.write_bytes(data)
    n_missing = int((questions["image"] == questions["image"].iloc[0]).sum())
    assert score_pope(rows).attrs["skipped_missing_images"] == n_missing


def test_resume_after_a_crash_with_another_batch_size(tmp_path, lm, questions, coco, monkeypatch):
    """A run that dies after its first batch and is resumed with a smaller batch (what one does
    after running out of GPU memory) answers every question exactly once, keeps the finished
    answers as written, and gives the answers of an uninterrupted run."""
    import dleaf_analysis.evaluation.coco_runs as cr

    ref = run_pope(lm, questions, coco, tmp_path / "ref", batch_size=1, progress=False)
    real, calls = cr.generate, []

    def dies_on_second_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("CUDA out of memory (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(cr, "generate", dies_on_second_batch)
    out = tmp_path / "r"
    with pytest.raises(MemoryError):
        run_pope(lm, questions, coco, out, batch_size=5, progress=False)
    first = (out / "results.jsonl").read_text()
    assert len(first.splitlines()) == 5
    monkeypatch.setattr(cr, "generate", real)
    rows = run_pope(lm, questions, coco, out, batch_size=3, progress=False)
    assert (out / "results.jsonl").read_text().startswith(first)
    assert len(rows) == len(questions) and rows["question_id"].is_unique
    assert rows["question_id"].tolist() == questions["question_id"].tolist()
    assert rows["answer"].tolist() == ref["answer"].tolist()


def test_resume_with_other_inputs_is_refused(tmp_path, lm, questions, coco):
    """Another POPE variant, another question set or another image-id list in the same directory
    is refused, naming the field that differs and both values."""
    from dleaf_analysis.sweeps import SweepMismatchError

    out = tmp_path / "p"
    run_pope(lm, questions.head(4), coco, out, batch_size=4, progress=False)
    other = load_pope_questions("random").head(4)
    with pytest.raises(SweepMismatchError, match=r"questions: this run has .*random.*the directory has .*adversarial"):
        run_pope(lm, other, coco, out, batch_size=4, progress=False)
    edited = questions.head(4).copy()
    edited.attrs = questions.attrs
    edited.loc[0, "text"] = "Is there a zebra in the image?"
    with pytest.raises(SweepMismatchError, match="questions_hash"):
        run_pope(lm, edited, coco, out, batch_size=4, progress=False)
    with pytest.raises(SweepMismatchError, match="parser"):
        run_pope(lm, questions.head(4), coco, out, parser="first-token", batch_size=4, progress=False)
    ids = sorted({int(n.split("_")[-1].split(".")[0]) for n in questions["image"]})
    run_captions(lm, ids[:2], coco, tmp_path / "c", max_new_tokens=3, progress=False)
    with pytest.raises(SweepMismatchError, match="image_ids_hash"):
        run_captions(lm, ids[1:3], coco, tmp_path / "c", max_new_tokens=3, progress=False)


def test_merge_refuses_an_unfinished_shard(tmp_path, lm, questions, coco):
    parts = [tmp_path / f"s{i}" for i in range(2)]
    run_pope(lm, questions, coco, parts[0], shard=(0, 2), batch_size=6, progress=False)
    run_pope(lm, questions.head(12), coco, parts[1], shard=(1, 2), batch_size=6, progress=False)
    lines = (parts[1] / "results.jsonl").read_text().splitlines(keepends=True)
    (parts[1] / "results.jsonl").write_text("".join(lines[:-2]))  # as if it crashed two items before the end
    with pytest.raises(ValueError, match=r"shard 1/2 .* has 4 of its 6 items; resume it"):
        merge_runs(parts)


def test_captions_and_chair(tmp_path, lm, questions, coco):
    ids = sorted({int(n.split("_")[-1].split(".")[0]) for n in questions["image"]}) + [999999999]
    rows = run_captions(lm, ids, coco, tmp_path / "c", max_new_tokens=6, batch_size=2, progress=False)
    s, d = score_captions(rows)
    assert s.attrs["skipped_missing_images"] == 1 and len(d) == len(ids) - 1
    assert set(s["metric"]) == {"CHAIR_s", "CHAIR_i", "recall", "length"}


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

    r = CliRunner().invoke(app, ["pope-coco", "--coco-images", str(coco), "--model", str(lm.path), "--limit", "4",
                                 "--out", str(tmp_path / "p"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["skipped_missing_images"] == 0
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
        assert json.loads(r.stdout)["protocol"]["weights_hash"] == lm.weights_hash
    r = run("evaluate", "--model", str(lm.path), "--method", "dleaf", "--split", "dev", "--limit", "2", "--json")
    assert r.exit_code == 0, r.output
    r = run("trace", "--model", str(lm.path), "--split", "dev", "--max-new-tokens", "4", "--out", str(tmp_path / "c"))
    assert r.exit_code == 0, r.output
    r = run("diagnose", "--cache", str(tmp_path / "c"), "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)
