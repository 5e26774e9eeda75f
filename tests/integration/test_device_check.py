"""``dleaf check-device``: the comparison logic, exercised on the CPU (the only device here)."""

import json

import torch
from typer.testing import CliRunner

from dleaf_analysis.cli import app
from dleaf_analysis.device_check import check_device


def test_cpu_against_itself_agrees_and_reports_times(embedded):
    rep = check_device(device="cpu", n_tokens=6, reference=embedded, target=embedded)
    assert rep.ok, rep.problems
    assert rep.max_logit_diff == 0.0 and rep.greedy_tokens_agree == 6 and rep.dleaf_tokens_agree == 6
    assert rep.greedy_ms_per_token > 0 and rep.dleaf_ms_per_token > 0


def test_a_broken_device_run_is_caught(embedded):
    """A target whose weights differ (standing in for a device kernel that computes wrongly) fails."""
    from dleaf_analysis.models import load_model

    broken = load_model()
    with torch.no_grad():
        broken.model.lm_head.weight.mul_(-1.0)
    rep = check_device(device="cpu", n_tokens=4, reference=embedded, target=broken)
    assert not rep.ok and any("prompt logits differ" in p for p in rep.problems)


def test_cli_check_device_json():
    r = CliRunner().invoke(app, ["check-device", "--device", "cpu", "--tokens", "3", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["ok"] and d["device"] == "cpu" and d["dtype"] == "float32"
