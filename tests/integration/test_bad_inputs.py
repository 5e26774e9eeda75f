"""Never silently wrong: every input is checked before any compute and before anything is written,
and one process writes to an output directory at a time.

Each table below is one class of input (a model directory, a COCO folder with its instances file,
an annotated JSONL file, a captions file, a result store) with its neighbours: a bad case is refused
through its command (exit code 2, one line ``error: ...`` naming what to fix, nothing in ``--out``)
or, where no command reaches it, through the Python API; the good case next to it passes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dleaf_analysis.cli import app
from dleaf_analysis.models.loading import ModelLoadError, load_model
from dleaf_analysis.paths import EXAMPLES_DIR
from dleaf_analysis.sources import CocoSource, JsonlSource, SourceError
from dleaf_analysis.sweeps import ResultStore, SweepMismatchError

FAKE = EXAMPLES_DIR / "fake_coco"
IMAGE_1 = "COCO_val2014_000900000001.jpg"
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def written(out: Path) -> list[str]:
    """Every file under ``out`` (none if it does not exist)."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []


def assert_refused(r, fragment: str, out: Path | None = None) -> str:
    """Exit code 2, exactly one line ``error: ...`` holding ``fragment``, and nothing in ``out``."""
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.output
    assert fragment in errors[0], r.output
    if out is not None:
        assert written(out) == [], written(out)
    return errors[0]


# -- model directories --------------------------------------------------------------------------------


def _drop_half_the_tensors(d: Path) -> None:
    from safetensors.torch import load_file, save_file

    f = d / "model.safetensors"
    sd = load_file(f)
    keep = sorted(sd)[::2]
    save_file({k: sd[k] for k in keep}, f, metadata={"format": "pt"})


def _shard_and_lose_one(d: Path) -> None:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(d, local_files_only=True)
    (d / "model.safetensors").unlink()
    model.save_pretrained(d, max_shard_size="100KB")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()


def _edit_config(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] *= 2
    (d / "config.json").write_text(json.dumps(cfg))


MODEL_CASES = {
    "half the tensors deleted": (_drop_half_the_tensors, "tensors are missing from its weight files"),
    "a shard of the index missing": (_shard_and_lose_one, "weight files that model.safetensors.index.json lists are "
                                                          "missing"),
    "no weight files": (lambda d: (d / "model.safetensors").unlink(), "no weight files"),
    "no config.json": (lambda d: (d / "config.json").unlink(), "has no config.json"),
    "config of another size": (_edit_config, "do not have the shapes its config.json gives"),
}


