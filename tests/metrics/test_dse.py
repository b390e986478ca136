"""DSE metric, regularizer, lambda step and checkpoint selection (docs/dse.md; reference values measured with the official estimator.py)."""

from __future__ import annotations

import importlib
import inspect
import math
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from densessl.metrics import (
    DSEOptions,
    DSEResult,
    centered_singular_sum,
    dse,
    dse_over_batches,
    dse_regularizer,
    effective_rank,
    lambda_normalized_dse,
    select_checkpoints,
)
from densessl.metrics.dse import _METRIC, _REGULARIZER
from densessl.metrics.kmeans import lloyd, weighted_draw
from densessl.metrics.spectra import singular_values

# The module, not the function densessl.metrics re-exports under the same name.
dse_module = importlib.import_module("densessl.metrics.dse")

B, N, D = 16, 196, 384


def _gaussian(seed: int = 0, shape: tuple[int, ...] = (B, N, D)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _separated() -> torch.Tensor:
    """Official-estimator case: tokens are one of 24 one-hot prototypes, 3 per image (image b uses 3(b mod 8)..+2)."""
    proto = 3 * (torch.arange(B)[:, None] % 8) + torch.arange(N)[None] % 3
    return torch.eye(D)[proto]


def _separated_s() -> float:
    """s by hand: token counts per prototype and the distance of each one-hot to the mean."""
    counts = np.bincount(_separated().argmax(-1).flatten().numpy(), minlength=24).astype(float)
    freq = counts / counts.sum()
    dist = np.sqrt((1 - freq) ** 2 + (freq**2).sum() - freq**2)  # |e_j - mean|
    return float((freq * dist).sum())


@pytest.fixture(scope="module")
def gaussian_result() -> DSEResult:
    return dse(_gaussian())


@pytest.fixture(scope="module")
def separated_result() -> DSEResult:
    return dse(_separated())


# ----------------------------------------------------------------------------- estimators


def test_effective_rank_identity_and_rank_one():
    assert effective_rank(torch.eye(384)).item() == pytest.approx(1.0, abs=1e-6)
    rank_one = _gaussian(1, (100, 1)) @ _gaussian(2, (1, 50))
    assert effective_rank(rank_one).item() == pytest.approx(0.02, abs=1e-6)


def test_centered_singular_sum_hand_and_gaussian():
    # centred rows (+-1, 0): singular values (sqrt 2, 0), divided by sqrt(max(1, 2))
    assert centered_singular_sum(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])).item() == pytest.approx(1.0)
    # one draw of the official code: ~62.96 for N(0,1) 65x384
    assert centered_singular_sum(_gaussian(3, (65, 384))).item() == pytest.approx(62.96, rel=0.03)


@pytest.mark.parametrize("rows", [20, 40])  # Gram rows x rows (20 <= d) or covariance d x d
def test_gram_path_matches_svdvals_path(rows):
    x = _gaussian(4, (5, rows, 30)).double()
    fast = effective_rank(x), centered_singular_sum(x)  # no grad: float64 Gram eigenvalues
    x.requires_grad_(True)
    exact = effective_rank(x), centered_singular_sum(x)  # grad: svdvals
    for a, b in zip(fast, exact):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("rows", [12, 40])
def test_masked_centred_singular_values_equal_those_of_the_member_rows(rows):
    x = _gaussian(5, (4, rows, 30)).double() + 3.0  # offset: centring matters
    member = torch.rand(4, rows, generator=torch.Generator().manual_seed(6)) < 0.6
    member[:, :2] = True
    got = singular_values(x, member, centre=True).sum(-1)
    for p in range(4):
        rows_p = x[p][member[p]]
        expected = torch.linalg.svdvals(rows_p - rows_p.mean(0)).sum()
        torch.testing.assert_close(got[p], expected, rtol=1e-6, atol=0)  # ~sqrt(eps64) from Gram


