import pytest
import torch

from cfr_core.config import MapperConfig
from cfr_core.memory import (
    build_banks,
    greedy_coreset,
    max_cosine,
    nearest_distance,
    topk_cosine,
)
from cfr_core.memory.bank import coreset_size
from cfr_core.memory.coreset import random_projection
from cfr_core.memory.search import any_similar
from cfr_core.models import AttentionRetriever, CrossModalMappers, GeGLU, cosine_loss
from cfr_core.models.mappers import default_hidden


def test_mapper_architectures():
    assert default_hidden(768, 1152) == 960 and default_hidden(39, 38) == 256
    cfr = CrossModalMappers(768, 1152, MapperConfig())
    assert isinstance(cfr.to_rgb, GeGLU)
    assert cfr.to_rgb.proj.weight.shape == (2 * 960, 1152) and cfr.to_rgb.out.weight.shape == (
        768,
        960,
    )
    assert cfr.to_3d.proj.bias is not None
    cfm = CrossModalMappers(768, 1152, MapperConfig(kind="mlp", cyclic=False))
    shapes = [tuple(m.weight.shape) for m in cfm.to_3d.modules() if isinstance(m, torch.nn.Linear)]
    assert shapes == [(960, 768), (960, 960), (1152, 960)]


def test_geglu_gates_with_gelu():
    g = GeGLU(3, 2, 4)
    x = torch.randn(5, 3)
    gate, value = g.proj(x).chunk(2, dim=-1)
    assert torch.allclose(g(x), g.out(torch.nn.functional.gelu(gate) * value))


def test_cyclic_loss_has_four_terms_cfm_two():
    torch.manual_seed(0)
    f_rgb, f_3d = torch.randn(10, 6), torch.randn(10, 5)
    m = CrossModalMappers(6, 5, MapperConfig(hidden=8))
    p_rgb, p_3d = m(f_rgb, f_3d)
    expected = (
        cosine_loss(p_rgb, f_rgb)
        + cosine_loss(p_3d, f_3d)
        + cosine_loss(m.to_rgb(p_3d), f_rgb)
        + cosine_loss(m.to_3d(p_rgb), f_3d)
    )
    assert torch.allclose(m.loss(f_rgb, f_3d), expected)
    m.cyclic = False
    assert torch.allclose(m.loss(f_rgb, f_3d), cosine_loss(p_rgb, f_rgb) + cosine_loss(p_3d, f_3d))


def test_retriever_attends_over_its_candidates():
    torch.manual_seed(0)
    r = AttentionRetriever(d_key=6, d_value=4, d_model=8, top_k=3)
    assert all(m.bias is None for m in (r.q_proj, r.k_proj, r.v_proj, r.out_proj))
    keys, values = torch.randn(20, 6), torch.randn(20, 4)
    query = torch.randn(7, 6)
    _, idx = topk_cosine(query, keys, 3)
    out = r(query, idx, keys, values)
    assert out.shape == (7, 4)
    same = (
        torch.zeros(7, 3, dtype=torch.long) + 5
    )  # identical candidates: the output is their value
    assert torch.allclose(
        r(query, same, keys, values), r.out_proj(r.v_proj(values[5])).expand(7, 4), atol=1e-6
    )


def _naive_coreset(x, n, dim, starts, seed):
    gen = torch.Generator().manual_seed(seed)
    x = random_projection(x, dim, gen)
    sq = (x * x).sum(1)

    def d2(c):
        return (sq - 2 * (x @ x[c]) + sq[c]).clamp_min(0)

    begin = torch.randperm(len(x), generator=gen)[:starts]
    min_d = torch.stack([d2(int(s)).sqrt() for s in begin]).mean(0) ** 2
    out = []
    for _ in range(n):
        p = int(torch.argmax(min_d))
        out.append(p)
        min_d = torch.minimum(min_d, d2(p))
        min_d[p] = 0
    return torch.tensor(out)


@pytest.mark.parametrize(("dims", "zeros"), [(20, 0), (200, 300)])
def test_pruned_coreset_matches_plain_greedy(dims, zeros):
    torch.manual_seed(1)
    x = torch.cat([torch.randn(600, dims) * 0.3 + torch.randn(1, dims) * 3 for _ in range(4)])
    x[:zeros] = 0  # background rows, as in 3D banks
    got = greedy_coreset(x, 400, projection_dim=64, n_starts=10, seed=5)
    assert torch.equal(got, _naive_coreset(x, 400, 64, 10, 5))
    assert len(set(got.tolist())) == 400


