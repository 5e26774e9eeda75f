import json

import numpy as np
import pandas as pd
import pytest

from dleaf_analysis.evaluation import Protocol, chair_details, chair_summary, get_parser, pope_summary
from dleaf_analysis.evaluation.bootstrap import bootstrap_ci
from dleaf_analysis.evaluation.chair import object_mentions

VOCAB = ["fork", "knife", "cup", "plate", "dog"]


def test_object_mentions_keep_order_and_repeats():
    assert object_mentions("a fork , a cup and a fork .", VOCAB) == ["fork", "cup", "fork"]
    assert object_mentions("forks and a Cup.", VOCAB) == ["cup"]  # exact words only, case-folded


def test_chair_hand_computed():
    caps = [
        "a photo of a fork , a knife and a cup .",  # gt fork, knife: cup hallucinated
        "a photo of a dog .",                        # gt dog, plate: clean, recall 1/2
        "a photo of a cup , a cup and a plate .",    # gt plate: cup twice hallucinated
        "a photo of .",                              # gt fork: no mention
    ]
    gt = [{"fork", "knife"}, {"dog", "plate"}, {"plate"}, {"fork"}]
    d = chair_details(caps, gt, VOCAB)
    s = chair_summary(d, n_resamples=200).set_index("metric")["value"]
    # CHAIR_s: captions 0 and 2 hallucinate -> 2/4
    assert s["CHAIR_s"] == pytest.approx(50.0)
    # CHAIR_i: mentions 3 + 1 + 3 + 0 = 7, hallucinated 1 + 0 + 2 = 3
    assert s["CHAIR_i"] == pytest.approx(100 * 3 / 7)
    # recall: covered 2 + 1 + 1 + 0 = 4 of gt 2 + 2 + 1 + 1 = 6
    assert s["recall"] == pytest.approx(100 * 4 / 6)
    assert s["length"] == pytest.approx(np.mean([12, 6, 12, 4]))  # words and punctuation
    assert list(d["hallucinated"][2]) == ["cup", "cup"]


def test_chair_ci_brackets_point_and_is_deterministic():
    rng = np.random.default_rng(0)
    caps = [" ".join(rng.choice(VOCAB, size=3)) for _ in range(80)]
    gt = [set(rng.choice(VOCAB, size=2, replace=False)) for _ in range(80)]
    s1 = chair_summary(chair_details(caps, gt, VOCAB), seed=3)
    s2 = chair_summary(chair_details(caps, gt, VOCAB), seed=3)
    pd.testing.assert_frame_equal(s1, s2)
    assert ((s1["ci_low"] <= s1["value"]) & (s1["value"] <= s1["ci_high"])).all()
    assert (s1["ci_high"] - s1["ci_low"])[:3].gt(0).all()  # length is constant here


def test_chair_length_mismatch():
    with pytest.raises(ValueError, match="ground-truth"):
        chair_details(["a"], [], VOCAB)


def test_pope_hand_computed():
    labels = ["yes", "yes", "yes", "no", "no", "no", "no", "yes"]
    preds = ["yes", "yes", "no", "yes", "no", "no", "no", "yes"]
    s = pope_summary(labels, preds, n_resamples=100).set_index("metric")["value"]
    tp, fp, tn, fn = 3, 1, 3, 1
    assert s["accuracy"] == pytest.approx(100 * 6 / 8)
    assert s["precision"] == pytest.approx(100 * tp / (tp + fp))
    assert s["recall"] == pytest.approx(100 * tp / (tp + fn))
    assert s["f1"] == pytest.approx(100 * 2 * 0.75 * 0.75 / 1.5)
    assert s["yes_ratio"] == pytest.approx(100 * 4 / 8)


def test_pope_group_bootstrap_resamples_images():
    labels = ["yes", "no"] * 50
    preds = ["yes", "yes"] * 50
    a = pope_summary(labels, preds, groups=np.repeat(np.arange(50), 2), seed=1).set_index("metric")
    # every image has one TP and one FP: accuracy is 50% in every resample of whole images
    assert a.loc["accuracy", "ci_low"] == pytest.approx(50.0) and a.loc["accuracy", "ci_high"] == pytest.approx(50.0)
    b = pope_summary(labels, preds, seed=1).set_index("metric")
    assert b.loc["accuracy", "ci_high"] > 50.0  # question-level resampling varies


