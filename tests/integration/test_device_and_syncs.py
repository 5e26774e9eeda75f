"""D-LEAF, uniform fusion and PAI decide on the device: no host synchronisation inside their
pattern editors during decoding, and their state lives on the device of the tensors it meets.

Why a counting test: no GPU is available here, so a sync is caught where it starts, by counting
calls of every Tensor method that reads a value back to the host (``__bool__``, ``item``,
``tolist``, ``__int__``, ``__float__``, ``__index__``, ``cpu``, ``numpy``) while an editor runs.
On CUDA each of these stalls the launch queue once per layer per token."""

from __future__ import annotations


import pytest
import torch

from dleaf_analysis import hooks
from dleaf_analysis.interventions import PAI, DLeaf, UniformFusion
from dleaf_analysis.profiling import count_host_reads
from dleaf_analysis.models.adapters import ModelAdapter
from dleaf_analysis.models.inputs import PromptBuilder



@pytest.fixture(scope="module")
def lm(hooked):
    return hooked


@pytest.fixture(scope="module")
def inputs(lm, dev_split):
    return dict(PromptBuilder(lm.processor).inputs([dev_split.image(i) for i in range(3)], ["describe the image ."] * 3))


@pytest.fixture
def sync_counter():
    """Host reads made while any pattern editor runs (``dleaf_analysis.profiling.count_host_reads``)."""
    with count_host_reads() as calls:
        yield calls


@pytest.mark.parametrize("cfg", [DLeaf(k=0.0), DLeaf(threshold="bas"), DLeaf(k=0.0, running_seed="prefill-rows"),
                                 DLeaf(k=0.0, fusion="image"), UniformFusion(), PAI()], ids=lambda c: repr(c)[:60])
def test_no_host_sync_inside_editors(lm, inputs, cfg, sync_counter):
    with torch.no_grad():
        _, rec = cfg.decode(lm, inputs, max_new_tokens=8, do_sample=False, pad_token_id=lm.pad_token_id)
    assert sync_counter == [], sorted(set(sync_counter))
    if isinstance(cfg, DLeaf) and cfg.threshold != "bas":
        assert len(rec.log) > 0  # it did fire: the check was not vacuous


def test_the_counter_catches_a_sync(lm, inputs, sync_counter):
    """The instrument can see a positive: an editor that reads a value back is caught."""
    def syncing_editor(pattern, ctx):
        layer = ctx.layer
        if bool(pattern.sum() > 0):
            return pattern
        return pattern

    with hooks.attach_editor(lm.model, syncing_editor, inputs), torch.no_grad():
        lm.model(**inputs)
    assert "__bool__" in sync_counter


def test_dleaf_state_follows_the_pattern_device(lm, inputs):
    """The running statistics are created on the device of the attention they meet (``meta``
    here stands for any non-CPU device): a CPU-created state would raise a device mismatch."""
    from dleaf_analysis.interventions.dleaf import DLeafState
    from dleaf_analysis.models.adapters import ModelAdapter

    ad = ModelAdapter(lm.model)
    state = DLeafState(DLeaf(k=0.0), ad.n_layers, 3)
    K = inputs["input_ids"].shape[1]
    pattern = torch.empty(3, ad.n_heads, 1, K, device="meta")
    mask = ad.image_mask(inputs["input_ids"])
    ctx = hooks.EditContext(image_mask=mask.to("meta"))
    ctx._cache[("pos", "meta")] = tuple(x.to("meta") for x in hooks.image_positions(mask))
    ctx._cache["ragged"] = False
    for layer in range(ad.n_layers):
        ctx.layer, ctx.step = layer, 1
        out = state(pattern, ctx)
        assert out.device.type == "meta"
    assert state.mean.device.type == "meta" and state.n.device.type == "meta"


@pytest.mark.parametrize("cfg", [DLeaf(k=0.0), DLeaf(k=0.0, fusion="image"), UniformFusion(), PAI()],
                         ids=lambda c: repr(c)[:60])
def test_editors_compile_as_one_graph(lm, inputs, cfg, monkeypatch):
    """A decoding step of each editor compiles with ``torch.compile(fullgraph=True)``: no graph break,
    so no data-dependent Python branch and no host read (dynamo's eager backend: no C compiler needed).
    An editor that branches on a tensor value (``if fire.any():``) fails the same check."""
    editors = []
    orig = hooks.attach_editor

    def attach(model, editor, inputs=None):
        editors.append(editor)
        return orig(model, editor, inputs)

    monkeypatch.setattr(hooks, "attach_editor", attach)
    K = inputs["input_ids"].shape[1] + 1
    ad = ModelAdapter(lm.model)
    pattern = torch.rand(3, ad.n_heads, 1, K).softmax(-1)
    with cfg.attach(lm, inputs), hooks.attach_editor(lm.model, lambda p, c: p, inputs) as ctx:
        with torch.no_grad():
            lm.model(**inputs)  # the prefill seeds the method's state
        torch._dynamo.reset()
        step = torch.compile(editors[-2], fullgraph=True, backend="eager")
        for layer in range(ad.n_layers):
            ctx.layer, ctx.step = layer, 1
            assert step(pattern.clone(), ctx).shape == pattern.shape

    def branching(p, ctx):

        layer = ctx.layer
        if (p > 0.5).any():  # a host read: a graph break
            return p * 0
        return p

    torch._dynamo.reset()
    with pytest.raises(Exception, match="(?i)data-dependent|graph break|Unsupported"):
        torch.compile(branching, fullgraph=True, backend="eager")(pattern, hooks.EditContext())