def test_coreset_stops_when_every_distinct_row_is_chosen():
    # four identical shots of a small part on a zero background: fewer distinct rows
    # than the 10 % asked for; repeats would only duplicate bank entries
    torch.manual_seed(3)
    part = torch.randn(30, 16)
    shot = torch.cat([part, torch.zeros(170, 16)])
    x = torch.cat([shot] * 4)  # 800 rows, 31 distinct
    got = greedy_coreset(x, 80, projection_dim=8, n_starts=3, seed=0)
    assert len(got) == 31
    assert len({tuple(r.tolist()) for r in x[got]}) == 31  # each distinct row exactly once


def test_coreset_sizes_match_the_paper():
    assert coreset_size(50_176, 0.1) == 5_017 and coreset_size(4 * 50_176, 0.1) == 20_070


def test_chunked_search_equals_full():
    torch.manual_seed(2)
    q, bank = torch.randn(50, 8), torch.randn(300, 8)
    sims, idx = topk_cosine(q, bank, 3, budget=700)  # two queries per chunk
    full = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
    ref = full.topk(3, dim=1)
    assert torch.equal(idx, ref.indices) and torch.allclose(sims, ref.values, atol=1e-6)
    assert torch.allclose(
        nearest_distance(q, bank, budget=700), torch.cdist(q, bank).min(1).values, atol=1e-4
    )
    assert torch.equal(
        max_cosine(q, bank, budget=700), topk_cosine(q, bank, 1, budget=700)[0][:, 0]
    )


@pytest.mark.parametrize("budget", [1 << 26, 5000])
def test_running_best_over_bank_blocks_equals_the_full_search(budget):
    """The bank is swept 512 rows at a time: maxima, indices and distances are those of the
    whole similarity matrix, and a tie keeps the first row (rows 512-1023 repeat 0-511)."""
    from cfr_core.memory.search import BANK_BLOCK

    torch.manual_seed(8)
    head = torch.randn(BANK_BLOCK, 38)
    bank = torch.cat([head, head, torch.randn(700, 38)])  # three blocks and a partial one
    q = torch.cat([head[:50] + 0.05 * torch.randn(50, 38), torch.randn(150, 38)])
    unit = torch.nn.functional.normalize
    full = unit(q, dim=1) @ unit(bank, dim=1).T
    sims, idx = topk_cosine(q, bank, 1, budget=budget)
    assert torch.allclose(sims[:, 0], full.max(dim=1).values, atol=1e-6)
    assert torch.allclose(max_cosine(q, bank, budget=budget), full.max(dim=1).values, atol=1e-6)
    assert torch.allclose(full.gather(1, idx), sims, atol=1e-6)  # the index is the maximum
    near_head = idx[:50, 0]
    assert bool((near_head < BANK_BLOCK).all())  # the first of two equal rows wins
    assert torch.allclose(
        nearest_distance(q, bank, budget=budget), torch.cdist(q, bank).min(1).values, atol=1e-4
    )
    assert max_cosine(q[:0], bank).shape == (0,) and topk_cosine(q[:0], bank, 1)[1].shape == (0, 1)


@pytest.mark.parametrize("dim", [33, 152, 768])  # FPFH-, lite- and DINO-wide features
def test_max_cosine_equals_the_top_1_search_at_feature_widths(dim):
    torch.manual_seed(5)
    q, bank = torch.randn(200, dim), torch.randn(500, dim)
    full = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
    assert torch.allclose(max_cosine(q, bank), full.max(dim=1).values, atol=1e-6)
    assert torch.equal(
        max_cosine(q, bank, budget=1000), topk_cosine(q, bank, 1, budget=1000)[0][:, 0]
    )


@pytest.mark.parametrize("budget", [1 << 26, 700])
def test_paired_search_gives_each_modality_and_the_best_joint_match(budget):
    """max_cosine_pair: per modality the plain max cosine; for the pair, the best mean of
    both cosines *to one bank row*, which is below the mean of the separate maxima when
    the best matches of the two modalities are different rows."""
    from cfr_core.memory import max_cosine_pair

    torch.manual_seed(6)
    qa, qb, ba, bb = (
        torch.randn(90, 152),
        torch.randn(90, 38),
        torch.randn(400, 152),
        torch.randn(400, 38),
    )
    a, b, pair = max_cosine_pair((qa, qb), (ba, bb), budget=budget)
    assert torch.allclose(a, max_cosine(qa, ba), atol=1e-6)
    assert torch.allclose(b, max_cosine(qb, bb), atol=1e-6)
    unit = torch.nn.functional.normalize
    joint = (
        torch.cat([unit(qa, dim=1), unit(qb, dim=1)], 1)
        @ torch.cat([unit(ba, dim=1), unit(bb, dim=1)], 1).T
        / 2
    )
    assert torch.allclose(pair, joint.max(dim=1).values, atol=1e-6)
    assert bool((pair < (a + b) / 2 - 1e-4).any()) and bool((pair <= (a + b) / 2 + 1e-6).all())
    # a query made of bank row 3's colour and bank row 7's shape: each modality matches
    # exactly, the pair does not
    mixed = max_cosine_pair((ba[3:4], bb[7:8]), (ba, bb))
    assert mixed[0].item() == pytest.approx(1) and mixed[1].item() == pytest.approx(1)
    assert mixed[2].item() < 0.9
    with pytest.raises(ValueError, match="paired rows differ"):
        max_cosine_pair((qa, qb[:5]), (ba, bb))


