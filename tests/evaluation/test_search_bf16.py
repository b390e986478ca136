"""search=exact_bf16 (Bf16ExactSearch): the rows and similarities of faiss float32 exact search, on random
data and on near-ties that bfloat16 alone orders wrongly, with and without the float32 fallback."""
import faiss
import pytest
import torch
import torch.nn.functional as F

from densessl.evaluation import search as search_module
from densessl.evaluation.retrieval import Memory, evaluate_memory
from densessl.evaluation.search import Bf16ExactSearch, ExactSearch, make_search

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run faster on one thread

D = 64


def faiss_knn(memory: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    sims, rows = faiss.knn(queries.numpy(), memory.float().numpy(), k, metric=faiss.METRIC_INNER_PRODUCT)
    return torch.from_numpy(sims), torch.from_numpy(rows)


def assert_same_as_faiss(search: Bf16ExactSearch, memory: torch.Tensor, queries: torch.Tensor, k: int) -> None:
    sims, rows = search.search(queries, k)
    ref_sims, ref_rows = faiss_knn(memory, queries, k)
    assert torch.equal(rows, ref_rows)
    assert torch.allclose(sims, ref_sims, rtol=0, atol=1e-6)


def near_ties(copies: int, blocks: int, block_rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A memory of ``blocks`` blocks of random rows, ``copies`` near-duplicates of one row v spread evenly
    over the blocks, and 4 queries at cosine ~0.7 to v: the copies' scores spread over ~0.006, about one
    bfloat16 spacing there (2^-8), so their bf16 scores tie in two or three values."""
    gen = torch.Generator().manual_seed(seed)
    memory = F.normalize(torch.randn(blocks * block_rows, D, generator=gen), dim=1)
    base = F.normalize(torch.randn(D, generator=gen), dim=0)
    per_block = copies // blocks
    slots = torch.cat([b * block_rows + torch.randperm(block_rows, generator=gen)[:per_block] for b in range(blocks)])
    memory[slots] = F.normalize(base + 0.0015 * torch.randn(len(slots), D, generator=gen), dim=1)
    queries = F.normalize(base + torch.randn(4, D, generator=gen) / D**0.5, dim=1)
    return memory, queries


def check_premise(memory: torch.Tensor, queries: torch.Tensor, k: int) -> None:
    """The exact top-(k+1) scores are separated by far more than float32 rounding (so faiss's order is
    the true one), and bfloat16 scores alone give a different top-k."""
    exact = (queries.double() @ memory.double().T).topk(k + 1, dim=1).values
    assert (exact[:, :-1] - exact[:, 1:]).min() > 1e-6
    approx_rows = (queries.bfloat16() @ memory.bfloat16().T).float().topk(k, dim=1).indices
    assert not torch.equal(approx_rows, faiss_knn(memory, queries, k)[1])


# Last block of 1,024, 1,000 (grouped + 8 columns kept whole), 100 (plain top-k) and 10 rows (kept whole).
@pytest.mark.parametrize("rows", [4096, 4096 + 1000, 4096 + 100, 4096 + 10])
def test_random_normalised_data_same_rows_and_similarities_as_faiss(rows):
    gen = torch.Generator().manual_seed(rows)
    memory = F.normalize(torch.randn(rows, D, generator=gen), dim=1)
    queries = F.normalize(torch.randn(50, D, generator=gen), dim=1)
    # 16 candidates over 4-5 blocks: each block keeps its top k (C = max(k, candidates / blocks))
    search = Bf16ExactSearch(memory, block_rows=1024, candidates=16, group=16, query_rows=32)
    assert_same_as_faiss(search, memory, queries, 10)
    assert_same_as_faiss(search, memory, queries, 20)
    assert search.widened == search.fallbacks == 0
    half = memory.half()  # a float16 memory: the same answer as faiss on its float32 values
    assert_same_as_faiss(Bf16ExactSearch(half, block_rows=1024, candidates=16), half, queries, 10)


def test_near_ties_are_ordered_by_the_float32_rescoring():
    # 40 near-duplicates, 10 per block of 1,024 rows: each block keeps all its copies among its top 16
    # (64 candidates over 4 blocks), so no query is searched again and the right order comes from the
    # float32 re-scoring alone.
    memory, queries = near_ties(copies=40, blocks=4, block_rows=1024, seed=0)
    check_premise(memory, queries, 10)
    search = Bf16ExactSearch(memory, block_rows=1024, candidates=64, group=16)
    assert_same_as_faiss(search, memory, queries, 10)
    assert search.widened == search.fallbacks == 0


@pytest.mark.parametrize("copies, fallbacks", [(40, 0), (300, 4)])
def test_a_block_with_more_ties_than_candidates_is_searched_again(copies, fallbacks):
    # Near-duplicates in one block that keeps 16: the cut copies may be neighbours, so every query is
    # searched again with 8 x 16 = 128 candidates (enough for 40 copies), then for 300 copies in float32.
    # Without that check the answer would be a wrong top-10 of the 16 kept.
    memory, queries = near_ties(copies=copies, blocks=1, block_rows=4096, seed=1)
    check_premise(memory, queries, 10)
    search = Bf16ExactSearch(memory, block_rows=4096, candidates=16, group=16)
    assert_same_as_faiss(search, memory, queries, 10)
    assert search.widened == len(queries) and search.fallbacks == fallbacks
    assert_same_as_faiss(search, memory, torch.cat([queries, -queries]), 10)  # opposite queries: no tie
    assert search.widened == 2 * len(queries) and search.fallbacks == 2 * fallbacks


def test_bf16_scores_stay_inside_the_derived_bound():
    # The window's premise on this CPU: |bf16 score - float32 score| <= E + 2^-8 |bf16 score| for every pair.
    memory, queries = near_ties(copies=40, blocks=2, block_rows=2048, seed=2)
    queries = torch.cat([queries, F.normalize(torch.randn(60, D, generator=torch.Generator().manual_seed(3)), dim=1)])
    search = Bf16ExactSearch(memory)
    approx = (queries.bfloat16() @ search.memory_bf16.T).float()
    exact = queries @ memory.T
    bound = search.error_bound(queries)
    assert ((approx - exact).abs() <= bound[:, None] + 2.0**-8 * approx.abs()).all()
    assert (bound < 0.75 * 2.0**-7).all()  # measured rounding norms: below the worst case 2^-8 (|q| + |m|)


def test_make_search_uses_bf16_only_where_it_is_fast(monkeypatch):
    memory = F.normalize(torch.randn(64, D), dim=1)
    monkeypatch.setattr(search_module, "bf16_matmul_is_fast", lambda: True)
    assert isinstance(make_search(memory, "exact_bf16"), Bf16ExactSearch)
    assert isinstance(make_search(memory, "exact"), ExactSearch)
    monkeypatch.setattr(search_module, "bf16_matmul_is_fast", lambda: False)
    assert isinstance(make_search(memory, "exact_bf16"), ExactSearch)


def test_evaluate_memory_exact_bf16_equals_exact_and_reports_fallbacks(monkeypatch):
    monkeypatch.setattr(search_module, "bf16_matmul_is_fast", lambda: True)
    gen = torch.Generator().manual_seed(0)
    memory = Memory(F.normalize(torch.randn(2000, D, generator=gen), dim=1),
                    torch.softmax(3 * torch.randn(2000, 4, generator=gen), dim=1).half())
    val = [(torch.randn(2, 4, 4, D, generator=gen), torch.randint(0, 4, (2, 32, 32), generator=gen))]
    exact = evaluate_memory(memory, val, num_classes=4, k=10)
    bf16 = evaluate_memory(memory, val, num_classes=4, k=10, search="exact_bf16")
    assert torch.equal(bf16.confusion, exact.confusion)
    assert bf16.search_widened == bf16.search_fallbacks == 0 and bf16.as_dict()["hbird_search_fallbacks"] == 0.0
