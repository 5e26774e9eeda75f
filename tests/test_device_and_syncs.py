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
from dleaf_analysis.models.adapters import ModelAdapter
from dleaf_analysis.models.inputs import PromptBuilder

SYNCING = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "cpu", "numpy")


@pytest.fixture(scope="module")
def lm(hooked):
    return hooked


@pytest.fixture(scope="module")
def inputs(lm, dev_split):
    return dict(PromptBuilder(lm.processor).inputs([dev_split.image(i) for i in range(3)], ["describe the image ."] * 3))


@pytest.fixture
def sync_counter(monkeypatch):
    """Host reads made while any pattern editor runs.  Editors are wrapped where they are attached
    (``hooks.attach_editor``), so the count does not depend on how the hook point's ``forward`` is
    dispatched (nnsight, for one, re-binds module forwards of models it has wrapped)."""
    calls: list[str] = []
    inside = [0]
    orig_attach = hooks.attach_editor

    def attach_editor(model, editor):
        def counted(pattern, layer):
            inside[0] += 1
            try:
                return editor(pattern, layer)
            finally:
                inside[0] -= 1
        return orig_attach(model, counted)

    monkeypatch.setattr(hooks, "attach_editor", attach_editor)
    for name in SYNCING:
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, _orig=orig, _name=name, **k):
            if inside[0]:
                calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    return calls


@pytest.mark.parametrize("cfg", [DLeaf(k=0.0), DLeaf(threshold="bas"), DLeaf(k=0.0, running_seed="prefill-rows"),
                                 DLeaf(k=0.0, fusion="image"), UniformFusion(), PAI()], ids=lambda c: repr(c)[:60])
def test_no_host_sync_inside_editors(lm, inputs, cfg, sync_counter):
    with torch.no_grad():
        cfg.generate(lm, inputs, max_new_tokens=8, do_sample=False, pad_token_id=lm.pad_token_id)
    assert sync_counter == [], sorted(set(sync_counter))
    if isinstance(cfg, DLeaf) and cfg.threshold != "bas":
        assert len(cfg.log) > 0  # it did fire: the check was not vacuous


def test_the_counter_catches_a_sync(lm, inputs, sync_counter):
    """The instrument can see a positive: an editor that reads a value back is caught."""
    def syncing_editor(pattern, layer):
        if bool(pattern.sum() > 0):
            return pattern
        return pattern

    with hooks.attach_editor(lm.model, syncing_editor), torch.no_grad():
        lm.model(**inputs)
    assert "__bool__" in sync_counter


def test_dleaf_state_follows_the_pattern_device(lm, inputs):
    """The running statistics are created on the device of the attention they meet (``meta``
    here stands for any non-CPU device): a CPU-created state would raise a device mismatch."""
    from dleaf_analysis.interventions import _DLeafState
    from dleaf_analysis.models.adapters import ModelAdapter

    ad = ModelAdapter(lm.model)
    state = _DLeafState(DLeaf(k=0.0), ad, inputs)
    K = inputs["input_ids"].shape[1]
    pattern = torch.empty(3, ad.n_heads, 1, K, device="meta")
    for layer in range(ad.n_layers):
        out = state(pattern, layer)
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

    def attach(model, editor):
        editors.append(editor)
        return orig(model, editor)

    monkeypatch.setattr(hooks, "attach_editor", attach)
    K = inputs["input_ids"].shape[1] + 1
    ad = ModelAdapter(lm.model)
    pattern = torch.rand(3, ad.n_heads, 1, K).softmax(-1)
    with cfg.attach(lm, inputs):
        with torch.no_grad():
            lm.model(**inputs)  # the prefill seeds the method's state
        torch._dynamo.reset()
        step = torch.compile(editors[-1], fullgraph=True, backend="eager")
        for layer in range(ad.n_layers):
            assert step(pattern.clone(), layer).shape == pattern.shape

    def branching(p, layer):
        if (p > 0.5).any():  # a host read: a graph break
            return p * 0
        return p

    torch._dynamo.reset()
    with pytest.raises(Exception, match="(?i)data-dependent|graph break|Unsupported"):
        torch.compile(branching, fullgraph=True, backend="eager")(pattern, 0)