@pytest.mark.parametrize("head", [1, 37, 300, 5000])
def test_two_pass_similarity_test_equals_the_full_search(head):
    torch.manual_seed(4)
    bank = torch.randn(300, 16)
    q = torch.cat([bank[:40] + 0.3 * torch.randn(40, 16), torch.randn(60, 16)])
    best = topk_cosine(q, bank, 1)[0][:, 0]
    for min_sim in (0.2, 0.6, 0.9):
        got = any_similar(q, bank, min_sim, head=head, budget=500)
        assert torch.equal(got, best >= min_sim)
        assert 0 < int(got.sum()) < len(q) or min_sim == 0.2  # both outcomes occur


def test_key_value_bank_keeps_pixel_pairs():
    torch.manual_seed(3)
    f_rgb, f_3d = torch.randn(2, 4, 10, 10), torch.randn(2, 6, 10, 10)
    banks = build_banks(
        f_rgb, f_3d, __import__("cfr_core.config").config.BankConfig(coreset_ratio=0.2)
    )
    assert (
        banks.rgb.shape == (40, 4) and banks.keys.shape == (40, 6) and banks.values.shape == (40, 4)
    )
    rows_rgb = f_rgb.permute(0, 2, 3, 1).reshape(-1, 4)
    rows_3d = f_3d.permute(0, 2, 3, 1).reshape(-1, 6)
    for key, value in zip(banks.keys, banks.values, strict=True):
        pixel = int(torch.nonzero((rows_3d == key).all(1))[0])
        assert torch.equal(rows_rgb[pixel], value)


def test_the_pruned_index_gives_the_full_search_answers():
    from cfr_core.memory.bank import Banks
    from cfr_core.memory.pruned import MIN_ROWS, CosineIndex
    from cfr_core.memory.search import any_similar, max_cosine

    g = torch.Generator().manual_seed(3)
    # features on a few clusters, as a coreset bank of a part's pixels; queries near
    # them (a good part), far from them (a defect), a zero row and a NaN row
    centres = torch.randn(40, 96, generator=g)
    bank = centres[torch.randint(0, 40, (MIN_ROWS + 1500,), generator=g)]
    bank = bank + 0.2 * torch.randn(bank.shape, generator=g)
    near = centres[torch.randint(0, 40, (700,), generator=g)] + 0.2 * torch.randn(
        700, 96, generator=g
    )
    far = torch.randn(300, 96, generator=g) * 3
    queries = torch.cat([near, far, torch.zeros(1, 96), torch.full((1, 96), float("nan"))])
    index = CosineIndex(bank)
    assert index.whole is None  # grouped, not the small-bank fallback
    full, pruned = max_cosine(queries, bank), index.max_cosine(queries)
    assert torch.isnan(pruned[-1]) and torch.isnan(full[-1])
    assert torch.allclose(pruned[:-1], full[:-1], atol=1e-6, rtol=0)
    for limit in (0.5, float(full[:-1].median()), 0.95):
        assert torch.equal(index.any_similar(queries, limit), any_similar(queries, bank, limit))
    assert index.max_cosine(queries[:0]).shape == (0,)
    # narrow or small banks are searched whole, with the same answers
    for small in (bank[:, :32], bank[:100]):
        idx = CosineIndex(small)
        assert idx.whole is not None
        q = queries[:-1, : small.shape[1]]
        assert torch.allclose(idx.max_cosine(q), max_cosine(q, small), atol=1e-6, rtol=0)
    # a bank's index is kept while its tensor is the bank, and rebuilt when it is replaced
    banks = Banks(rgb=bank, keys=bank[:, :32], values=bank)
    assert banks.index("rgb") is banks.index("rgb")
    banks.rgb = bank[: MIN_ROWS + 10].clone()
    assert banks.index("rgb").size == MIN_ROWS + 10
