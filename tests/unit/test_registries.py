"""The extension registries: detectors, methods, studies, model families, and the run manifests."""

import json

import pytest
import torch

from dleaf_analysis import detectors, runs
from dleaf_analysis.cache import AttentionCache


def _cache(S=5, L=3, H=2, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(S, L, H, n, generator=g) / n
    return AttentionCache(image_attn=a, mass=torch.rand(S, L, H, 4, generator=g), row_entropy=torch.rand(S, L, H, generator=g),
                          tokens=list(range(S)), token_strs=[str(i) for i in range(S)], query_positions=list(range(S)),
                          image_positions=list(range(n)), prompt_length=n + 1)


def test_detectors_declare_level_family_and_direction():
    layer = detectors.select("layer")
    assert {d.family for d in layer} == {"liae", "uniform", "random"}
    assert detectors.names("layer", "liae") == ["liae", "liae-z", "liae-mean-entropy"]
    assert "image-mass" in detectors.names("layer", "uniform")
    iaf = detectors.get("iaf", "head")
    c = _cache()
    assert iaf.higher == "better"
    torch.testing.assert_close(iaf.suspect(c), -c.iaf("mass"))  # the sign is applied once, here
    with pytest.raises(ValueError, match="unknown layer detector"):
        detectors.get("nope")


def test_a_new_detector_is_one_registration_and_reaches_every_selector():
    @detectors.register("test-max-attention", level="layer", family="uniform")
    def max_attention(cache, seed=0):
        """Minus the largest image attention (a peaked layer looks less suspect)."""
        return -cache.image_attn.float().amax((-1, -2))
    try:
        assert "test-max-attention" in detectors.names("layer", "uniform")
        table = detectors.diagnose(_cache())
        assert "test-max-attention" in set(table["detector"])
    finally:
        detectors.REGISTRY.pop("layer:test-max-attention")


def test_a_detector_can_register_the_step_field_it_reads():
    from dleaf_analysis.cache import STEP_FIELDS, register_field

    register_field("test-key-count", lambda rows, group, q: (rows > 0).sum(-1, keepdim=True).float())
    try:
        c = _cache()
        with pytest.raises(Exception, match="no field 'test-key-count'"):
            c.field("test-key-count")
    finally:
        STEP_FIELDS.pop("test-key-count")


def test_methods_studies_families_registered():
    from dleaf_analysis.interventions import METHODS
    from dleaf_analysis.models.families import FAMILIES
    from dleaf_analysis.studies import STUDIES

    assert {"greedy", "dleaf", "uniform", "pai", "vcd", "ablate", "probe"} <= set(METHODS)
    assert {"ablation", "patching", "localization", "dpo", "calibration", "leverage", "trigger", "oracle"} <= set(STUDIES)
    assert set(FAMILIES) == {"llava", "llava_next", "qwen2_vl", "instructblip"}
    for name, st in STUDIES.items():
        assert st.name == name and st.shard_axis in ("images", "units")
        from dleaf_analysis.figures import FIGURES

        assert all(f in FIGURES for f in st.figures), (name, st.figures)


def test_manifest_schema_and_differences():
    m1 = runs.manifest(runs.EvalConfig(method="dleaf", method_config={"gamma": 0.5}), {"id": "m", "weights_hash": "a"},
                       {"kind": "scene", "hash": "h"})
    assert set(m1) == {"format", "run", "config", "model", "source"} and m1["run"] == "evaluate"
    m2 = json.loads(json.dumps(m1))
    m2["config"]["method_config"]["gamma"] = 1.0
    m2["model"]["weights_hash"] = "b"
    assert runs.differences(m1, m2) == ["config.method_config.gamma", "model.weights_hash"]
    with pytest.raises(runs.ManifestMismatchError, match="config.method_config.gamma: this run has 1.0"):
        runs.check_same_run("dir", m1, m2)
    with pytest.raises(runs.ManifestMismatchError, match="another version"):
        runs.check_same_run("dir", {"weights_hash": "a"}, m1)  # an old flat manifest
    with pytest.raises(ValueError, match="unknown benchmark"):
        runs.EvalConfig(benchmark="vqa")


def test_json_output_is_valid_json():
    from dleaf_analysis.tables import json_safe

    s = json.dumps(json_safe({"a": float("nan"), "b": [float("inf"), 1.0]}))
    assert s == '{"a": null, "b": [null, 1.0]}'
