import math

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import TinyBackbone
from test_linear import ColourBackbone, ColourScenes
from densessl.evaluation.metrics import confusion_matrix
from densessl.evaluation.retrieval import (
    ExactSearch,
    HummingbirdTransform,
    IVFPQ4Search,
    IVFSearch,
    Memory,
    build_memory,
    evaluate_memory,
    hummingbird,
    make_search,
    patch_label_counts,
    sample_patches,
    transfer_labels,
)

C, D, GRID, PATCH = 4, 8, 4, 8
SIZE = GRID * PATCH


def planted(num_images: int, seed: int, ignore: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens = one-hot class prototypes (+ small noise), masks patch-aligned with a left and a right class."""
    gen = torch.Generator().manual_seed(seed)
    classes = torch.empty(num_images, GRID, GRID, dtype=torch.int64)
    for i in range(num_images):
        left, right = torch.randperm(C, generator=gen)[:2]
        classes[i, :, : GRID // 2], classes[i, :, GRID // 2 :] = left, right
    tokens = 3 * F.one_hot(classes, D).float() + 0.05 * torch.randn(num_images, GRID, GRID, D, generator=gen)
    masks = classes.repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2)
    masks[torch.rand(masks.shape, generator=gen) < ignore] = 255
    return tokens, masks


def test_patch_label_counts_by_hand():
    mask = torch.tensor([[0, 0, 1, 1], [0, 255, 1, 1], [2, 2, 3, 3], [2, 2, 3, 255]])[None]
    counts = patch_label_counts(mask, (2, 2), num_classes=4)
    expected = torch.tensor([[4, 0, 0, 0], [0, 4, 0, 0], [0, 0, 4, 0], [1, 0, 0, 3]])  # 255 -> class 0
    assert torch.equal(counts[0], expected)
    with pytest.raises(ValueError, match="multiple of the token grid"):
        patch_label_counts(torch.zeros(1, 5, 4, dtype=torch.int64), (2, 2), 4)
    with pytest.raises(ValueError, match="num_classes"):
        patch_label_counts(mask, (2, 2), num_classes=3)


def test_sampler_score_formula_and_rare_classes_first():
    # 16 patches: 13 background only, patch 13 = {0, 1}, patch 14 = {1}, patch 15 = {2}.
    counts = torch.zeros(1, 16, 3, dtype=torch.int64)
    counts[0, :14, 0] = 4
    counts[0, 13, 1] = counts[0, 14, 1] = counts[0, 15, 2] = 4
    # Frequencies (patches per class): c0 = 14, c1 = 2, c2 = 1 -> scores 14 (x13), 16, 2, 1.
    scores = torch.tensor([14.0] * 13 + [16.0, 2.0, 1.0])
    for seed in range(5):
        noise = torch.rand(1, 16, generator=torch.Generator().manual_seed(seed))
        expected = (scores * noise).topk(3, dim=1, largest=False).indices
        got = sample_patches(counts, 3, torch.Generator().manual_seed(seed))
        assert torch.equal(got, expected)
    # Over many draws the two rare-class patches are kept far more often than any other (about 0.94, 0.72
    # vs < 0.15 each); patch 13 holds a rare class too but also the frequent one, so it is not favoured.
    gen = torch.Generator().manual_seed(0)
    kept = torch.zeros(16)
    for _ in range(400):
        kept[sample_patches(counts, 3, gen)[0]] += 1
    assert kept[15] > 0.85 * 400 and kept[14] > 0.6 * 400 and kept[:14].max() < 0.2 * 400


def test_sampler_keeps_empty_patches_last():
    counts = torch.ones(2, 6, 3, dtype=torch.int64)
    counts[:, 2] = 0  # no labelled pixel
    for seed in range(10):
        kept = sample_patches(counts, 5, torch.Generator().manual_seed(seed))
        assert not (kept == 2).any()
    assert (sample_patches(counts, 6)[:, -1] == 2).all()


def test_label_transfer_by_hand():
    # 4 memory patches on the unit circle, one query along (1, 0), k=2, temperature 0.1.
    features = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]).half()
    query = torch.tensor([[2.0, 0.0]])  # not normalised: the ranking by inner product is that of the cosine
    sims, rows = ExactSearch(features).search(query, 2)
    assert rows.tolist() == [[0, 1]]
    cos = F.normalize(query, dim=1) @ features[rows[0]].T  # 1.0, 0.8
    dist = transfer_labels(cos, rows, labels, temperature=0.1)
    w0 = 1 / (1 + math.exp(-(1.0 - 0.8) / 0.1))  # softmax(10, 8)
    assert torch.allclose(dist, torch.tensor([[w0, 0.5 * (1 - w0), 0.5 * (1 - w0)]]), atol=1e-4)


def test_exact_search_matches_index_flat_ip_and_fp16_blocks():
    gen = torch.Generator().manual_seed(0)
    memory = F.normalize(torch.randn(500, 16, generator=gen), dim=1)
    queries = F.normalize(torch.randn(20, 16, generator=gen), dim=1)
    index = faiss.IndexFlatIP(16)
    index.add(memory.numpy())
    ref_sims, ref_rows = index.search(queries.numpy(), 7)
    settings = faiss.cvar.distance_compute_blas_threshold, faiss.cvar.distance_compute_blas_database_bs
    sims, rows = ExactSearch(memory).search(queries, 7)
    assert np.array_equal(rows.numpy(), ref_rows) and np.allclose(sims.numpy(), ref_sims)
    # faiss's BLAS settings are changed only during the search
    assert (faiss.cvar.distance_compute_blas_threshold, faiss.cvar.distance_compute_blas_database_bs) == settings
    # float16 memory searched in blocks of 64 rows and merged == brute force on the decoded rows.
    half = memory.half()
    sims16, rows16 = ExactSearch(half, block_rows=64).search(queries, 7)
    brute_sims, brute_rows = (queries @ half.float().T).topk(7, dim=1)
    assert torch.equal(rows16, brute_rows) and torch.allclose(sims16, brute_sims, atol=1e-6)
    with pytest.raises(ValueError, match="k=501"):
        ExactSearch(memory).search(queries, 501)


def test_ivf_search_visiting_every_list_is_exact_and_few_lists_trade_recall():
    gen = torch.Generator().manual_seed(0)
    memory = F.normalize(torch.randn(2000, 16, generator=gen), dim=1)
    queries = F.normalize(torch.randn(50, 16, generator=gen), dim=1)
    exact_sims, exact_rows = ExactSearch(memory).search(queries, 10)
    sims, rows = IVFSearch(memory, nlist=8, nprobe=8).search(queries, 10)  # every list visited
    assert torch.equal(rows, exact_rows) and torch.allclose(sims, exact_sims, atol=1e-5)
    _, rows1 = IVFSearch(memory, nlist=8, nprobe=1).search(queries, 10)  # one list of ~250 rows
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows1.tolist(), exact_rows.tolist())])
    assert 0.2 < recall < 1.0  # approximate, not broken (random 16-d data spreads neighbours over lists)


def test_ivf_pq4_recall_against_exact_search():
    gen = torch.Generator().manual_seed(0)
    centres = 4 * torch.randn(50, 32, generator=gen)  # clustered data: neighbours share a list
    memory = centres[torch.randint(50, (4000,), generator=gen)] + torch.randn(4000, 32, generator=gen)
    memory = F.normalize(memory, dim=1)
    queries = F.normalize(centres[torch.randint(50, (64,), generator=gen)] + torch.randn(64, 32, generator=gen), dim=1)
    _, exact_rows = ExactSearch(memory).search(queries, 10)

    def recall(rows):
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows.tolist(), exact_rows.tolist())])

    # Every list visited, 240 of 4,000 re-scored: only the 4-bit codes can lose a neighbour (garbage codes
    # would keep ~0.06 of them).
    sims, rows = IVFPQ4Search(memory, nlist=16, nprobe=16).search(queries, 10)
    assert recall(rows) > 0.95
    assert torch.allclose(sims, (queries[:, None, :] * memory[rows]).sum(2), atol=1e-6)  # exact re-scoring
    # Re-scoring only k: the 4-bit ranking alone (0.22 here; random rows would give 0.0025) loses most of
    # the 10, which the 240 re-scored recover.
    search = IVFPQ4Search(memory, nlist=16, nprobe=16, reorder=10)
    assert 0.1 < recall(search.search(queries, 10)[1]) < 0.9
    with pytest.raises(ValueError, match="CPU only"):
        IVFPQ4Search(memory, nlist=16, nprobe=4, gpu=True)
    with pytest.raises(ValueError, match="even feature dimension"):
        IVFPQ4Search(torch.randn(1000, 5), nlist=16, nprobe=4)
    with pytest.raises(ValueError, match="search=ivf_pq4 .* at least 39 \\* nlist = 624 rows"):
        make_search(torch.randn(100, 4), "ivf_pq4", nlist=16, nprobe=4)


def test_ivf_missing_neighbours_get_zero_weight_and_bad_settings_are_clear_errors():
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).half()
    sims = torch.tensor([[0.9, -math.inf]])  # IVFSearch: a missing neighbour is row -1, similarity -inf
    dist = transfer_labels(sims, torch.tensor([[0, -1]]), labels)
    assert torch.equal(dist, torch.tensor([[1.0, 0.0]]))
    with pytest.raises(ValueError, match="at least 39 \\* nlist = 312 rows"):
        IVFSearch(torch.randn(100, 4), nlist=8)
    with pytest.raises(ValueError, match="search must be one of \\('exact', 'exact_bf16', 'ivf', 'ivf_pq4'\\)"):
        hummingbird(None, [], [], search="hnsw")


def test_build_memory_bounded_sizes_and_labels():
    tokens, masks = planted(10, seed=0)
    memory = build_memory([(tokens[:6], masks[:6]), (tokens[6:], masks[6:])], total_images=10, num_classes=C,
                          memory_size=85)
    assert len(memory) == 10 * 8  # 85 // 10 patches per image
    assert memory.labels.dtype == torch.float16 and torch.allclose(memory.labels.float().sum(1), torch.ones(80))
    assert torch.allclose(memory.features.norm(dim=1), torch.ones(80))
    unbounded = build_memory([(tokens, masks)], total_images=10, num_classes=C, feature_dtype=torch.float16)
    assert len(unbounded) == 10 * GRID * GRID and unbounded.features.dtype == torch.float16
    with pytest.raises(ValueError, match="less than one patch per image"):
        build_memory([(tokens, masks)], total_images=10, num_classes=C, memory_size=9)


def test_planted_features_reach_miou_one():
    memory = build_memory([planted(20, seed=0)], total_images=20, num_classes=C, memory_size=20 * 6)
    result = evaluate_memory(memory, [planted(8, seed=1, ignore=0.1)], num_classes=C, k=5)
    assert result.miou == pytest.approx(1.0) and result.miou_unmatched == pytest.approx(1.0)
    assert result.confusion.sum() < 8 * SIZE * SIZE  # ignore pixels dropped
    assert result.memory_rows == 120 and result.num_val_images == 8


def test_hungarian_matching_undoes_a_class_permutation():
    # Memory labels permuted c -> c+1: predictions are consistently wrong, matching (the reference's
    # K = C Hungarian step) maps them back.
    tokens, masks = planted(20, seed=0)
    memory = build_memory([(tokens, (masks + 1) % C)], total_images=20, num_classes=C)
    result = evaluate_memory(memory, [planted(8, seed=1)], num_classes=C, k=5)
    assert result.miou == pytest.approx(1.0) and result.miou_unmatched == 0.0


def test_evaluate_memory_matches_a_naive_implementation():
    gen = torch.Generator().manual_seed(0)
    memory = Memory(F.normalize(torch.randn(300, D, generator=gen), dim=1),
                    torch.softmax(3 * torch.randn(300, C, generator=gen), dim=1).half())
    tokens = torch.randn(3, GRID, GRID, D, generator=gen)
    masks = torch.randint(0, C, (3, SIZE, SIZE), generator=gen)
    masks[:, :2] = 255
    result = evaluate_memory(memory, [(tokens[:2], masks[:2]), (tokens[2:], masks[2:])], num_classes=C, k=10,
                             query_chunk=7)
    q = F.normalize(tokens.reshape(-1, D), dim=1)
    sims, rows = (q @ memory.features.T).topk(10, dim=1)
    dist = (torch.softmax(sims / 0.02, 1)[..., None] * memory.labels[rows].float()).sum(1)
    dist = dist.view(3, GRID, GRID, C).permute(0, 3, 1, 2)
    pred = F.interpolate(dist, size=(SIZE, SIZE), mode="bilinear").argmax(1)
    assert torch.equal(result.confusion, confusion_matrix(pred, masks, C, C))


def test_transform_shapes_and_parity_std(synthetic):
    image, mask = synthetic[0][0]
    for train in (True, False):
        x, y = HummingbirdTransform(48, train=train)(image, mask)
        assert x.shape == (3, 48, 48) and x.dtype == torch.float32 and y.shape == (48, 48) and y.dtype == torch.int64
    # Blue channel normalised with 0.255 (reference), not ImageNet's 0.225.
    x, _ = HummingbirdTransform(64, train=False)(image, mask)
    raw = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    assert torch.allclose(x[2], (raw[2] - 0.406) / 0.255, atol=1e-5)


def test_validation_masks_resized_with_torch_nearest_as_the_reference():
    # open-hummingbird-eval resizes its targets as tensors with InterpolationMode.NEAREST = torch "nearest"
    # (unlike PIL NEAREST, which SegTransform uses by default for NeCo/Leopart).
    labels = np.random.default_rng(1).integers(0, 21, size=(31, 37), dtype=np.uint8)
    mask = Image.fromarray(labels)
    for size in (13, 71):
        _, y = HummingbirdTransform(size, train=False)(Image.new("RGB", mask.size), mask)
        expected = F.interpolate(torch.from_numpy(labels)[None, None].float(), size=(size, size), mode="nearest")
        assert torch.equal(y, expected[0, 0].long())
        pil = torch.from_numpy(np.array(mask.resize((size, size), Image.NEAREST), dtype=np.int64))
        assert not torch.equal(y, pil)  # the two rules pick different pixels here


def test_hummingbird_end_to_end(synthetic):
    train, val = synthetic
    torch.manual_seed(0)
    backbone = TinyBackbone().train()
    kwargs = dict(image_size=64, memory_size=8 * 2 * 20, augmentation_epochs=2, k=5, batch_size=4, num_threads=1)
    result = hummingbird(backbone, train, val, **kwargs)
    assert 0.0 <= result.miou <= 1.0 and result.miou >= result.miou_unmatched
    assert result.memory_rows == 8 * 2 * 20 and result.num_val_images == 4
    assert {"memory_load_forward_s", "memory_build_s", "search_s", "val_load_forward_s"} <= set(result.timings)
    assert backbone.training  # mode restored
    assert torch.equal(hummingbird(backbone, train, val, **kwargs).confusion, result.confusion)  # seeded


def test_hummingbird_keeps_matched_predictions_of_the_first_val_images():
    # Memory labels shifted c -> c + 1: every raw prediction is wrong, the Hungarian matching (the reported
    # figure) undoes the shift, and the kept pictures show the matched predictions.
    train = ColourScenes(8, band=0, label_shift=1)  # memory masks without ignore (255 counts as class 0)
    val = ColourScenes(5)
    result = hummingbird(ColourBackbone(), train, val, image_size=48, k=3, batch_size=3, num_vis=4, num_threads=1)
    assert result.miou == pytest.approx(1.0) and result.miou_unmatched == 0.0
    expected = torch.stack([HummingbirdTransform(48, train=False)(*val[i])[1] for i in range(4)]).to(torch.uint8)
    assert result.vis_targets.dtype == torch.uint8 and torch.equal(result.vis_targets, expected)
    assert (expected[:, :6] == 255).all() and expected[:, -1, -1].tolist() == [0, 1, 2, 3]
    keep = expected != 255
    assert result.vis_predictions.shape == (4, 48, 48) and result.vis_predictions.dtype == torch.uint8
    assert torch.equal(result.vis_predictions[keep], expected[keep])
    assert hummingbird(ColourBackbone(), train, val, image_size=48, k=3, batch_size=3).vis_targets is None


def test_gpu_search_without_faiss_gpu_is_a_clear_error():
    if faiss.get_num_gpus() > 0:
        pytest.skip("faiss sees a GPU")
    with pytest.raises(ValueError, match="faiss-gpu"):
        ExactSearch(torch.zeros(4, 2), gpu=True)
