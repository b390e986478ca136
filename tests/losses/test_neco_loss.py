"""NeCo sort loss: properties of vpariza/NeCo's loss and of diffsort 0.2.0's networks (docs/objectives/neco.md)."""

import math

import pytest
import torch
import torch.nn.functional as F

from densessl.losses import neco_loss, soft_permutation, sort_loss


def _uniform(shape, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen, dtype=dtype) * 2 - 1


def _row_entropy(q):
    return -(q * q.log()).sum(-1).mean()


def test_two_references_match_hand_computed_cross_entropy():
    student = torch.tensor([[0.0, 0.02]], dtype=torch.float64)
    teacher = torch.tensor([[0.0, 0.01]], dtype=torch.float64)
    p = 0.5 + math.atan(100 * 0.02) / math.pi  # weight of the identity placement
    q = 0.5 + math.atan(100 * 0.01) / math.pi
    expected = -(2 * q * math.log(p) + 2 * (1 - q) * math.log(1 - p)) / (1 * 2)
    assert sort_loss(student, teacher).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("steepness", "entropy"), [(10.0, 3.52), (100.0, 1.72), (1000.0, 0.43)])
def test_equal_student_and_teacher_gives_mean_row_entropy(steepness, entropy):
    sims = _uniform((600, 49), dtype=torch.float64)
    loss = sort_loss(sims, sims, steepness, steepness)
    q = soft_permutation(sims, steepness)
    torch.testing.assert_close(loss, _row_entropy(q))
    # A NumPy port of diffsort gives 3.52 / 1.72 / 0.43 nats; diffsort 0.2.0 itself gives 3.54 / 1.79 / 0.47
    # (this implementation matches it to 1e-14), hence the tolerance.
    assert loss.item() == pytest.approx(entropy, rel=0.1)


def test_perturbed_student_has_larger_loss():
    teacher = _uniform((300, 49), dtype=torch.float64)
    student = teacher + 0.02 * _uniform((300, 49), seed=1, dtype=torch.float64)
    assert sort_loss(student, teacher) > sort_loss(teacher, teacher) + 1e-3


@pytest.mark.parametrize("chunk_rows", [None, 7])
def test_gradient_reaches_student_only(chunk_rows):
    student = _uniform((2, 10, 49)).requires_grad_()
    teacher = _uniform((2, 10, 49), seed=1).requires_grad_()
    sort_loss(student, teacher, chunk_rows=chunk_rows).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_chunked_loss_and_gradient_equal_plain_autograd():
    teacher = _uniform((3, 11, 49), seed=1, dtype=torch.float64)
    student = _uniform((3, 11, 49), dtype=torch.float64).requires_grad_()
    losses, grads = [], []
    for chunk_rows in (None, 5):
        loss = sort_loss(student, teacher, 10.0, 30.0, chunk_rows=chunk_rows)
        (grad,) = torch.autograd.grad(2 * loss, student)
        losses.append(loss)
        grads.append(grad)
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])


def test_odd_even_needs_epsilon():
    # diffsort's odd_even probabilities underflow to 0 in float32.
    sims = _uniform((16, 49)) * 10
    student = sims.flip(-1).requires_grad_()
    assert not torch.isfinite(sort_loss(student, sims, network="odd_even"))
    loss = sort_loss(student, sims, network="odd_even", eps=1e-12)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_sort_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        sort_loss(torch.zeros(4, 49), torch.zeros(4, 48))


def _pairs(seed=0, pairs=3, batch=2, queries=5, refs=8, dim=6):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(pairs, batch, queries, dim, generator=gen, dtype=torch.float64)
    teacher = torch.randn(pairs, batch, queries, dim, generator=gen, dtype=torch.float64)
    references = torch.randn(pairs, batch, refs, dim, generator=gen, dtype=torch.float64)
    return student, teacher, references