@pytest.mark.parametrize("rows", [40, 100])  # Gram rows x rows (40 <= d) or covariance d x d
def test_float32_gram_path_agrees_with_float64_on_full_rank_rows(rows):
    x = _gaussian(18, (4, rows, 64)) + 3.0  # offset: row-side centring in float32 must not cancel
    member = torch.rand(4, rows, generator=torch.Generator().manual_seed(19)) < 0.7
    fast = singular_values(x, member, centre=True).sort(-1).values  # float32 Gram, resolved
    exact = singular_values(x.double(), member, centre=True).sort(-1).values
    torch.testing.assert_close(fast, exact, rtol=0, atol=1e-5 * exact.max().item())
    torch.testing.assert_close(fast.sum(-1), exact.sum(-1), rtol=1e-6, atol=0)


def test_float32_gram_path_recomputes_low_rank_spectra_in_float64():
    # rank 4 in 64 dims: a float32 Gram leaves the 60 zero singular values at ~3e-4 sigma_max
    # (measured), enough to shift css and M_dim; the unresolved spectra are redone in float64.
    x = _gaussian(20, (3, 100, 4)) @ _gaussian(21, (4, 64))
    sigma = singular_values(x, centre=True).sort(-1).values
    assert (sigma[:, :-4] < 1e-6 * sigma[:, -1:]).all()
    torch.testing.assert_close(sigma[:, -4:], singular_values(x.double(), centre=True).sort(-1).values[:, -4:])


# ----------------------------------------------------------------------------- k-means


def _reference_lloyd(x: torch.Tensor, c: torch.Tensor, iters: int, tol: float):
    """Per-problem loop of estimator.py (empty cluster keeps its centroid, labels before last update)."""
    for _ in range(iters):
        labels = torch.cdist(x, c).argmin(1)
        new = torch.stack([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(len(c))])
        shift = (new - c).norm()
        c = new
        if shift < tol:
            break
    return c, labels


def test_batched_lloyd_freezes_each_problem_like_the_reference_loop():
    gen = torch.Generator().manual_seed(5)
    # problems that converge after different numbers of steps, one with an empty cluster
    x = torch.randn(6, 60, 8, generator=gen, dtype=torch.float64)
    x[:3, :30] += 6.0
    init = x[:, :4].clone()
    init[1, 3] = 100.0  # far away: stays empty and must keep its centroid
    centroids, labels = lloyd(x, init, iters=20, tol=1e-4, rules=_METRIC, generator=gen)
    for p in range(len(x)):
        c, lab = _reference_lloyd(x[p], init[p], 20, 1e-4)
        torch.testing.assert_close(centroids[p], c)
        assert torch.equal(labels[p], lab)
    assert centroids[1, 3].eq(100.0).all()


def test_regularizer_lloyd_reassigns_and_reseeds_empty_clusters():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 50, 4, generator=gen, dtype=torch.float64)
    init = x[:, :3].clone()
    init[:, 2] = 100.0
    centroids, labels = lloyd(x, init, iters=1, tol=1e-4, rules=_REGULARIZER, generator=gen)
    assert (centroids[:, 2].abs() < 100).all()  # re-initialised at a token
    d = torch.cdist(x, centroids)
    assert torch.equal(labels, d.argmin(-1))  # labels of the final centroids


# ----------------------------------------------------------------------------- metric facts


def test_gaussian_matches_official_values(gaussian_result):
    # measured with the official estimator.py, B=16: (inter, intra_img, intra_batch, dim, DSE)
    got = gaussian_result
    expected = (1.0005, 3.2055, 3.1866, 0.9951, -1.2004)
    actual = (got.inter, got.intra_img, got.intra_batch, got.dim, got.value)
    np.testing.assert_allclose(actual, expected, atol=1e-2)
    assert got.value == pytest.approx(got.inter + got.dim - (got.intra_img + got.intra_batch) / 2)


def test_perfect_separation(separated_result):
    got = separated_result
    # float64 Gram eigenvalues leave ~sqrt(eps64) per zero singular value
    assert got.intra_img == pytest.approx(0.0, abs=1e-6)
    assert got.intra_batch == pytest.approx(0.0, abs=1e-6)
    # every token is sqrt(2) from every other prototype
    assert got.inter == pytest.approx(math.sqrt(2) / _separated_s(), rel=1e-6)
    assert got.inter == pytest.approx(1.4446, abs=1e-4)
    assert got.dim == pytest.approx(0.8185, abs=0.02)  # random per-position draws
    assert got.value == pytest.approx(2.2631, abs=0.02)