@pytest.fixture(scope="module")
def good_jsonl(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("jsonl")
    shutil.copy(FAKE / "val2014" / IMAGE_1, d / "a.jpg")
    mask = np.zeros((90, 128), np.uint8)
    mask[30:60, 50:80] = 255
    Image.fromarray(mask).save(d / "a-dog.png")
    f = d / "images.jsonl"
    f.write_text(json.dumps({"image": "a.jpg", "id": "a", "objects": [
        "person", {"name": "dog", "mask": "a-dog.png"}, {"name": "frisbee", "box": [85, 10, 25, 20]}]}) + "\n")
    return f


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_a_broken_model_directory_is_refused_before_anything_is_written(case, subword_dir, good_jsonl, tmp_path):
    edit, fragment = MODEL_CASES[case]
    d = tmp_path / "model"
    shutil.copytree(subword_dir, d)
    edit(d)
    out = tmp_path / "out"
    line = assert_refused(run("evaluate", "--model", d, "--images-jsonl", good_jsonl, "--out", out, "--limit", 1),
                          fragment, out)
    assert str(d) in line
    if case == "half the tensors deleted":
        from safetensors.torch import load_file

        n_all, n_left = len(load_file(subword_dir / "model.safetensors")), len(load_file(d / "model.safetensors"))
        with pytest.raises(ModelLoadError, match=rf"{n_all - n_left} of the model's \d+ tensors are missing from its "
                                                 r"weight files \(e\.g\. model\.") as e:
            load_model(d)
        assert "the checkpoint is incomplete: re-download it" in str(e.value) and "\n" not in str(e.value)


def test_a_saved_tiny_model_with_half_its_tensors_deleted_is_refused(tmp_path):
    from dleaf_analysis.models.tiny import tiny_llava15

    d = tiny_llava15(tmp_path / "tiny")
    load_model(d)  # complete: lm_head is tied to the embeddings, not missing
    _drop_half_the_tensors(d)
    with pytest.raises(ModelLoadError, match="the checkpoint is incomplete: re-download it") as e:
        load_model(d)
    msg = str(e.value)
    assert str(d) in msg and "tensors are missing" in msg and "e.g. model." in msg


def test_complete_checkpoints_load_cleanly(embedded, subword):
    # transformers' load report of the shipped model and of the tiny sub-word model holds nothing missing
    from transformers import AutoModelForImageTextToText

    for lm in (embedded, subword):
        _, info = AutoModelForImageTextToText.from_pretrained(lm.path, local_files_only=True,
                                                              output_loading_info=True)
        assert not info["missing_keys"] and not info["mismatched_keys"], (lm.path, info)


# -- COCO folders and instances files -------------------------------------------------------------------


def make_coco(root: Path, edit_json=None, edit_images=None) -> tuple[Path, Path]:
    """A copy of the committed fake COCO under ``root`` with ``edit_json(instances)`` and
    ``edit_images(images_dir)`` applied; ``(images_dir, instances_file)``."""
    images = root / "val2014"
    shutil.copytree(FAKE / "val2014", images)
    d = json.loads((FAKE / "instances_fake2014.json").read_text())
    if edit_json is not None:
        edit_json(d)
    ann = root / "instances_fake2014.json"
    ann.write_text(json.dumps(d))
    if edit_images is not None:
        edit_images(images)
    return images, ann


def _ann(d: dict, aid: int) -> dict:
    return next(a for a in d["annotations"] if a["id"] == aid)


def _set(aid: int, **kw):
    return lambda d: _ann(d, aid).update(kw)


def _write(name: str, data: bytes):
    return lambda images: (images / name).write_bytes(data)


def _resize(name: str):
    return lambda images: Image.open(FAKE / "val2014" / name).resize((64, 64)).save(images / name)


COCO_CASES = {  # edit of the instances file, edit of the images, what the error says
    "image is not an image": (None, _write(IMAGE_1, b"not a jpeg at all"), f"{IMAGE_1} is not a readable image"),
    "image is empty": (None, _write(IMAGE_1, b""), f"{IMAGE_1} is not a readable image"),
    "image of another size": (None, _resize(IMAGE_1), "is 64x64 px but instances_fake2014.json says 128x90"),
    "image missing": (None, lambda images: (images / IMAGE_1).unlink(), "1 of 6 images are not in"),
    "bbox outside the image": (_set(1, bbox=[200.0, 10.0, 30.0, 50.0]), None, "annotation 1: bbox [200.0"),
    "bbox of width 0": (_set(8, bbox=[90.0, 60.0, 0.0, 25.0]), None, "annotation 8: bbox [90.0, 60.0, 0.0, 25.0] is empty"),
    "bbox of 3 numbers": (_set(8, bbox=[90.0, 60.0, 30.0]), None, "bbox must be [x, y, width, height]"),
    "polygon outside the image": (_set(2, segmentation=[[300.0, 30.0, 330.0, 30.0, 330.0, 60.0]]), None,
                                  "annotation 2: its polygon lies outside its 128x90 image"),
    "polygon of odd length": (_set(2, segmentation=[[50.0, 30.0, 80.0, 30.0, 80.0]]), None,
                              "annotation 2: a polygon is a list of coordinates"),
    "segmentation not a list": (_set(2, segmentation="dog"), None, "segmentation must be a list of polygons or an RLE"),
    "RLE of another size": (_set(2, segmentation={"counts": [0, 10], "size": [10, 10]}), None,
                            "an RLE segmentation needs counts and size [90, 128]"),
    "neither bbox nor segmentation": (_set(8, bbox=None, segmentation=[]), None, "has neither a segmentation nor a bbox"),
    "annotation of an unknown image": (_set(3, image_id=42), None, "refers to image 42"),
    "annotation of an unknown category": (_set(3, category_id=4242), None, "has category 4242"),
    "no annotations list": (lambda d: d.pop("annotations"), None, "has no 'annotations' list"),
}


@pytest.mark.parametrize("case", sorted(COCO_CASES))
def test_a_bad_coco_folder_is_refused_before_anything_is_written(case, subword_dir, tmp_path):
    edit_json, edit_images, fragment = COCO_CASES[case]
    images, ann = make_coco(tmp_path, edit_json, edit_images)
    out = tmp_path / "out"
    assert_refused(run("study", "ablation", "--model", subword_dir, "--coco-images", images, "--coco-annotations", ann,
                       "--limit", 2, "--out", out), fragment, out)


def test_image_ids_of_another_annotation_file_are_refused(subword_dir, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("900000001 1 2\n")
    out = tmp_path / "out"
    assert_refused(run("study", "ablation", "--model", subword_dir, "--coco-images", FAKE / "val2014",
                       "--coco-annotations", FAKE / "instances_fake2014.json", "--image-ids", ids, "--limit", 2,
                       "--out", out), "2 image ids are not in instances_fake2014.json", out)


def test_the_committed_fake_coco_passes_and_every_mask_is_non_empty(fake_coco):
    assert len(fake_coco) == 6 and fake_coco.missing == []
    for i in range(len(fake_coco)):
        for obj in fake_coco.removable(i):
            assert fake_coco.mask(i, obj).any()


EMPTY_MASK_CASES = {  # inside the image, valid in form, and covering no pixel centre
    "a sub-pixel box": (8, {"bbox": [90.2, 60.2, 0.2, 0.2]}, 1, "bench", "the box of 'bench' (annotation 8)"),
    "a sub-pixel polygon": (2, {"segmentation": [[50.0, 30.0, 50.1, 30.0, 50.1, 30.1]]}, 0, "dog",
                            "the polygon of 'dog' (annotation 2)"),
    "a polygon of two points": (2, {"segmentation": [[50.0, 30.0, 80.0, 30.0]]}, 0, "dog",
                                "the polygon of 'dog' (annotation 2)"),
}


@pytest.mark.parametrize("case", sorted(EMPTY_MASK_CASES))
def test_an_annotation_with_an_empty_mask_is_refused(case, tmp_path):
    aid, change, item, obj, fragment = EMPTY_MASK_CASES[case]
    images, ann = make_coco(tmp_path, _set(aid, **change))
    src = CocoSource(images, ann, image_ids=FAKE / "image_ids.txt")  # valid in form: accepted
    for f in (src.mask, src.counterfactual):
        with pytest.raises(SourceError, match="covers no pixel; a counterfactual would remove nothing") as e:
            f(item, obj)
        assert fragment in str(e.value) and str(ann) in str(e.value)


def _pope_file(path: Path, ids: list[int]) -> Path:
    path.write_text("".join(json.dumps({"question_id": k, "image": f"COCO_val2014_{i:012d}.jpg",
                                        "text": "Is there a dog in the image?", "label": "yes"}) + "\n"
                            for k, i in enumerate(ids)))
    return path


def test_pope_images_skip_missing_files_but_refuse_unreadable_ones(tmp_path):
    images, _ = make_coco(tmp_path, edit_images=lambda d: (d / IMAGE_1).unlink())
    q = _pope_file(tmp_path / "q.jsonl", [900000001, 900000002, 900000003])
    src = CocoSource.from_pope(images, questions=q)
    assert src.missing == [900000001] and src.items() == [900000002, 900000003]
    (images / "COCO_val2014_000900000002.jpg").write_bytes(b"\x89PNG broken")
    with pytest.raises(SourceError, match="COCO_val2014_000900000002.jpg is not a readable image"):
        CocoSource.from_pope(images, questions=q)


# -- annotated JSONL files ----------------------------------------------------------------------------------


def _jsonl_folder(d: Path) -> None:
    shutil.copy(FAKE / "val2014" / IMAGE_1, d / "a.jpg")
    shutil.copy(FAKE / "val2014" / "COCO_val2014_000900000002.jpg", d / "b.jpg")
    mask = np.zeros((90, 128), np.uint8)
    mask[30:60, 50:80] = 255
    Image.fromarray(mask).save(d / "dog.png")
    Image.fromarray(np.zeros((90, 128), np.uint8)).save(d / "zero.png")
    Image.fromarray(np.full((40, 40), 255, np.uint8)).save(d / "small.png")
    (d / "text.jpg").write_text("this is not an image")
    (d / "text.png").write_text("neither is this")


GOOD_LINE = {"image": "a.jpg", "id": "a", "objects": ["person", {"name": "dog", "mask": "dog.png"},
                                                      {"name": "frisbee", "box": [85, 10, 25, 20]}]}


def _obj(**o) -> dict:
    return {"image": "b.jpg", "id": "b", "objects": ["cat", {"name": "dog", **o}]}


JSONL_CASES = {  # the second line of the file, what the error says
    "a 'boxes' typo": (_obj(boxes=[1, 2, 3, 4]), "item 'b', object 'dog': unknown key 'boxes' (valid keys of an object: "
                                                 "name, box, mask)"),
    "an unknown key in the record": ({**_obj(box=[1, 2, 3, 4]), "caption": "x"},
                                     "unknown key 'caption' (valid keys of a line: image, objects, id)"),
    "a box of 3 numbers": (_obj(box=[1, 2, 3]), "a box is 4 numbers [x, y, width, height]"),
    "a box of strings": (_obj(box=["1", "2", "3", "4"]), "a box is 4 numbers"),
    "a box of width 0": (_obj(box=[10, 10, 0, 5]), "has width 0 and height 5; both must be > 0"),
    "a box of negative height": (_obj(box=[10, 10, 5, -5]), "both must be > 0"),
    "a box outside the image": (_obj(box=[200, 10, 20, 20]), "box [200, 10, 20, 20] covers no pixel of its 128x90 image"),
    "a box left of the image": (_obj(box=[-30, 10, 20, 20]), "covers no pixel"),
    "a box and a mask": (_obj(box=[1, 2, 3, 4], mask="dog.png"), "give a box or a mask, not both"),
    "a mask that is missing": (_obj(mask="nope.png"), "mask not found"),
    "a mask of another size": (_obj(mask="small.png"), "mask small.png is 40x40 px but its image is 128x90"),
    "a mask all zero": (_obj(mask="zero.png"), "mask zero.png is empty (all zero)"),
    "a mask that is not an image": (_obj(mask="text.png"), "text.png is not a readable image"),
    "an image that is not an image": ({"image": "text.jpg", "objects": ["dog"]}, "text.jpg is not a readable image"),
    "an image that is missing": ({"image": "c.jpg", "objects": ["dog"]}, "item 'c.jpg': image not found"),
    "an object without a name": ({"image": "b.jpg", "objects": [{"box": [1, 2, 3, 4]}]}, "an object is a name or"),
    "an empty object name": ({"image": "b.jpg", "objects": ["  "]}, "an object has an empty name"),
    "no objects list": ({"image": "b.jpg"}, 'each line needs "image" (a path) and "objects" (a list)'),
    "an id twice": ({"image": "b.jpg", "id": "a", "objects": ["dog"]}, "item 'a' appears twice"),
    "an id that is a list": ({"image": "b.jpg", "id": [1], "objects": ["dog"]}, '"id" must be a non-empty string'),
    "not JSON": ("{not json", "is not JSON"),
}


@pytest.mark.parametrize("case", sorted(JSONL_CASES))
def test_a_bad_jsonl_line_is_refused_with_its_file_and_line(case, subword_dir, tmp_path):
    line, fragment = JSONL_CASES[case]
    _jsonl_folder(tmp_path)
    f = tmp_path / "images.jsonl"
    f.write_text(json.dumps(GOOD_LINE) + "\n" + (line if isinstance(line, str) else json.dumps(line)) + "\n")
    out = tmp_path / "out"
    err = assert_refused(run("evaluate", "--model", subword_dir, "--images-jsonl", f, "--out", out, "--limit", 1),
                         fragment, out)
    assert f"{f}:2" in err  # the file and the line
    with pytest.raises(SourceError, match="^" + str(f) + ":2"):  # the same through the Python API
        JsonlSource(f)


def test_an_empty_jsonl_file_is_refused(subword_dir, tmp_path):
    f = tmp_path / "images.jsonl"
    f.write_text("\n")
    out = tmp_path / "out"
    assert_refused(run("evaluate", "--model", subword_dir, "--images-jsonl", f, "--out", out, "--limit", 1),
                   "lists no images", out)


def test_a_good_jsonl_file_passes_and_evaluates(subword_dir, tmp_path):
    _jsonl_folder(tmp_path)
    f = tmp_path / "images.jsonl"
    f.write_text(json.dumps(GOOD_LINE) + "\n" + json.dumps(_obj(box=[0.6, 0.6, 127.0, 5])) + "\n")
    src = JsonlSource(f)
    assert src.removable(0) == {"dog", "frisbee"} and src.mask(1, "dog").any()
    out = tmp_path / "out"
    r = run("evaluate", "--model", subword_dir, "--images-jsonl", f, "--out", out, "--limit", 1, "--max-new-tokens", 4)
    assert r.exit_code == 0, r.output
    assert (out / "protocol.json").is_file() and not (out / ".partial").exists()


# -- captions files (dleaf chair-score) ------------------------------------------------------------------

CAPTION_CASES = {
    "an empty file": ("", "no caption of a known COCO image: the file holds no caption records"),
    "only unknown image ids": ('{"image_id": 1, "caption": "a dog"}\n{"image_id": 2, "caption": "a cat"}\n',
                               "no caption of a known COCO image: 2 caption records, 2 of images not in the ground "
                               "truth (e.g. [1, 2])"),
    "only records without the keys": ('{"id": 219723, "text": "a dog"}\n', "1 without an image id or caption"),
    "not JSON": ("{not json\n", "does not parse as JSON"),
}


@pytest.mark.parametrize("case", sorted(CAPTION_CASES))
def test_a_captions_file_with_nothing_to_score_is_refused(case, tmp_path):
    text, fragment = CAPTION_CASES[case]
    f = tmp_path / "caps.jsonl"
    f.write_text(text)
    out = tmp_path / "details.jsonl"
    assert_refused(run("chair-score", "--captions", f, "--tagger", "none", "--out", out), fragment)
    assert not out.exists()


def test_unknown_caption_ids_are_skipped_and_counted_next_to_known_ones(tmp_path):
    f = tmp_path / "caps.jsonl"
    f.write_text('{"image_id": 219723, "caption": "a bird in a box."}\n{"image_id": 1, "caption": "a dog"}\n')
    r = run("chair-score", "--captions", f, "--tagger", "none", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["skipped_unknown_image_ids"] == 1


# -- result stores: one writer per directory, each key read once ---------------------------------------------

MANIFEST = {"model": "m", "n": 2}


def test_a_second_writer_is_refused_while_the_first_is_alive(tmp_path):
    first = ResultStore(tmp_path, MANIFEST)
    first.add("a", [{"v": 1}])
    with pytest.raises(SweepMismatchError, match=rf"another process \(pid {os.getpid()}\) is writing to .*use another "
                                                 "--out"):
        ResultStore(tmp_path, MANIFEST)
    reader = ResultStore(tmp_path, MANIFEST, read_only=True)  # readers need no lock
    assert list(reader.frame()["key"]) == ["a"]
    with pytest.raises(SweepMismatchError, match="read-only"):
        reader.add("b", [{"v": 2}])
    first.close()
    assert not (tmp_path / ".lock").exists()
    with pytest.raises(SweepMismatchError, match="closed"):
        first.add("b", [{"v": 2}])
    second = ResultStore(tmp_path, MANIFEST)
    second.add("b", [{"v": 2}])
    assert second.done == {"a", "b"}
    del second  # garbage collection releases the lock too
    ResultStore(tmp_path, MANIFEST).close()


WRITER = textwrap.dedent("""
    import sys
    from dleaf_analysis.sweeps import ResultStore
    store = ResultStore(sys.argv[1], {"model": "m", "n": 2})
    print("locked", flush=True)
    sys.stdin.read()  # hold the lock until the parent closes our stdin
""")


def test_a_writer_in_another_process_is_named_by_its_pid(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        assert (tmp_path / ".lock").read_text().strip() == str(p.pid)
        with pytest.raises(SweepMismatchError, match=rf"another process \(pid {p.pid}\) is writing to {tmp_path}; wait "
                                                     "for it to finish or use another --out directory"):
            ResultStore(tmp_path, MANIFEST)
    finally:
        p.stdin.close()
        p.wait(timeout=60)
    assert p.returncode == 0
    ResultStore(tmp_path, MANIFEST).close()  # the writer exited: the directory is free


def test_a_store_written_twice_reads_each_key_once(tmp_path):
    ResultStore(tmp_path, MANIFEST).close()
    lines = [{"key": "a", "rows": [{"v": 1}]}, {"key": "b", "rows": [{"v": 2}]}, {"key": "a", "rows": [{"v": 99}]}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    for read_only in (True, False):
        store = ResultStore(tmp_path, MANIFEST, read_only=read_only)
        df = store.frame()
        assert list(df["key"]) == ["a", "b"] and list(df["v"]) == [1, 2]  # the first record of a key wins
        assert store.done == {"a", "b"}
        store.close()
    with ResultStore(tmp_path, MANIFEST) as store:
        store.add_many([("a", [{"v": 7}]), ("c", [{"v": 3}]), ("c", [{"v": 4}])])
        assert list(store.frame()["v"]) == [1, 2, 3]
    assert list(ResultStore(tmp_path, MANIFEST, read_only=True).frame()["v"]) == [1, 2, 3]


def test_a_reader_writes_nothing(tmp_path):
    with pytest.raises(SweepMismatchError, match="holds no results"):
        ResultStore(tmp_path / "none", MANIFEST, read_only=True)
    assert not (tmp_path / "none").exists()
    ResultStore(tmp_path, MANIFEST).close()
    torn = '{"key": "a", "rows": [{"v": 1}]}\n{"key": "b", "ro'
    (tmp_path / "results.jsonl").write_text(torn)
    assert list(ResultStore(tmp_path, MANIFEST, read_only=True).frame()["key"]) == ["a"]
    assert (tmp_path / "results.jsonl").read_text() == torn and not (tmp_path / ".lock").exists()
    with pytest.raises(SweepMismatchError, match='model: this run has "b"'):
        ResultStore(tmp_path, {**MANIFEST, "model": "b"}, read_only=True)


@pytest.mark.parametrize("line", ['["a", 1]', '{"rows": []}', '{"key": "a", "rows": 3}'])
def test_a_line_that_is_not_a_result_record_is_refused(tmp_path, line):
    ResultStore(tmp_path, MANIFEST).close()
    (tmp_path / "results.jsonl").write_text(line + "\n")
    with pytest.raises(SweepMismatchError, match=r"results.jsonl:1 is not a result record"):
        ResultStore(tmp_path, MANIFEST)


def test_merging_finished_shards_reads_them_without_their_lock(subword_dir, tmp_path):
    # calibration: its shards split the faults (here the first two) and share the images
    common = ["--model", subword_dir, "--coco-images", FAKE / "val2014", "--coco-annotations",
              FAKE / "instances_fake2014.json", "--limit", 1, "--max-units", 2, "--json"]
    for i in range(2):
        r = run("study", "calibration", *common, "--shard", f"{i}/2", "--out", tmp_path / f"s{i}")
        assert r.exit_code == 0, r.output
    shard = tmp_path / "s0" / "calibration"
    assert not (shard / ".lock").exists()  # released when the run ended
    before = (shard / "results.jsonl").read_bytes()
    holder = ResultStore(shard, json.loads((shard / "manifest.json").read_text()))  # say, a resumed shard
    try:
        r = run("study", "calibration", "--merge", tmp_path / "s0", "--merge", tmp_path / "s1", "--out", tmp_path / "m")
        assert r.exit_code == 0, r.output
    finally:
        holder.close()
    assert (tmp_path / "m" / "calibration" / "summary.json").is_file()
    assert (shard / "results.jsonl").read_bytes() == before
    assert not any(p.name == ".lock" for p in tmp_path.rglob("*"))