def test_neco_loss_is_mean_of_per_pair_cosine_losses():
    student, teacher, references = _pairs()
    per_pair = []
    for s, t, r in zip(student, teacher, references):
        r = F.normalize(r, dim=-1)
        sims_s = torch.einsum("bkd,brd->bkr", F.normalize(s, dim=-1), r)
        sims_t = torch.einsum("bkd,brd->bkr", F.normalize(t, dim=-1), r)
        per_pair.append(sort_loss(sims_s, sims_t, 50.0, 80.0))
    expected = torch.stack(per_pair).mean()
    torch.testing.assert_close(neco_loss(student, teacher, references, 50.0, 80.0), expected)
    # cosine re-normalises, so feature scale does not matter
    torch.testing.assert_close(neco_loss(3 * student, 0.5 * teacher, 2 * references, 50.0, 80.0), expected)


def test_neco_loss_shared_references_broadcast():
    student, teacher, references = _pairs()
    shared = references[0]
    torch.testing.assert_close(
        neco_loss(student, teacher, shared), neco_loss(student, teacher, shared.expand_as(references))
    )


def test_euclidean_sorts_raw_distances_in_reverse_cosine_order():
    student, teacher, references = _pairs()
    expected = sort_loss(torch.cdist(student, references), torch.cdist(teacher, references))
    torch.testing.assert_close(neco_loss(student, teacher, references, sim="euclidean"), expected)
    # for unit vectors |x - r|^2 = 2 - 2 cos(x, r): the hard ranks are reversed
    q, r = F.normalize(student[0, 0], dim=-1), F.normalize(references[0, 0], dim=-1)
    p_cos = soft_permutation(q @ r.T, 1e6)
    p_euc = soft_permutation(torch.cdist(q, r), 1e6)
    torch.testing.assert_close(p_euc, p_cos.flip(-1), atol=1e-4, rtol=0)


def test_neco_loss_gradient_reaches_student_features_only():
    student, teacher, references = (t.float().requires_grad_() for t in _pairs())
    neco_loss(student, teacher, references).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None and references.grad is None


@pytest.mark.parametrize(
    ("shapes", "kwargs", "match"),
    [
        (((3, 2, 5, 6), (3, 2, 5, 6), (3, 2, 8, 6)), {"sim": "dot"}, "sim"),
        (((3, 2, 5, 6), (3, 2, 4, 6), (3, 2, 8, 6)), {}, "student_aligned"),
        (((3, 2, 5, 6), (3, 2, 5, 6), (2, 2, 8, 6)), {}, "references"),
        (((3, 2, 5, 6), (3, 2, 5, 6), (2, 8, 5)), {}, "references"),
    ],
)
def test_neco_loss_rejects_bad_input(shapes, kwargs, match):
    tensors = [torch.zeros(shape) for shape in shapes]
    with pytest.raises(ValueError, match=match):
        neco_loss(*tensors, **kwargs)


def test_query_mask_averages_each_pair_over_its_masked_queries_only():
    student, teacher, references = _pairs()
    mask = torch.zeros(student.shape[:3], dtype=torch.bool)
    mask[0, 1, 2] = True  # pair 0: one query
    mask[2, :, :3] = True  # pair 2: six queries; pair 1: none -> contributes 0
    per_pair = []
    for s, t, r, m in zip(student, teacher, references, mask):
        if not m.any():
            per_pair.append(torch.zeros((), dtype=s.dtype))
            continue
        r = F.normalize(r, dim=-1)
        sims_s = torch.einsum("bkd,brd->bkr", F.normalize(s, dim=-1), r)[m]
        sims_t = torch.einsum("bkd,brd->bkr", F.normalize(t, dim=-1), r)[m]
        per_pair.append(sort_loss(sims_s, sims_t, 50.0, 80.0))
    expected = torch.stack(per_pair).mean()  # pairs still weigh 1/3 each (reference knn_loss)
    torch.testing.assert_close(neco_loss(student, teacher, references, 50.0, 80.0, query_mask=mask), expected)
    # all queries masked == no mask; chunked gradients give the same masked loss and no gradient to pair 1
    full = torch.ones_like(mask)
    torch.testing.assert_close(neco_loss(student, teacher, references, query_mask=full),
                               neco_loss(student, teacher, references))
    student.requires_grad_(True)
    neco_loss(student, teacher, references, 50.0, 80.0, query_mask=mask, chunk_rows=4).backward()
    assert student.grad[1].abs().sum() == 0 and student.grad[0, 1, 2].abs().sum() > 0
    assert student.grad[0, 0].abs().sum() == 0  # unmasked queries of a masked pair get nothing