def test_invariant_to_scale_without_normalisation_and_to_rotation():
    x = _gaussian(13, (8, 49, 64))
    raw = dse(x, normalize=False).as_dict()
    scaled = dse(10 * x, normalize=False).as_dict()
    np.testing.assert_allclose(list(raw.values()), list(scaled.values()), atol=1e-6)
    rotation = torch.linalg.qr(_gaussian(1, (64, 64)).double())[0].float()
    normalised, rotated = dse(x).as_dict(), dse(x @ rotation).as_dict()
    np.testing.assert_allclose(list(rotated.values()), list(normalised.values()), atol=1e-5)
    positive = torch.rand(8, 49, 1, generator=torch.Generator().manual_seed(14)) + 0.5
    scaled_tokens = dse(x * positive).as_dict()
    np.testing.assert_allclose(list(scaled_tokens.values()), list(normalised.values()), atol=1e-6)


def test_structure_destroyed_by_noise_lowers_dse(separated_result):
    noisy = dse(_separated() + 0.05 * _gaussian(2))
    assert separated_result.value > noisy.value > -1.2
    assert noisy.value == pytest.approx(-0.1763, abs=0.1)  # official estimator: sigma=0.05 -> -0.1763


def test_rank_four_features():
    # official estimator: M_dim 0.2431, DSE 0.4209; exact low rank is where a float32 Gram would inflate M_dim
    basis = torch.linalg.qr(_gaussian(16, (D, 4)))[0]
    result = dse(_gaussian(17, (B, N, 4)) @ basis.T)
    assert result.dim == pytest.approx(0.2431, abs=0.005)
    assert result.value == pytest.approx(0.4209, abs=0.02)


def test_collapsed_features_finite_with_warning():
    shape = (8, 49, 64)
    v = _gaussian(7, shape[-1:])
    nearly = v + 1e-6 * _gaussian(8, shape)
    with pytest.warns(RuntimeWarning, match="collapsed"):
        result = dse(nearly)
    assert all(math.isfinite(t) for t in result.as_dict().values())
    for exact in (v.expand(shape), torch.zeros(shape)):
        with pytest.warns(RuntimeWarning, match="collapsed"):
            result = dse(exact)
        np.testing.assert_allclose([result.inter, result.intra_img, result.intra_batch], 0.0, atol=1e-6)
        assert result.dim == pytest.approx(1 / 8)  # a single direction: rank 1 over min(B, D)


