"""The sampler's arithmetic: the histogram nucleus is the full sort's on adversarial rows, the
pruned sampler draws the definition's tokens, and the race noise is exact Gumbel-max noise that
depends on a row alone."""

from __future__ import annotations

import math

import pytest
import torch

from did_cli.sampling import race
from did_cli.sampling.nucleus import gumbel_argmax, kept_set, sample_rows, token_probs
from did_cli.sampling.race import NOISE_ARRIVALS, draw_noise

V = 3000
MASK = 7


def _rows() -> dict[str, torch.Tensor]:
    """Rows [n, V] of raw logits that stress the nucleus: flat to peaked, ties, rounding."""
    g = torch.Generator().manual_seed(0)
    out = {f"gauss {s}": torch.randn(4, V, generator=g) * s for s in (0.1, 1.0, 3.0, 6.0, 12.0)}
    out["near-uniform"] = torch.randn(4, V, generator=g) * 1e-6
    out["bf16 ties"] = torch.cat(
        [(torch.randn(2, V, generator=g) * s).bfloat16().float() for s in (2.0, 8.0)]
    )
    out["uniform"] = torch.zeros(2, V)
    tie = torch.full((2, V), -5.0)
    tie[:, :40] = 3.0  # a tie group across the cut-off
    out["tie group"] = tie
    # one optimiser step from BD3-LM's zero init: unseen tokens tie at the minimum
    step = torch.full((2, V), -5.4896e-06)
    step[:, torch.randperm(V, generator=g)[:60]] = 5.493e-06 + torch.rand(60, generator=g) * 1e-10
    out["one step"] = step
    top = torch.randn(2, V, generator=g)
    top[:, MASK] = 40.0  # [MASK] is never kept, however likely
    out["mask on top"] = top
    peak = torch.randn(2, V, generator=g)
    peak[:, 11] = 30.0  # the top token alone passes p: kept all the same
    out["one token"] = peak
    # float32 logits closer together than the float32 rounding of their exp
    out["fine"] = 100.0 + torch.randint(0, 64, (2, V), generator=g).float() * 7.62939453125e-06
    # exact sums: 2 or 4 equal tokens, the rest underflows, cumulative sums hit p exactly
    exact = torch.full((2, V), -2000.0)
    exact[0, 100:102] = 0.0
    exact[1, [3, 50, 900, 2999]] = 1.0
    out["exact"] = exact
    return out


ROWS = _rows()
TOP_PS = [0.25, 0.5, 0.75, 0.9, 1.0]


@pytest.mark.parametrize("top_p", TOP_PS)
@pytest.mark.parametrize("name", list(ROWS))
def test_histogram_nucleus_is_the_full_sorts(name, top_p):
    """Rows not marked unsure keep exactly the full sort's nucleus; the sampler's tokens (both
    paths) are the definition's and its probabilities those of the renormalised nucleus."""
    lg = ROWS[name]
    probs = token_probs(lg, MASK, top_p)
    noise = draw_noise(torch.Generator().manual_seed(1), len(lg), "cpu")
    want = gumbel_argmax(probs, noise)
    for pruned in (False, True):
        tok, p = sample_rows(lg, noise, MASK, top_p, pruned=pruned)
        assert torch.equal(tok, want), (name, pruned)
        torch.testing.assert_close(p, probs.gather(1, want[:, None])[:, 0], rtol=1e-12, atol=0)
    if top_p < 1.0:
        kept, unsure = kept_set(lg, MASK, top_p)
        assert torch.equal(kept[~unsure], (probs > 0)[~unsure]), name
        if name.startswith("gauss") or name in ("near-uniform", "one step", "bf16 ties", "uniform"):
            assert not unsure.any()


def test_exact_sums_are_left_to_the_full_sort():
    """Where a cumulative sum lands on p, float64 order of additions decides: the histogram says
    unsure and the full sort decides (and BD3-LM's rule keeps the token that reaches p)."""
    kept, unsure = kept_set(ROWS["exact"], MASK, 0.5)
    assert unsure.all() and kept[1].sum() == 2  # 0.25 + 0.25 = 0.5 <= 0.5: exact, and kept
    probs = token_probs(ROWS["exact"], MASK, 0.5)
    assert (probs[0] > 0).sum() == 1 and (probs[1] > 0).sum() == 2


@pytest.mark.slow
def test_gpt2_sized_rows():
    """The same at the bundled vocabulary's size, on a random tiny model's logits at three scales."""
    g = torch.Generator().manual_seed(3)
    lg = torch.cat([torch.randn(6, 50258, generator=g) * s for s in (0.5, 2.0, 5.0)])
    noise = draw_noise(torch.Generator().manual_seed(4), len(lg), "cpu")
    for top_p in (0.9, 1.0):
        want = gumbel_argmax(token_probs(lg, 50257, top_p), noise)
        assert torch.equal(sample_rows(lg, noise, 50257, top_p, pruned=True)[0], want)


def test_a_row_samples_the_same_alone_or_in_a_batch():
    """Batch independence: a row's token and probability depend on its logits and noise only."""
    lg = torch.cat([ROWS["gauss 3.0"], ROWS["near-uniform"], ROWS["one step"]])
    noise = draw_noise(torch.Generator().manual_seed(2), len(lg), "cpu")
    tok, p = sample_rows(lg, noise, MASK, 0.9, pruned=True)
    for i in range(len(lg)):
        t1, p1 = sample_rows(lg[i : i + 1], noise[i : i + 1], MASK, 0.9, pruned=True)
        assert t1.item() == tok[i].item() and p1.item() == p[i].item()


def test_race_clocks_are_iid_exponential():
    """Every token's clock: its first arrival or T_c + an Exp(1) of its own; over the vocabulary
    they look like iid Exp(1) (mean, tail), and only labelled tokens ring before T_c."""
    rc = race.race(draw_noise(torch.Generator().manual_seed(5), 1, "cpu"), 20000)
    ids = torch.arange(20000)
    e = race.clocks(rc, torch.zeros_like(ids), ids, 20000)
    assert abs(e.mean().item() - 1.0) < 0.03
    assert abs((e > 2.0).double().mean().item() - math.exp(-2.0)) < 0.01
    early = (e <= rc.last[0, 0]).nonzero()[:, 0]
    assert set(early.tolist()) == set(rc.labels[0].tolist()) and len(rc.labels[0]) == NOISE_ARRIVALS
    u = race.hash_uniform(rc.keys[0], ids)
    assert len(u.unique()) == 20000 and 0.0 <= u.min() and u.max() < 1.0


def test_race_winner_follows_the_distribution():
    """The pruned sampler's token frequencies over many rows match the nucleus probabilities."""
    lg = torch.full((4000, V), -30.0)
    lg[:, :4] = torch.tensor([2.0, 1.5, 1.0, 0.0])  # p ~ [0.48, 0.29, 0.18, 0.06]
    noise = draw_noise(torch.Generator().manual_seed(6), len(lg), "cpu")
    tok, p = sample_rows(lg, noise, MASK, 0.9, pruned=True)
    probs = token_probs(lg[:1], MASK, 0.9)[0, :4]
    freq = torch.bincount(tok, minlength=4)[:4].double() / len(lg)
    assert probs[3] == 0.0 and freq[3] == 0.0  # the token that crosses p is dropped
    assert (freq - probs).abs().max() < 0.03
    torch.testing.assert_close(p, probs[tok], rtol=1e-12, atol=0)