# tricky answers and each parser's verdict
PARSER_FIXTURE = [
    # answer, official, negation, substring, first-token
    ("Yes, there is a knife in the image.", "yes", "yes", "yes", "yes"),
    ("No, there is no knife.", "no", "no", "no", "no"),
    ("no", "no", "no", "no", "no"),
    ("There is not a knife in the image.", "no", "no", "no", "no"),
    ("Yes. But there is no fork.", "yes", "no", "yes", "yes"),
    ("I cannot see a knife.", "yes", "no", "no", "no"),
    ("Not sure.", "yes", "no", "no", "no"),
    ("yes", "yes", "yes", "yes", "yes"),
    ("Eyes are visible, no knife", "no", "no", "yes", "no"),
]


@pytest.mark.parametrize("answer,official,negation,substring,first", PARSER_FIXTURE)
def test_answer_parsers(answer, official, negation, substring, first):
    assert get_parser("official")(answer) == official
    assert get_parser("negation")(answer) == negation
    assert get_parser("substring")(answer) == substring
    assert get_parser("first-token")(answer) == first


def test_unknown_parser():
    with pytest.raises(ValueError, match="choose one of"):
        get_parser("llm-judge")


def test_bootstrap_ci_of_a_mean():
    x = np.random.default_rng(0).normal(10, 2, size=400)
    ci = bootstrap_ci({"x": x, "one": np.ones_like(x)}, {"mean": lambda s: s["x"] / s["one"]}, n_resamples=2000)
    lo, hi = ci["mean"]
    se = 2 / np.sqrt(400)
    assert lo == pytest.approx(x.mean() - 1.96 * se, abs=0.05)
    assert hi == pytest.approx(x.mean() + 1.96 * se, abs=0.05)


def test_protocol_is_a_view_of_the_manifest():
    from dleaf_analysis import runs
    from dleaf_analysis.evaluation.runner import Protocol

    cfg = runs.EvalConfig(benchmark="chair", method="dleaf", method_config={"gamma": 0.5}, seed=0, max_new_tokens=32)
    m = runs.manifest(cfg, {"id": "m", "weights_hash": "w", "files_hash": "f", "dtype": "fp32", "device": "cpu"},
                      {"kind": "scene", "split": "dev", "split_hash": "abc", "hash": "h"})
    m["config"]["prompt"] = "describe the image ."
    p = Protocol(m, 3)
    assert (p.weights_hash, p.split, p.split_hash, p.benchmark) == ("w", "dev", "abc", "chair")
    assert p.method_config == {"gamma": 0.5} and p.n_items == 3 and p.prompt == "describe the image ."
    assert p.to_dict() == {**m, "n_items": 3}
    assert json.loads(json.dumps(p.to_dict())) == p.to_dict()  # plain JSON: what protocol.json holds
    assert "gamma" in p.describe() and "3 items" in p.describe()
    with pytest.raises(AttributeError):
        p.no_such_field