@pytest.mark.parametrize("spread", [1e-5, 1.0])
def test_float32_centring_falls_back_to_float64_near_collapse(monkeypatch, spread):
    # float32 inputs are normalised and centred in float32 unless s < 1e-2 rms; at spread 1e-5 the
    # float32 rounding of the normalised tokens moves intra_img by ~1e-3 (measured), so the default
    # must equal the float64 centring (threshold inf) there, and stay within 1e-6 of it on spread data.
    x = _gaussian(7, (D // 6,)) + spread * _gaussian(8, (8, 49, D // 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        default = dse(x)
        monkeypatch.setattr(dse_module, "_FLOAT32_SPREAD", math.inf)
        float64 = dse(x)
    for name, value in default.as_dict().items():
        assert value == pytest.approx(getattr(float64, name), rel=1e-6), name


def test_weighted_draw_never_draws_zero_weights_and_follows_the_weights():
    weight = torch.tensor([[0.0, 1.0, 0.0, 3.0, 0.0]]).expand(20_000, 5)
    picks = weighted_draw(weight, torch.Generator().manual_seed(0))
    counts = torch.bincount(picks, minlength=5)
    assert counts[[0, 2, 4]].sum() == 0
    assert counts[3] / counts.sum() == pytest.approx(0.75, abs=0.01)
    tiny = torch.tensor([[1e-30, 0.0, 0.0]])  # u is kept below the total: never past the last positive weight
    assert weighted_draw(tiny, torch.Generator().manual_seed(1)).item() == 0


def test_deterministic_and_global_rng_untouched():
    x = _gaussian(9, (8, 49, 64))
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    first, second, other = dse(x, seed=3), dse(x, seed=3), dse(x, seed=4)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert first == second
    assert first != other
    assert first.value == pytest.approx(other.value, abs=0.05)


def test_same_value_on_one_or_two_worker_threads(monkeypatch):
    """Chunks run on parallel workers with per-chunk generators: the thread count and the order
    in which workers finish must not change the value; torch's thread count is restored."""
    import importlib

    monkeypatch.setattr(importlib.import_module("densessl.metrics.dse"), "_CHUNK_BYTES", 40_000)  # many chunks
    x = _gaussian(11, (16, 49, 64))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = dse(x, seed=5)
        torch.set_num_threads(2)
        parallel = dse(x, seed=5)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert serial == parallel


def test_options_rank_draws_seeding_paper_variant_and_partial_group():
    x = _gaussian(10, (12, 49, 64))  # 12 images: one group of 8 and one of 4
    base = dse(x)
    assert dse(x, rank_draws=10).dim == pytest.approx(base.dim, abs=0.02)
    assert dse(x, seeding="d2").value == pytest.approx(base.value, abs=0.05)
    paper = dse(x, variant="paper")
    assert all(math.isfinite(t) for t in paper.as_dict().values())
    assert paper.dim > 1  # un-normalised effective rank


def test_over_batches_averages_terms_with_equal_weight(separated_result, gaussian_result):
    separated = _separated()
    assert dse_over_batches([separated]) == separated_result
    mixed = dse_over_batches([separated, _gaussian()])
    for name in ("inter", "intra_img", "intra_batch", "dim"):
        expected = (getattr(separated_result, name) + getattr(gaussian_result, name)) / 2
        assert getattr(mixed, name) == pytest.approx(expected, abs=0.01)  # Gaussian half: new draws
    assert mixed.value == pytest.approx(mixed.inter + mixed.dim - (mixed.intra_img + mixed.intra_batch) / 2)


@pytest.mark.parametrize(
    ("features", "options", "match"),
    [
        (torch.zeros(4, 5), {}, "shape"),
        (torch.zeros(2, 5, 3, dtype=torch.long), {}, "floating"),
        (torch.full((2, 5, 3), math.nan), {}, "non-finite"),
        (torch.randn(2, 2, 3), {}, "at least 3 tokens"),
        (torch.randn(2, 5, 3), {"variant": "eq5"}, "variant"),
        (torch.randn(2, 5, 3), {"seeding": "d3"}, "seeding"),
        (torch.randn(2, 5, 3), {"rank_draws": 6}, "rank_draws"),
        (torch.randn(2, 5, 3), {"group_size": 0}, "group_size"),
    ],
)
def test_bad_input_raises(features, options, match):
    with pytest.raises(ValueError, match=match):
        dse(features, **options)


# ----------------------------------------------------------------------------- regularizer


def test_regularizer_hand_value_on_separated_tokens():
    value = dse_regularizer(_separated())
    # intra terms 0; M_dim = er of all B*N one-hot tokens: sigma_j = sqrt(count_j)
    counts = np.bincount(_separated().argmax(-1).flatten().numpy(), minlength=24)
    p = np.sqrt(counts) / np.sqrt(counts).sum() + 1e-12
    er = np.exp(-(p * np.log(p)).sum() - 1e-12 * (D - 24) * np.log(1e-12)) / D
    assert value.item() == pytest.approx(math.sqrt(2) / _separated_s() + er, rel=1e-5)


def test_regularizer_gradient_and_rng():
    x = _gaussian(11, (8, 49, 64)).requires_grad_(True)
    state = torch.get_rng_state()
    value = dse_regularizer(x)
    (-value).backward()
    assert torch.equal(torch.get_rng_state(), state)
    assert value.shape == () and math.isfinite(value.item())
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    gen = torch.Generator().manual_seed(0)
    assert dse_regularizer(x.detach(), generator=gen).item() == pytest.approx(value.item(), abs=1e-4)


def _official_dse_float64(f: torch.Tensor, local_labels: torch.Tensor, group_labels: torch.Tensor,
                          k_group: int) -> torch.Tensor:
    """DSE_regularizer.py's compute_DSE_loss restated in float64 with given k-means labels (one group)."""
    b, n, d = f.shape
    x = torch.nn.functional.normalize(f, dim=-1)
    avg_l2 = torch.norm(x - x.mean(dim=(0, 1), keepdim=True), dim=-1).mean()

    def css(c):
        return torch.linalg.svdvals(c - c.mean(0, keepdim=True)).sum() / math.sqrt(max(c.shape[0] - 1, d))

    per_image = []
    for i in range(b):
        ranks = [css(x[i][local_labels[i] == c]) for c in local_labels[i].unique() if (local_labels[i] == c).sum() > 1]
        per_image.append(torch.stack(ranks).mean())
    intra_img = torch.stack(per_image).mean() / (avg_l2 + 1e-12)
    flat = x.reshape(-1, d)
    centroids = torch.stack([flat[group_labels == c].mean(0) for c in range(k_group)]).detach()  # converged k-means
    dist = torch.cdist(flat, centroids)
    own = torch.nn.functional.one_hot(group_labels, k_group).bool()
    inter = (dist + own * 1e9).min(1).values.mean() / (avg_l2 + 1e-12)
    intra_batch = torch.stack([css(flat[group_labels == c]) for c in range(k_group)]).mean() / (avg_l2 + 1e-12)
    sigma = torch.linalg.svdvals(flat)
    p = sigma / (sigma.sum() + 1e-12) + 1e-12
    dim = torch.exp(-(p * p.log()).sum()) / min(flat.shape)
    return inter + dim - 0.5 * (intra_batch + intra_img)


def test_regularizer_gradient_equals_the_official_formula_on_separated_clusters():
    # 2 images x 2 well-separated clusters each (4 in the group): every k-means finds the true partition.
    g = torch.Generator().manual_seed(5)
    b, n, d, k_local, k_group = 2, 24, 10, 2, 4
    centres = 3.0 * torch.eye(d)[:k_group] + 1.0  # distinct directions, a common offset (non-zero batch mean)
    local_labels = (torch.arange(n) % 2).repeat(b, 1)  # (b, n)
    group_labels = (local_labels + 2 * torch.arange(b)[:, None]).reshape(-1)
    f = (centres[group_labels] + 0.05 * torch.randn(b * n, d, generator=g, dtype=torch.float64)).reshape(b, n, d)
    f = f.double().requires_grad_(True)
    value = dse_regularizer(f, local_clusters=k_local, global_clusters=k_group, group_size=b)
    (grad,) = torch.autograd.grad(value, f)
    f_ref = f.detach().clone().requires_grad_(True)
    reference = _official_dse_float64(f_ref, local_labels, group_labels, k_group)
    (grad_ref,) = torch.autograd.grad(reference, f_ref)
    assert value.item() == pytest.approx(reference.item(), rel=1e-9)  # also: k-means found the true clusters
    torch.testing.assert_close(grad, grad_ref, rtol=1e-6, atol=1e-9 * grad_ref.abs().max().item())


def test_regularizer_gradient_finite_on_duplicate_tokens():
    # every image is one repeated token: duplicate centroids and zero distances
    x = _gaussian(15, (4, 1, 32)).expand(4, 49, 32).contiguous().requires_grad_(True)
    dse_regularizer(x).backward()
    assert torch.isfinite(x.grad).all()


def test_regularizer_reduces_k_for_small_groups():
    x = _gaussian(12, (2, 5, 16))  # 10 tokens per group < 24 clusters
    assert math.isfinite(dse_regularizer(x).item())


# ----------------------------------------------------------------------------- lambda step


def test_lambda_normalisation_hand_example():
    inter, intra, dim = [1.0, 1.2, 1.1], [0.5, 0.6, 0.4], [0.2, 0.6, 0.4]
    # S = (0.5, 0.6, 0.7), std 0.0816; D std 0.1633 -> lambda 0.5
    expected = [0.5 + 0.1, 0.6 + 0.3, 0.7 + 0.2]
    np.testing.assert_allclose(lambda_normalized_dse(inter=inter, intra=intra, dim=dim), expected)
    results = [
        DSEResult(value=0.0, inter=i, intra_img=t - 0.1, intra_batch=t + 0.1, dim=d)
        for i, t, d in zip(inter, intra, dim)
    ]
    np.testing.assert_allclose(lambda_normalized_dse(results), expected)


def test_lambda_normalisation_guards():
    with pytest.warns(RuntimeWarning, match="zero spread"):
        final = lambda_normalized_dse(inter=[1.0, 2.0], intra=[0.0, 0.0], dim=[0.5, 0.5])
    np.testing.assert_allclose(final, [1.5, 2.5])
    with pytest.raises(ValueError, match="length"):
        lambda_normalized_dse(inter=[1.0, 2.0], intra=[0.0], dim=[0.5, 0.5])
    with pytest.raises(ValueError, match="results"):
        lambda_normalized_dse(inter=[1.0])


# ----------------------------------------------------------------------------- selection


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.1, 0.5, 0.3, 0.2, 0.9, 0.4, 0.4, 0.6, 0.6, 0.1], [4, 7, 8]),  # epochs 50/80/90
        (list(range(10)), [9]),
        ([1.0] * 10, [0, 1, 2]),
    ],
)
def test_select_checkpoints_reference_cases(values, expected):
    assert select_checkpoints(values) == expected


