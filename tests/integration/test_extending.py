"""docs/extending.md stays true: each worked example (the code block after an ``example:`` marker)
runs in a fresh process, registers its detector / method / study / model family, and the rest of
the package picks it up with no other change."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "extending.md"


def examples() -> dict[str, str]:
    text = DOC.read_text()
    found = dict(re.findall(r"<!-- example: (\w+) -->\s*```python\n(.*?)```", text, flags=re.S))
    assert set(found) == {"detector", "method", "study", "family"}, sorted(found)
    return found


# What the rest of the package must do with the new component (run after the example's code).
CHECKS = {
    "detector": """
        import torch
        from dleaf_analysis import detectors
        from dleaf_analysis.models import load_model
        from dleaf_analysis.scenes import load_split
        from dleaf_analysis.tracing import trace_generation

        assert "image-peak" in detectors.names("layer", "uniform")
        lm = load_model()
        c = trace_generation(lm, load_split("dev", limit=1).image(0), max_new_tokens=6, backend="hooks")
        table = detectors.diagnose(c)
        mine = table[table.detector == "image-peak"].sort_values(["step", "layer"])
        expected = c.image_attn.float().amax(-1).mean(-1)  # [S, L], by hand
        assert len(mine) == c.n_steps * c.n_layers
        # higher = better, declared once: the table's score (higher = more suspect) is its negation
        assert torch.allclose(torch.tensor(mine["score"].to_numpy()).float(), -expected.flatten(), atol=1e-6)
        assert (mine.groupby("step")["rank"].min() == 0).all()
    """,
    "method": """
        import torch
        from dleaf_analysis.evaluation.runner import evaluate
        from dleaf_analysis.interventions import get_method
        from dleaf_analysis.models import load_model
        from dleaf_analysis.models.generation import DEFAULT_CAPTION_PROMPT
        from dleaf_analysis.scenes import load_split

        lm = load_model()
        img = load_split("dev", limit=1).image(0)
        inputs = lm.inputs([img], [DEFAULT_CAPTION_PROMPT])

        def logits(method):
            m = get_method(method[0], method[1])
            with m.attach(lm, inputs), torch.no_grad():
                return lm.model(**inputs).logits[0, -1]

        base = logits(("greedy", None))
        same = logits(("image-temperature", {"t": 1.0}))  # t = 1 leaves every pattern as it is
        sharp = logits(("image-temperature", {"t": 0.2}))
        assert torch.allclose(base, same, atol=1e-5)
        assert (sharp - base).abs().max() > 1e-3  # the edit reaches the output
        try:
            get_method("image-temperature", {"t": 100.0}).validate(8, 4)
            raise SystemExit("an out-of-range t was accepted")
        except ValueError as e:
            assert "t" in str(e)
        res = evaluate("chair", "dev", lm, method="image-temperature", method_config={"t": 0.7}, limit=2,
                       max_new_tokens=12, progress=False, n_resamples=20)
        assert res.manifest["config"]["method"] == "image-temperature"
        assert res.manifest["config"]["method_config"]["t"] == 0.7 and len(res.details) == 2
    """,
    "study": """
        import json, sys, tempfile
        from pathlib import Path
        from dleaf_analysis.studies import STUDIES, run_study

        assert "caption-length" in STUDIES
        out = Path(tempfile.mkdtemp())
        res = run_study("caption-length", "dev", limit=3, out=out, progress=False, log=lambda s: None)
        t = res.tables["lengths"]
        assert len(t) == 3 and (t["tokens"] > 0).all() and set(t["item"]) == {"dev/0", "dev/1", "dev/2"}
        before = (out / "caption-length" / "results.jsonl").read_bytes()
        again = run_study("caption-length", "dev", limit=3, out=out, progress=False, log=lambda s: None)
        assert (out / "caption-length" / "results.jsonl").read_bytes() == before  # resumed, nothing redone
        assert again.summary["mean_tokens"] == res.summary["mean_tokens"] == float(t["tokens"].mean())
        assert json.loads((out / "caption-length" / "summary.json").read_text())["mean_tokens"] == res.summary["mean_tokens"]
    """,
    "family": """
        import torch
        from dleaf_analysis import hooks
        from dleaf_analysis.models.adapters import ModelAdapter
        from dleaf_analysis.models.families import FAMILIES
        from dleaf_analysis.models.loading import LoadedModel
        from dleaf_analysis.tracing import trace_forward

        model, inputs = FAMILIES["mistral3"].tiny_model()
        ad = ModelAdapter(model)
        assert (ad.n_layers, ad.n_heads) == (4, 4)
        assert int(ad.image_mask(inputs["input_ids"]).sum()) == 4
        with torch.no_grad():
            ref = model(**inputs).logits  # Mistral3's own attention
        lm = LoadedModel.wrap(model)
        f_nn = trace_forward(lm, None, inputs=inputs, backend="nnsight")
        with torch.no_grad():
            got = model(**inputs).logits  # now through the hook point (GQA heads repeated)
        assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
        f_h = trace_forward(lm, None, inputs=inputs, backend="hooks")
        assert torch.allclose(f_nn.image_attn, f_h.image_attn, atol=1e-6)
        assert f_h.image_attn.shape == (1, 4, 4, 4)
    """,
}


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_worked_example_runs_and_is_picked_up(name):
    code = examples()[name] + "\n" + textwrap.dedent(CHECKS[name])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
