"""Traces: nnsight, plain torch hooks, transformer-lens and HF's own output_attentions agree;
generation traces equal teacher-forced forward traces; caches save, load and refuse bad files."""

import shutil

import numpy as np

import pytest
import torch

from dleaf_analysis.cache import AttentionCache, CacheFileError
from dleaf_analysis.models.adapters import ModelAdapter
from dleaf_analysis.models.generation import DEFAULT_CAPTION_PROMPT
from dleaf_analysis.models.inputs import InputError, PromptBuilder
from dleaf_analysis.tracing import trace_forward, trace_generation


@pytest.fixture(scope="module")
def image(dev_split):
    return dev_split.image(3)


@pytest.fixture(scope="module")
def gen_caches(embedded, image):
    return {b: trace_generation(embedded, image, backend=b, max_new_tokens=32) for b in ("nnsight", "hooks")}


def test_generation_backends_agree(gen_caches):
    a, b = gen_caches["nnsight"], gen_caches["hooks"]
    assert a.tokens == b.tokens and a.n_steps == len(a.tokens) > 3
    torch.testing.assert_close(a.image_attn, b.image_attn, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.liae(), b.liae(), rtol=0, atol=1e-5)
    torch.testing.assert_close(a.iaf(), b.iaf(), rtol=0, atol=1e-5)


def test_generation_trace_matches_plain_generate(embedded, image, gen_caches):
    from dleaf_analysis.models import caption

    assert gen_caches["nnsight"].text().replace(" </s>", "") == caption(embedded, [image], max_new_tokens=32,
                                                                          progress=False)[0]


def test_cache_layout(embedded, gen_caches):
    c = gen_caches["nnsight"]
    ad = ModelAdapter(embedded.model)
    assert c.image_attn.shape == (c.n_steps, ad.n_layers, ad.n_heads, 144)
    torch.testing.assert_close(c.mass.sum(-1), torch.ones(c.n_steps, ad.n_layers, ad.n_heads), rtol=0, atol=1e-5)
    torch.testing.assert_close(c.mass[..., 1], c.image_attn.sum(-1), rtol=0, atol=1e-5)
    assert c.mass[0, ..., 3].abs().max() == 0  # nothing generated before step 0
    assert c.mass[1:, ..., 3].min() > 0
    ids = PromptBuilder(embedded.processor).inputs([np.zeros((8, 8, 3), np.uint8)], [DEFAULT_CAPTION_PROMPT])["input_ids"][0]
    first = int((ids == embedded.model.config.image_token_id).nonzero()[0])  # after the system prompt and "user :"
    assert first > 3 and c.image_positions == list(range(first, first + 144))  # 144 image tokens in a row
    assert c.query_positions[0] == c.prompt_length - 1


def test_generation_equals_teacher_forced_forward(embedded, image, gen_caches):
    """KV-cache steps equal a recomputation of the whole sequence without cache."""
    g = gen_caches["hooks"]
    cont = " ".join(g.token_strs[:-1])
    f = trace_forward(embedded, image, continuation=cont, backend="hooks")
    assert f.tokens == g.tokens
    torch.testing.assert_close(f.image_attn, g.image_attn, rtol=0, atol=1e-5)


def test_forward_backends_agree_with_hf_output_attentions(embedded, image, gen_caches):
    cont = " ".join(gen_caches["hooks"].token_strs[:6])
    caches = {b: trace_forward(embedded, image, continuation=cont, backend=b, full_patterns=True)
              for b in ("nnsight", "hooks", "transformer-lens")}
    # fourth route: transformers' own eager attention weights, no hook point involved
    import copy

    m = copy.deepcopy(embedded.model)
    m.set_attn_implementation({k: "eager" for k in m.config.sub_configs})
    inputs = PromptBuilder(embedded.processor).inputs([image], [DEFAULT_CAPTION_PROMPT])
    ids = torch.cat([inputs["input_ids"], torch.tensor([embedded.tokenizer(cont, add_special_tokens=False)["input_ids"]])], 1)
    with torch.no_grad():
        att = m(input_ids=ids, pixel_values=inputs["pixel_values"], output_attentions=True).attentions
    ref = torch.stack([a[0] for a in att])  # [L, H, T, T]
    for b, c in caches.items():
        torch.testing.assert_close(c.full_patterns, ref, rtol=0, atol=1e-5, msg=f"backend {b}")
        torch.testing.assert_close(c.liae(), caches["nnsight"].liae(), rtol=0, atol=1e-5)
        torch.testing.assert_close(c.iaf(), caches["nnsight"].iaf(), rtol=0, atol=1e-5)
        torch.testing.assert_close(c.iaf("focused-mass"), caches["nnsight"].iaf("focused-mass"), rtol=0, atol=1e-5)


