"""COCO CHAIR against released caption logs: the published OPERA number, the reference scorer's
values for every LLaVA-1.5 file (tagged and untagged), and the original script's per-caption
object lists (tests/data/reference_captions: released LLaVA-1.5 caption logs; provenance in its README)."""

import gzip
import json
from pathlib import Path

import pytest

from dleaf_analysis.evaluation.coco_chair import CocoChair, CocoDataError, chair_score, load_ground_truth, read_captions

REF = Path(__file__).resolve().parents[1] / "data" / "reference_captions"

# file: (CHAIR_s, CHAIR_i, hallucinated, mentions, recall) from the reference scorer (README there)
TAGGED = {
    "opera__llava-1.5__greedy.jsonl": (44.8, 12.69, 481, 3789, 79.97),
    "opera__llava-1.5__beam5.jsonl": (48.8, 13.83, 526, 3804, 79.91),
    "opera__llava-1.5__ours.jsonl": (44.6, 12.70, 464, 3654, 79.19),
    "devils__llava-1.5__baseline.jsonl": (48.2, 14.20, 537, 3783, 77.98),
    "devils__llava-1.5__head-guided.jsonl": (24.8, 5.78, 258, 4463, 68.91),
    "devils__llava-1.5__unlabeled-run__chair_dump.json": (25.0, 6.71, 261, 3890, 68.37),
}
UNTAGGED = {  # (CHAIR_s, CHAIR_i, recall): must match exactly (two decimals)
    "opera__llava-1.5__greedy.jsonl": (44.8, 12.65, 79.84),
    "opera__llava-1.5__beam5.jsonl": (48.8, 13.82, 79.78),
    "opera__llava-1.5__ours.jsonl": (44.6, 12.70, 79.00),
    "devils__llava-1.5__baseline.jsonl": (47.4, 14.03, 77.98),
    "devils__llava-1.5__head-guided.jsonl": (24.2, 5.73, 68.59),
    "devils__llava-1.5__unlabeled-run__chair_dump.json": (25.0, 6.74, 68.05),
}


@pytest.fixture(scope="module")
def scorers():
    return {t: CocoChair.load(tagger=t) for t in ("perceptron", "none")}


def _score(scorer, name):
    s, d = chair_score(read_captions(REF / name), scorer, n_resamples=50)
    return s.set_index("metric")["value"], s.attrs, d


@pytest.mark.parametrize("name", sorted(TAGGED))
def test_tagged_matches_reference_scorer(scorers, name):
    v, attrs, _ = _score(scorers["perceptron"], name)
    cs, ci, hall, ment, rec = TAGGED[name]
    assert v["CHAIR_s"] == pytest.approx(cs, abs=0.4)
    assert v["CHAIR_i"] == pytest.approx(ci, abs=0.15)
    assert v["recall"] == pytest.approx(rec, abs=0.3)
    assert (attrs["hallucinated_mentions"], attrs["mentions"]) == (hall, ment)  # measured: identical counts


@pytest.mark.parametrize("name", sorted(UNTAGGED))
def test_untagged_matches_its_own_row_exactly(scorers, name):
    v, _, _ = _score(scorers["none"], name)
    assert (round(v["CHAIR_s"], 1), round(v["CHAIR_i"], 2), round(v["recall"], 2)) == UNTAGGED[name]


def test_published_opera_number(scorers):
    v, _, _ = _score(scorers["perceptron"], "opera__llava-1.5__ours.jsonl")
    assert v["CHAIR_s"] == pytest.approx(44.6, abs=0.4)  # OPERA paper, LLaVA-1.5-7B
    assert v["CHAIR_i"] == pytest.approx(12.8, abs=0.15)


def test_per_caption_objects_match_original_script_dump(scorers):
    dump = json.loads((REF / "devils__llava-1.5__unlabeled-run__chair_dump.json").read_text())
    _, _, d = _score(scorers["perceptron"], "devils__llava-1.5__unlabeled-run__chair_dump.json")
    ours = {(r.image_id, r.caption): list(r.mentioned) for r in d.itertuples()}
    same = sum(ours[(s["image_id"], s["caption"])] == s["mscoco_generated_words"] for s in dump["sentences"])
    assert same >= 499  # the reference scorer: 499 of 500 (one extra, correctly present umbrella)
    dump_metrics = dump["overall_metrics"]
    v, _, _ = _score(scorers["perceptron"], "devils__llava-1.5__unlabeled-run__chair_dump.json")
    assert v["CHAIR_s"] / 100 == pytest.approx(dump_metrics["CHAIRs"], abs=0.004)
    assert v["CHAIR_i"] / 100 == pytest.approx(dump_metrics["CHAIRi"], abs=0.0015)
    assert v["length"] / 100 == pytest.approx(dump_metrics["Len"], abs=0.001)


def test_special_cases(scorers):
    s = scorers["perceptron"]
    assert s.caption_to_words("A man sits on the toilet seat next to a dining table.")[1] == ["person", "toilet", "dining table"]
    assert s.caption_to_words("a baby elephant near a home plate")[1] == ["elephant"]
    assert s.caption_to_words("two dogs and a motorbike")[1] == ["dog", "motorcycle"]


def test_missing_keys_and_unknown_ids_are_counted(tmp_path, scorers):
    f = tmp_path / "caps.jsonl"
    f.write_text("\n".join([json.dumps({"image_id": 219723, "caption": "a bird in a box."}),
                            json.dumps({"image_id": 1, "caption": "a dog"}),  # not a COCO 2014 image id
                            json.dumps({"caption": "no id"})]) + "\n")
    caps = read_captions(f)
    s, d = chair_score(caps, scorers["none"], n_resamples=10)
    assert s.attrs["skipped_missing_keys"] == 1 and s.attrs["skipped_unknown_image_ids"] == 1 and len(d) == 1


def test_malformed_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(CocoDataError, match="does not parse"):
        read_captions(bad)
    with pytest.raises(CocoDataError, match="not found"):
        read_captions(tmp_path / "missing.jsonl")
    gt = tmp_path / "gt.json.gz"
    with gzip.open(gt, "wt") as f:
        json.dump({"abc": ["dog"]}, f)
    with pytest.raises(CocoDataError, match="integers"):
        load_ground_truth(gt)
    (tmp_path / "gt2.json").write_text("[1, 2]")
    with pytest.raises(CocoDataError, match="map image ids"):
        load_ground_truth(tmp_path / "gt2.json")


def test_cli_chair_score(tmp_path):
    from typer.testing import CliRunner

    from dleaf_analysis.cli import app

    r = CliRunner().invoke(app, ["chair-score", "--captions", str(REF / "opera__llava-1.5__ours.jsonl"), "--tagger",
                                 "none", "--json", "--out", str(tmp_path / "d.jsonl")])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert {m["metric"]: round(m["value"], 2) for m in d["summary"]}["CHAIR_i"] == 12.70
    assert d["skipped_unknown_image_ids"] == 0 and (tmp_path / "d.jsonl").is_file()
    r = CliRunner().invoke(app, ["chair-score", "--captions", str(tmp_path / "none.jsonl")])
    assert r.exit_code == 2 and "not found" in r.output