def test_select_checkpoints_window_and_top():
    values = [0.0, 3.0, 0.0, 0.0, 2.0, 0.0, 1.0]
    assert select_checkpoints(values, top=5, window=1) == [1, 4, 6]
    assert select_checkpoints(values, top=5, window=2) == [1, 4]  # 6 loses to 4 within +-2
    assert select_checkpoints(values, top=1) == [1]
    with pytest.raises(ValueError, match="NaN"):
        select_checkpoints([0.1, math.nan])


# ----------------------------------------------------------------------------- options


def test_configs_restate_the_option_defaults():
    """DSEOptions is the home of the DSE defaults (and evaluate_dse of the sampling ones): every config
    block that lists them states the same values."""
    from densessl.evaluation.protocols import evaluate_dse

    root = Path(__file__).resolve().parents[2] / "configs"
    defaults = asdict(DSEOptions())
    sampling = {k: p.default for k, p in inspect.signature(evaluate_dse).parameters.items()
                if k in ("num_images", "image_size", "batch_size", "dse_batch")}
    blocks = {"dse.regularizer": OmegaConf.load(root / "train.yaml").dse.regularizer,
              "callbacks.dse": OmegaConf.load(root / "callbacks" / "dse.yaml").dse,
              "eval.options": OmegaConf.load(root / "eval" / "dse.yaml").options}
    for name, block in blocks.items():
        values = OmegaConf.to_container(block, resolve=False)
        listed = {k: v for k, v in values.items() if k in defaults}
        assert listed and listed == {k: defaults[k] for k in listed}, name
    listed = {k: v for k, v in OmegaConf.load(root / "eval" / "dse.yaml").options.items() if k in sampling}
    assert listed == sampling


def test_misspelt_option_names_itself():
    with pytest.raises(ValueError, match=r"DSEOptions.global_clusers is not an option \(did you mean "
                                         r"DSEOptions.global_clusters\?\)"):
        dse(_gaussian(), global_clusers=6)
    with pytest.raises(ValueError, match="rank_draws is an option of the DSE metric only"):
        dse_regularizer(_gaussian(), rank_draws=4)
    # Config blocks are read at construction, naming the config key.
    from densessl.callbacks import DSEMonitor
    from densessl.methods import NeCo

    with pytest.raises(ValueError, match=r"callbacks.dse.global_clusers is not an option \(did you mean "
                                         r"callbacks.dse.global_clusters\?\)"):
        DSEMonitor(None, num_images=8, global_clusers=6)
    with pytest.raises(ValueError, match=r"dse.regularizer.global_clusers is not an option \(did you mean "
                                         r"dse.regularizer.global_clusters\?\)"):
        NeCo(backbone=dict(name="vit_tiny", model_kwargs=dict(depth=1, embed_dim=32, num_heads=2, patch_size=8)),
             optim=dict(lr=1e-3), head=dict(hidden_dim=16, out_dim=8), queue_size=0,
             dse_regularizer=dict(weight=0.001, global_clusers=6))