def test_frames_are_tidy(gen_caches):
    c = gen_caches["nnsight"]
    lf = c.liae_frame()
    assert list(lf.columns) == ["step", "token", "position", "layer", "liae", "variant"]
    assert len(lf) == c.n_steps * c.n_layers
    assert lf.loc[(lf.step == 2) & (lf.layer == 4), "liae"].item() == pytest.approx(c.liae()[2, 4].item())
    hf = c.to_frame()
    assert len(hf) == c.n_steps * c.n_layers * c.n_heads
    assert {"mass_system", "mass_image", "mass_prompt", "mass_generated", "iaf", "image_entropy"} <= set(hf.columns)


@pytest.mark.parametrize("dtype,atol", [("fp32", 0.0), ("fp16", 1e-3)])
def test_cache_save_load_roundtrip(tmp_path, gen_caches, dtype, atol):
    c = gen_caches["nnsight"]
    path = c.save(tmp_path / "cache", dtype=dtype, shard_steps=4)  # several shards
    assert len(list(path.glob("steps-*.pt"))) == -(-c.n_steps // 4)
    d = AttentionCache.load(path, expect_weights_hash=c.meta["weights_hash"])
    assert d.tokens == c.tokens and d.token_strs == c.token_strs and d.image_positions == c.image_positions
    torch.testing.assert_close(d.image_attn, c.image_attn, rtol=0, atol=atol)


def test_streamed_generation_trace(tmp_path, embedded, image, gen_caches):
    c = trace_generation(embedded, image, backend="hooks", max_new_tokens=32, stream_to=tmp_path / "s", dtype="fp32")
    torch.testing.assert_close(c.image_attn, gen_caches["hooks"].image_attn, rtol=0, atol=0)


def test_truncated_or_foreign_cache_is_refused(tmp_path, gen_caches):
    c = gen_caches["nnsight"]
    p = c.save(tmp_path / "c", shard_steps=4)
    with pytest.raises(CacheFileError, match="another|not the model"):
        AttentionCache.load(p, expect_weights_hash="0000")
    shard = sorted(p.glob("steps-*.pt"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CacheFileError, match="truncated"):
        AttentionCache.load(p)
    q = c.save(tmp_path / "d")
    (q / "index.json").unlink()
    with pytest.raises(CacheFileError, match="index.json"):
        AttentionCache.load(q)
    shutil.rmtree(q)


def test_prompt_without_image_token(embedded, image):
    inputs = PromptBuilder(embedded.processor).inputs([image], [DEFAULT_CAPTION_PROMPT])
    ids = inputs["input_ids"].clone()
    ids[ids == embedded.model.config.image_token_id] = embedded.tokenizer.convert_tokens_to_ids("the")
    with pytest.raises(InputError, match="no image token"):
        trace_forward(embedded, None, inputs={**inputs, "input_ids": ids})


def test_image_token_count_mismatch(embedded, image):
    inputs = PromptBuilder(embedded.processor).inputs([image], [DEFAULT_CAPTION_PROMPT])
    img_id = embedded.model.config.image_token_id
    keep = torch.ones(inputs["input_ids"].shape[1], dtype=torch.bool)
    keep[(inputs["input_ids"][0] == img_id).nonzero()[0]] = False  # drop one image token
    bad = {"input_ids": inputs["input_ids"][:, keep], "attention_mask": inputs["attention_mask"][:, keep],
           "pixel_values": inputs["pixel_values"]}
    for backend in ("hooks", "nnsight"):
        with pytest.raises(InputError, match="does not match"):
            trace_forward(embedded, None, inputs=bad, backend=backend)


def test_row_entropy_matches_full_pattern(embedded, image):
    from dleaf_analysis import diagnostics as D

    f = trace_forward(embedded, image, continuation="a photo of", backend="hooks", full_patterns=True)
    P = f.prompt_length
    for s in range(f.n_steps):
        q = P - 1 + s
        rows = f.full_patterns[:, :, q, : q + 1]  # keys the query can see
        torch.testing.assert_close(f.row_entropy[s].float().mean(-1), D.row_entropy(rows), rtol=0, atol=1e-5)


def test_diagnose_table(gen_caches):
    from dleaf_analysis import detectors

    c = gen_caches["nnsight"]
    df = detectors.diagnose(c)
    layer_detectors = detectors.names("layer")
    assert set(df["detector"]) == set(layer_detectors)
    assert len(df) == len(layer_detectors) * c.n_steps * c.n_layers
    liae = df[df.detector == "liae"].set_index(["step", "layer"])["score"]
    assert liae.loc[(1, 3)] == pytest.approx(c.liae()[1, 3].item())
    top = df[(df.detector == "liae") & (df["rank"] == 0)].set_index("step")["layer"]
    assert (top.to_numpy() == c.liae().argmax(-1).numpy()).all()


def test_hooks_trace_streams_each_step_and_agrees(embedded, image, tmp_path):
    """The hook backend summarises each step as it is computed and, with ``stream_to``, writes it out
    when its token is chosen: the streamed cache equals the in-memory one and nnsight's."""
    kw = dict(max_new_tokens=12, generate_kwargs={"min_new_tokens": 12})
    mem = trace_generation(embedded, image, backend="hooks", **kw)
    disk = trace_generation(embedded, image, backend="hooks", stream_to=tmp_path / "c", dtype="fp32", shard_steps=5,
                            **kw)
    ref = trace_generation(embedded, image, backend="nnsight", **kw)
    assert len(list((tmp_path / "c").glob("steps-*.pt"))) == 3  # 12 steps in shards of 5
    assert disk.tokens == mem.tokens == ref.tokens and disk.query_positions == ref.query_positions
    for a, b in ((disk, mem), (mem, ref)):
        torch.testing.assert_close(a.image_attn, b.image_attn, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.mass, b.mass, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.row_entropy, b.row_entropy, rtol=0, atol=1e-5)


def _live_tensor_bytes() -> int:
    """Bytes of every tensor storage Python can reach (each storage counted once)."""
    import gc
    import warnings

    seen, total = set(), 0
    with warnings.catch_warnings():  # isinstance on deprecated module aliases warns
        warnings.simplefilter("ignore")
        for o in gc.get_objects():
            try:
                if isinstance(o, torch.Tensor) and o.device.type == "cpu":
                    st = o.untyped_storage()
                    if st.data_ptr() not in seen:
                        seen.add(st.data_ptr())
                        total += st.nbytes()
            except Exception:  # objects that misreport isinstance (proxies) are skipped
                continue
    return total


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["hooks", "nnsight"])
def test_streamed_trace_memory_does_not_grow_with_steps(tmp_path, backend):
    """Reachable tensor memory during a streamed trace (either backend) stays flat from step 20 to step 100
    (the growth is the KV cache); kept in memory, the steps' summaries grow it by their size, which
    shows the probe can see growth.  (RSS is not used: allocator fragmentation moves it either way.)"""
    from transformers import LogitsProcessor

    from dleaf_analysis.models.inputs import PromptBuilder
    from dleaf_analysis.models.loading import LoadedModel
    from dleaf_analysis.models.tiny import tiny_llava15

    model, proc = tiny_llava15(layers=4, hidden=64, heads=8)
    lm = LoadedModel.wrap(model, proc, "probe")
    img = (np.random.default_rng(0).random((336, 336, 3)) * 255).astype(np.uint8)
    inputs = dict(PromptBuilder(proc).inputs([img], ["describe the image ."], 336))

    class Probe(LogitsProcessor):
        def __init__(self):
            self.step, self.at = 0, {}

        def __call__(self, input_ids, scores):
            if self.step in (20, 100):
                self.at[self.step] = _live_tensor_bytes()
            self.step += 1
            return scores

    def growth(stream: bool) -> float:
        probe = Probe()
        trace_generation(lm, None, inputs=inputs, max_new_tokens=101, backend=backend, shard_steps=8,
                         stream_to=tmp_path / f"c-{backend}" if stream else None,
                         generate_kwargs={"min_new_tokens": 101, "logits_processor": [probe]})
        return probe.at[100] - probe.at[20]

    per_step = 4 * 8 * (576 + 4 + 1) * 4  # bytes of one step's summary: L x H x (n + 4 masses + entropy), fp32
    kept, streamed = growth(False), growth(True)
    assert kept > 0.8 * 80 * per_step, (kept, per_step)
    assert streamed < 0.2 * 80 * per_step, (streamed, kept, per_step)


@pytest.mark.parametrize("backend", ["hooks", "nnsight"])
def test_forward_trace_keeps_only_the_query_rows(embedded, image, backend):
    """A forward trace over a continuation slices each layer's rows as the layer runs: the patterns
    it holds are ``[L, H, Q, T]`` (the prompt's last query and the continuation's), not the full
    ``[L, H, T, T]``; the rows equal the full patterns' rows."""
    from dleaf_analysis.tracing import _forward_patterns

    adapter = ModelAdapter(embedded.model)
    inputs = dict(PromptBuilder(embedded.processor).inputs([image], ["describe the image ."], embedded.image_size))
    T = inputs["input_ids"].shape[1]
    full, _ = _forward_patterns(embedded, adapter, inputs, backend)
    rows, _ = _forward_patterns(embedded, adapter, inputs, backend, rows_from=T - 3)
    assert [tuple(r.shape) for r in rows] == [(adapter.n_heads, 3, T)] * adapter.n_layers
    for f, r in zip(full, rows):
        torch.testing.assert_close(r, f[:, T - 3:])
    c = trace_forward(embedded, image, continuation_ids=[5, 6], backend=backend)
    assert c.full_patterns is None and c.n_steps == 3
