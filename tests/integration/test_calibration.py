"""The planted-fault calibration study: the faults are what docs/method.md says, the study sees a
fault that must be visible, and it resumes without redoing finished faults."""

from __future__ import annotations

import json

import pytest
import torch

from dleaf_analysis.studies.calibration import Fault, damage, default_faults


def test_damage_by_hand():
    row = torch.tensor([[[0.1, 0.3, 0.1, 0.5]]])  # [B=1, H=1, K=4]; keys 1, 2 are image tokens
    img = torch.tensor([[False, True, True, False]])
    d = damage(row, img, "diffuse", 1.0)
    assert torch.allclose(d, torch.tensor([[[0.1, 0.2, 0.2, 0.5]]]))  # same mass 0.4, spread evenly
    half = damage(row, img, "diffuse", 0.5)
    assert torch.allclose(half, torch.tensor([[[0.1, 0.25, 0.15, 0.5]]]))
    dr = damage(row, img, "drain", 1.0)
    assert torch.allclose(dr, torch.tensor([[[0.1 / 0.6, 0.0, 0.0, 0.5 / 0.6]]]))  # mass to text keys pro rata
    dr2 = damage(row, img, "drain", 0.5)
    assert torch.allclose(dr2.sum(-1), torch.ones(1, 1)) and torch.allclose(dr2[0, 0, 1:3], torch.tensor([0.15, 0.05]))


def test_fault_validation_and_steps():
    with pytest.raises(ValueError, match="fault kind"):
        Fault("melt", 2, (0,)).validate(6, 4)
    with pytest.raises(ValueError, match="proper subset"):
        Fault("drain", 2, (0, 1, 2, 3)).validate(6, 4)
    f = Fault("drain", 2, (0,), 1.0, 0.5, seed=3)
    a, b = f.active_steps(7), f.active_steps(7)
    assert (a == b).all() and 0.3 < a.mean() < 0.7 and not (a == f.active_steps(8)).all()
    assert len(default_faults(6, 4)) >= 6


def _run(out, lm, faults):
    from dataclasses import asdict

    from dleaf_analysis.studies import run_study

    options = {"faults": [asdict(f) for f in faults], "n_causal_events": 1, "max_new_tokens": 16}
    return run_study("calibration", "dev", limit=6, out=out, lm=lm, options=options, progress=False,
                     log=lambda s: None)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, embedded):
    out = tmp_path_factory.mktemp("calibration")
    faults = [Fault("drain", 3, (0, 1, 2), 1.0, 1.0), Fault("diffuse", 3, (0, 1, 2), 1.0, 1.0)]
    return out, _run(out, embedded, faults).tables, embedded, faults


def test_a_visible_fault_is_detected(small_run):
    """A full-strength drain of three of four heads at every step must be seen by the image-mass
    detector: the study can report a positive."""
    _, t, _, _ = small_run
    d = t["detection"].set_index(["kind", "detector"])
    assert d.loc[("drain", "image-mass"), "auroc"] > 0.9
    assert d.loc[("drain", "layer-profile"), "auroc"] == 0.5  # a constant ordering cannot detect anything
    assert set(t["recovery"].method) == {"dleaf", "uniform", "pai", "oracle"}
    assert t["faults"]["drecall"].notna().all()


def test_calibration_resumes_without_redoing(small_run):
    out, _, lm, faults = small_run
    before = (out / "calibration" / "results.jsonl").read_text()
    _run(out, lm, faults)
    assert (out / "calibration" / "results.jsonl").read_text() == before
    assert set(json.loads((out / "calibration" / "summary.json").read_text())["faults"]) == {f.key for f in faults}
