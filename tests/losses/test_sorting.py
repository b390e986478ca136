"""Differentiable sorting network: properties of diffsort 0.2.0's networks and diffsort parity."""

import math

import pytest
import torch

from densessl.losses.sorting import _network, soft_permutation

NETWORKS = ("bitonic", "odd_even")


def _uniform(shape, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen, dtype=dtype) * 2 - 1


@pytest.mark.parametrize("distribution", ["cauchy", "logistic"])
def test_two_inputs_match_hand_computed_comparator(distribution):
    a, b, s = 0.3, 0.25, 10.0
    v = s * (b - a)
    alpha = 0.5 + math.atan(v) / math.pi if distribution == "cauchy" else 1 / (1 + math.exp(-v))
    p = soft_permutation(torch.tensor([a, b], dtype=torch.float64), s, distribution=distribution)
    # min goes to rank 0: input 0 (a) lands there with weight alpha.
    expected = torch.tensor([[alpha, 1 - alpha], [1 - alpha, alpha]], dtype=torch.float64)
    torch.testing.assert_close(p, expected)


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("n", [5, 49])
def test_doubly_stochastic_and_sorted_output(network, n):
    x = _uniform((16, n))
    p = soft_permutation(x, 100.0, network)
    assert p.shape == (16, n, n)
    ones = torch.ones(16, n, dtype=torch.float64)
    torch.testing.assert_close(p.sum(-1), ones, atol=1e-12, rtol=0)
    torch.testing.assert_close(p.sum(-2), ones, atol=1e-12, rtol=0)
    assert p.min() >= 0
    soft_sorted = (x.unsqueeze(-2) @ p).squeeze(-2)
    assert (soft_sorted.diff(dim=-1) >= 0).all()


@pytest.mark.parametrize("network", NETWORKS)
def test_shift_invariance_and_scale_equals_steepness(network):
    x = _uniform((8, 12))
    p = soft_permutation(x, 100.0, network)
    torch.testing.assert_close(soft_permutation(x + 3.7, 100.0, network), p, atol=1e-10, rtol=0)
    torch.testing.assert_close(
        soft_permutation(2.5 * x, 40.0, network), soft_permutation(x, 100.0, network), atol=1e-12, rtol=0
    )


@pytest.mark.parametrize(("gap", "mean_diagonal"), [(1.0, 0.967), (0.1, 0.705), (0.04, 0.398)])
def test_sorted_input_diagonal_depends_on_gap(gap, mean_diagonal):
    # diffsort (NumPy port): mean diagonal 0.97 / 0.70 / 0.40 at steepness 100, n=49.
    x = torch.arange(49, dtype=torch.float64) * gap
    assert soft_permutation(x).diagonal().mean().item() == pytest.approx(mean_diagonal, abs=2e-3)


def test_reversed_input_gives_anti_diagonal():
    x = torch.arange(49, 0, -1, dtype=torch.float64)
    p = soft_permutation(x)
    assert p.flip(-1).diagonal().mean() > 0.96
    assert p.argmax(-1).tolist() == list(range(48, -1, -1))


@pytest.mark.parametrize("network", NETWORKS)
def test_steep_sort_is_the_hard_permutation(network):
    x = torch.randperm(20, generator=torch.Generator().manual_seed(1)).double()
    p = soft_permutation(x, 1e6, network)
    hard = torch.zeros(20, 20, dtype=torch.float64)
    hard[torch.arange(20), x.long()] = 1.0  # input m with value k lands at rank k
    torch.testing.assert_close(p, hard, atol=1e-4, rtol=0)


def test_leading_dims_and_single_element():
    x = _uniform((2, 3, 7))
    torch.testing.assert_close(soft_permutation(x), soft_permutation(x.reshape(6, 7)).reshape(2, 3, 7, 7))
    assert soft_permutation(torch.tensor([0.5])).tolist() == [[1.0]]


def test_bitonic_49_pads_to_64_wires_with_21_layers():
    net = _network("bitonic", 49)
    assert (net.width, net.pad, len(net.layers)) == (64, 15, 21)


def test_min_probability_is_positive_in_float32():
    # fact 5: bitonic at steepness 100 keeps log P finite without an epsilon.
    p = soft_permutation(_uniform((512, 49), dtype=torch.float32))
    assert p.min() > 0
    assert torch.isfinite(p.log()).all()


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("n", [5, 6])
def test_gradcheck(network, n):
    x = _uniform((2, n)).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: soft_permutation(v, 10.0, network), (x,))


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("n", [5, 49, 64])
@pytest.mark.parametrize("distribution", ["cauchy", "logistic"])
def test_parity_with_diffsort(network, n, distribution):
    diffsort = pytest.importorskip("diffsort")
    sorter = diffsort.DiffSortNet(network, n, steepness=100.0, distribution=distribution)
    x = _uniform((8, n))
    ours = soft_permutation(x, 100.0, network, distribution)
    torch.testing.assert_close(ours, sorter(x)[1], atol=1e-10, rtol=0)
    # float32: rounding piles up over the layers; diffsort's own float32 error vs float64 is
    # ~1e-5 for bitonic and up to ~7e-5 for the 49-64 layers of odd_even.
    x32 = x.float()
    atol = 2e-5 if network == "bitonic" else 1e-4
    ours = soft_permutation(x32, 100.0, network, distribution)
    torch.testing.assert_close(ours, sorter(x32)[1], atol=atol, rtol=0)


def test_gradient_parity_with_diffsort():
    diffsort = pytest.importorskip("diffsort")
    sorter = diffsort.DiffSortNet("bitonic", 49, steepness=100.0)
    x = _uniform((4, 49)).requires_grad_()
    weights = _uniform((4, 49, 49), seed=1)
    (ours,) = torch.autograd.grad((soft_permutation(x) * weights).sum(), x)
    (theirs,) = torch.autograd.grad((sorter(x)[1] * weights).sum(), x)
    torch.testing.assert_close(ours, theirs, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"network": "bubble"}, "network"),
        ({"distribution": "gaussian"}, "distribution"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        soft_permutation(torch.zeros(4), **kwargs)


@pytest.mark.parametrize("x", [torch.tensor(1.0), torch.zeros(3, 0), torch.arange(4)])
def test_bad_inputs_raise(x):
    with pytest.raises(ValueError, match="x must"):
        soft_permutation(x)
