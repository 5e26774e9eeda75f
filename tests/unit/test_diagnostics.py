"""Hand-computed oracle tests of LIAE, IAF and the uniform detectors (docs/method.md)."""

import math

import pytest
import torch

from dleaf_analysis import diagnostics as D

# two heads, four keys; keys 1 and 2 are image tokens
A = torch.tensor([[0.1, 0.3, 0.3, 0.3],   # head 0: image part [0.3, 0.3] -> uniform, H = 1
                  [0.2, 0.6, 0.0, 0.2]])  # head 1: image part [0.6, 0.0] -> one-hot, H = 0
IMG = torch.tensor([False, True, True, False])


def h2(p):
    return -sum(x * math.log(x) for x in p if x > 0) / math.log(len(p))


def test_liae_mean_map_hand_computed():
    # head-averaged image attention [0.45, 0.15] -> renormalised [0.75, 0.25]
    assert D.liae(D.image_attention(A, IMG)).item() == pytest.approx(h2([0.75, 0.25]))
    assert D.liae(D.image_attention(A, IMG)).item() == pytest.approx(0.8112781, abs=1e-6)


def test_liae_mean_entropy_hand_computed():
    assert D.liae(D.image_attention(A, IMG), "mean-entropy").item() == pytest.approx(0.5)


def test_iaf_hand_computed():
    a_img = D.image_attention(A, IMG)
    assert D.iaf(a_img).tolist() == pytest.approx([0.6, 0.6])
    assert D.iaf(a_img, "focused-mass").tolist() == pytest.approx([0.0, 0.6])


def test_uniform_detectors_hand_computed():
    assert D.layer_image_mass(D.image_attention(A, IMG)).item() == pytest.approx(0.6)
    expect = (h2([0.1, 0.3, 0.3, 0.3]) + h2([0.2, 0.6, 0.0, 0.2])) / 2
    assert D.row_entropy(A).item() == pytest.approx(expect)


def test_zero_image_mass_is_guarded():
    a = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    a_img = D.image_attention(a, IMG)
    assert D.head_entropy(a_img).item() == pytest.approx(1.0)  # treated as uniform, no NaN
    assert torch.isfinite(D.liae(a_img))


def test_vectorised_over_leading_dims():
    x = torch.rand(5, 3, 2, 4).softmax(-1)  # [steps, layers, heads, keys]
    a_img = D.image_attention(x, IMG)
    assert D.liae(a_img).shape == (5, 3)
    assert D.iaf(a_img).shape == (5, 3, 2)
    # the vectorised value equals the per-item computation
    assert D.liae(a_img)[4, 2].item() == pytest.approx(D.liae(a_img[4, 2]).item())


def test_entropy_bounds():
    n = 7
    assert D.normalized_entropy(torch.full((n,), 1 / n)).item() == pytest.approx(1.0)
    assert D.normalized_entropy(torch.eye(n)[0]).item() == pytest.approx(0.0)


def test_unknown_variant():
    with pytest.raises(ValueError, match="choose one of"):
        D.liae(torch.rand(2, 3), "max")
    with pytest.raises(ValueError, match="choose one of"):
        D.iaf(torch.rand(2, 3), "top")