def test_results_are_written_atomically_and_other_runs_are_refused(tmp_path, embedded, monkeypatch):
    from dleaf_analysis.evaluation import runner
    from dleaf_analysis.evaluation.runner import ProtocolMismatchError, evaluate

    out = tmp_path / "run"
    r = evaluate("chair", "dev", embedded, limit=2, out_dir=out, progress=False, n_resamples=50)
    assert {p.name for p in out.iterdir()} == {"details.jsonl", "protocol.json", "summary.csv"}
    assert not list(out.glob(".*.tmp"))
    # the same run again is read back from its directory, not decoded again; another method is refused
    # before any compute, naming the field
    calls = []
    monkeypatch.setattr(runner, "generate", lambda *a, **k: calls.append(1))
    again = evaluate("chair", "dev", embedded, limit=2, out_dir=out, progress=False, n_resamples=50)
    assert not calls and again.details["caption"].tolist() == r.details["caption"].tolist()
    pd.testing.assert_frame_equal(again.summary, r.summary)
    with pytest.raises(ProtocolMismatchError, match='method: this run has "pai", the directory has "greedy"'):
        evaluate("chair", "dev", embedded, method="pai", limit=2, out_dir=out, progress=False, n_resamples=50)
    assert not calls  # refused before captioning anything
    monkeypatch.undo()
    evaluate("chair", "dev", embedded, method="pai", limit=2, out_dir=out, progress=False, n_resamples=50,
             overwrite=True)
    assert json.loads((out / "protocol.json").read_text())["config"]["method"] == "pai"
    # a crash while writing leaves the previous complete result in place, every file of it
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(self, f, **k):
        raise OSError("disk full")
    monkeypatch.setattr(pd.DataFrame, "to_json", boom)
    with pytest.raises(OSError):
        r.save(out, overwrite=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_evaluation_resumes_by_item_after_a_crash_with_another_batch_size(tmp_path, embedded, monkeypatch):
    """An evaluation that dies mid-run and is resumed with a smaller batch keeps its finished items,
    decodes only the missing ones, and ends with the numbers, captions and D-LEAF log of an
    uninterrupted run; a resume with other settings is refused."""
    from dleaf_analysis.evaluation import runner
    from dleaf_analysis.evaluation.runner import evaluate
    from dleaf_analysis.sweeps import SweepMismatchError

    kw = dict(method="dleaf", limit=10, progress=False, n_resamples=50)
    ref = evaluate("chair", "dev", embedded, batch_size=10, **kw)
    assert len(ref.interventions)  # D-LEAF fired, so the log is part of what must survive
    real, n_items = runner.generate, []

    def dies_on_third_batch(lm, images, *a, **k):
        if len(n_items) == 2:
            raise MemoryError("CUDA out of memory (simulated)")
        n_items.append(len(images))
        return real(lm, images, *a, **k)

    monkeypatch.setattr(runner, "generate", dies_on_third_batch)
    out = tmp_path / "run"
    with pytest.raises(MemoryError):
        evaluate("chair", "dev", embedded, batch_size=4, out_dir=out, **kw)
    assert not (out / "protocol.json").exists() and n_items == [4, 4]
    with pytest.raises(SweepMismatchError, match="max_new_tokens"):
        evaluate("chair", "dev", embedded, batch_size=3, out_dir=out, max_new_tokens=20, **kw)
    n_items.clear()
    res = evaluate("chair", "dev", embedded, batch_size=3, out_dir=out, **kw)
    assert n_items == [2]  # only the two missing images were decoded
    assert res.details["caption"].tolist() == ref.details["caption"].tolist()
    assert res.summary["value"].tolist() == ref.summary["value"].tolist()
    cols = sorted(ref.interventions.columns)
    key = ["item", "step", "layer"]
    pd.testing.assert_frame_equal(res.interventions[cols].sort_values(key).reset_index(drop=True),
                                  ref.interventions[cols].sort_values(key).reset_index(drop=True))
    assert not (out / ".partial").exists()


def test_pope_interventions_name_their_question(embedded):
    """D-LEAF's log on POPE: ``item`` is the question's position within its variant, so every row names
    its variant too, and (variant, item) identifies one question of the details."""
    from dleaf_analysis.evaluation.runner import evaluate

    r = evaluate("pope", "dev", embedded, method="dleaf", method_config={"running_seed": "prefill-rows"}, limit=2,
                 progress=False, n_resamples=20)
    inter = r.interventions
    assert len(inter) and set(inter["variant"]) <= set(r.details["variant"])
    per_variant = r.details.groupby("variant").size()
    assert all(inter.loc[inter.variant == v, "item"].max() < per_variant[v] for v in set(inter["variant"]))
    fired = inter.loc[inter["step"] == 0, ["variant", "item"]].drop_duplicates()
    assert len(fired) > per_variant.max()  # more questions than one variant holds: variants are not collapsed
