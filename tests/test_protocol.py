"""Each piece of the BD3-LM evaluation protocol, pinned on fixed inputs to values worked out from
the reference's rules (docs/protocol.md), not from this code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_model
from nelbo_reference import eval_nelbo, nelbo_loop_reference

from did_cli.core.diffusion import allowed_counts, corrupt, nelbo, sample_t
from did_cli.core.model_config import DiffusionConfig
from did_cli.errors import DidError, UsageError
from did_cli.evaluation import bootstrap as bs
from did_cli.evaluation.scorer import CLEANUP, Scorer, clean_up
from did_cli.sampling import DraftConfig, draft
from did_cli.sampling.stopping import window_entropy
from did_cli.training.clip_search import batch_statistic, clip_grid, pick, search_clip

MASK = 50257

# ------------------------------------------------------------------------------ clip search


def flat(pairs) -> list[float]:
    return [v for pair in pairs for v in pair]


def test_clip_grid_is_the_reference_grid():
    grid = clip_grid([0.5, 0.6, 0.7, 0.8, 0.9], 0.05)
    assert len(grid) == 36 and grid[0] == (1e-3, 1.0)
    # per width: 11, 9, 7, 5, 3 ranges, in width order, each starting at 1e-3 (the clamped 0)
    starts = [i for i, (lo, _) in enumerate(grid) if lo == 1e-3][1:]
    assert starts == [1, 12, 21, 28, 33]
    assert flat(grid[i] for i in starts) == pytest.approx(flat((1e-3, w) for w in (0.5, 0.6, 0.7, 0.8, 0.9)))
    assert flat(grid[1:12]) == pytest.approx(
        flat([(1e-3, 0.5)] + [(0.05 * k, 0.05 * k + 0.5) for k in range(1, 11)])
    )
    assert max(hi for _, hi in grid) == pytest.approx(1.0, abs=1e-12) and all(hi <= 1.0 for _, hi in grid)
    assert (0.45, 0.95) in grid and (0.3, 0.8) in grid  # the paper's B = 4 and B = 16 optima
    assert clip_grid([], 0.05) == [(1e-3, 1.0)]


def test_batch_statistic_and_winner():
    # weighted NLL rows [0 2 4 0] and [6 0 0 0], blocks of 2: block means [[1, 2], [3, 0]]
    sums = torch.tensor([[0.0 + 2, 4 + 0], [6 + 0, 0 + 0]])
    assert batch_statistic(sums, 2) == pytest.approx(5 / 3)  # unbiased variance of {1, 2, 3, 0}
    # the score sums the statistic over batches; the lowest sum wins, the first on a tie
    scores = {"A": 2 * batch_statistic(sums, 2), "B": 1.0, "C": 1.0}
    assert scores["A"] == pytest.approx(10 / 3) and pick(scores) == "B"
    flat = torch.full((2, 2), 3.0)  # equal block means: no variance, the best possible score
    assert pick({"x": 0.5, "y": batch_statistic(flat, 2)}) == "y"


def test_search_clip_scores_the_grid_and_keeps_the_lowest():
    model = tiny_model(length=16)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 50257, (3, 16), generator=g) for _ in range(2)]
    grid = clip_grid([0.5, 0.9], 0.05)
    best, scores = search_clip(model, batches, 4, MASK, seed=1, grid=grid)
    assert list(scores) == [f"{lo:g},{hi:g}" for lo, hi in grid]
    assert f"{best[0]:g},{best[1]:g}" == pick(scores)
    # the score is the statistic of the candidate's own loss, batch by batch, same noise
    again, _ = search_clip(model, batches, 4, MASK, seed=1, grid=grid)
    assert again == best


# ----------------------------------------------------------------------------- resampling


@pytest.mark.parametrize(
    "block,clip,allowed",
    [
        (4, (0.45, 0.95), [2, 3]),
        (4, (0.25, 0.75), [1, 2, 3]),
        (4, (0.5, 1.0), [2, 3, 4]),
        (8, (0.45, 0.95), [4, 5, 6, 7]),
        (16, (0.3, 0.8), list(range(5, 13))),
        (4, (1e-3, 0.5), [0, 1, 2]),
        (4, (0.0, 1.0), [0, 1, 2, 3, 4]),
        (4, (0.3, 0.45), []),
    ],
)
def test_allowed_masked_counts(block, clip, allowed):
    assert allowed_counts(block, clip) == allowed


@pytest.mark.parametrize("t,p2", [(0.5, 0.6), (0.7, 0.39130), (0.9, 0.14286)])
def test_resampling_keeps_blocks_inside_the_range(t, p2):
    # 5000 rows of 5 blocks of 4; blocks 1..4 (20,000 blocks) hold no fixed position 0
    x0 = torch.zeros((5000, 20), dtype=torch.long)
    tb = torch.full((5000, 5), t)
    g = torch.Generator().manual_seed(1)
    _, masked, t_tok = corrupt(x0, tb, 4, MASK, g, resample=(0.45, 0.95))
    counts = masked[:, 4:].view(5000, 4, 4).sum(-1)
    assert set(counts.unique().tolist()) <= {2, 3}
    # Binomial(4, t) conditioned on {2, 3}
    assert (counts == 2).float().mean().item() == pytest.approx(p2, abs=0.02)
    assert torch.equal(t_tok, tb.repeat_interleave(4, dim=1))  # the weight keeps the drawn t
    # block 0 counts position 0 before it is unmasked, as BD3-LM: 1 to 3 of its other tokens
    assert set(masked[:, :4].sum(-1).unique().tolist()) <= {1, 2, 3} and not masked[:, 0].any()


def test_resampling_leaves_allowed_blocks_alone_and_reaches_the_loss():
    x0 = torch.zeros((200, 16), dtype=torch.long)
    tb = 0.45 + 0.5 * torch.rand(
        (200, 4), generator=torch.Generator().manual_seed(2)
    )  # t inside the range, as in training
    _, plain, _ = corrupt(x0, tb, 4, MASK, torch.Generator().manual_seed(3))
    _, res, _ = corrupt(x0, tb, 4, MASK, torch.Generator().manual_seed(3), resample=(0.45, 0.95))
    # the first draw is shared; blocks already allowed (2 or 3 of 4, pos. 0 counted as drawn) keep it
    first = plain.clone()
    ok = torch.isin(first[:, 4:].view(200, 3, 4).sum(-1), torch.tensor([2, 3]))
    assert ok.any() and torch.equal(res[:, 4:].view(200, 3, 4)[ok], first[:, 4:].view(200, 3, 4)[ok])
    # training's loss goes through it: nelbo with resample == the loop over the resampled masks
    model = tiny_model(length=16)
    x = torch.randint(0, 50257, (3, 16), generator=torch.Generator().manual_seed(4))
    cfg = DiffusionConfig(clip=(0.45, 0.95), resample=True)
    out = nelbo(model, x, 4, cfg, MASK, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    t = sample_t(3, 4, cfg, generator=g)
    xt, m, t_tok = corrupt(x, t, 4, MASK, g, resample=cfg.clip)
    assert set(m[:, 4:].view(3, 3, 4).sum(-1).unique().tolist()) <= {2, 3}
    with torch.no_grad():
        torch.testing.assert_close(
            out.loss, nelbo_loop_reference(model, x, xt, t_tok, 4, MASK), atol=1e-5, rtol=1e-5
        )


def test_a_range_without_an_allowed_count_is_refused():
    from did_cli.core.diffusion import check_resample

    with pytest.raises(UsageError, match="--no-resample"):
        check_resample(4, (0.3, 0.45))
    with pytest.raises(DidError):
        corrupt(torch.zeros((1, 8), dtype=torch.long), torch.full((1, 2), 0.4), 4, MASK, resample=(0.3, 0.45))


# ------------------------------------------------------------------------- noise and NELBO


def test_stratified_t_and_the_weights():
    from did_cli.core.diffusion import posterior_weights, stratified_t

    t = stratified_t(1000, torch.Generator().manual_seed(0), "cpu", (1e-3, 1.0))
    u = ((t.double() - 1e-3) / (1 - 1e-3)).sort().values
    k = torch.arange(1000, dtype=torch.float64)
    assert ((u >= k / 1000 - 1e-6) & (u <= (k + 1) / 1000 + 1e-6)).all()  # one value per stratum
    # E[1/t | k of n masked], t ~ U[1e-3, 1]: (n + 1) / k for k >= 2 up to the tiny truncation
    w = posterior_weights(4)
    assert w[0] == 0 and w[2:].tolist() == pytest.approx([5 / 2, 5 / 3, 5 / 4], rel=1e-3)
    assert 4.9 < w[1] < 5.0  # (n + 1) / 1 truncated at t >= 1e-3


@pytest.mark.slow
def test_seed_to_seed_spread_at_the_global_block_shrinks():
    """Same 32 rows, 8 seeds: one plain-Monte-Carlo t per row (the old estimator) against t
    stratified over the set, the posterior weight and the default draws."""
    from did_cli.core.diffusion import estimate_nelbo

    model = tiny_model(length=32, std=0.3)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 2000, (32, 32), generator=g)
    old = []
    for seed in range(8):
        s, n = eval_nelbo(model, rows, 32, MASK, generator=torch.Generator().manual_seed(seed))
        old.append(s / n)
    new = [estimate_nelbo(model, [rows[:16], rows[16:]], 32, MASK, seed) for seed in range(8)]
    assert new[0].draws == 2 and new[0].rows == 32 and new[0].tokens == 32 * 31
    sd_old, sd_new = np.std(old, ddof=1), np.std([e.nelbo for e in new], ddof=1)
    assert sd_new < 0.5 * sd_old, (sd_old, sd_new)
    assert abs(np.mean([e.nelbo for e in new]) - np.mean(old)) < 3 * sd_old  # the same bound
    assert all(e.se > 0 for e in new)
    # the reference's 1/t weight is still there for an exact reproduction
    ref = estimate_nelbo(model, [rows], 32, MASK, 0, weight="inverse-t")
    assert math.isfinite(ref.nelbo)


# --------------------------------------------------------------------------- entropy check


@pytest.mark.parametrize(
    "L,B,n,first,last",
    [
        (1024, 4, 192, 260, 1024),
        (1024, 16, 48, 272, 1024),
        (1024, 8, 96, 264, 1024),
        (1024, 256, 3, 512, 1024),
        (1024, 1024, 1, 1024, 1024),
        (2048, 4, 448, 260, 2048),
    ],
)
def test_entropy_check_boundaries(L, B, n, first, last):
    # the reference checks after a block once the sample holds more than 256 tokens
    from did_cli.sampling.sampler_config import ENTROPY_WINDOW

    at = [e for e in range(B, L + 1, B) if e > ENTROPY_WINDOW]
    assert (len(at), at[0], at[-1]) == (n, first, last)


def test_window_entropy_values():
    rows = torch.tensor(
        [
            [i % 64 for i in range(256)],
            [i % 32 for i in range(256)],
            [i % 55 for i in range(256)],
            [i % 54 for i in range(256)],
            list(range(256)),
        ]
    )
    got = window_entropy(rows).tolist()
    assert got == pytest.approx([4.158883, 3.465736, 4.001985, 3.984552, 5.545177], abs=1e-6)


@pytest.fixture(scope="module")
def long_model():
    return tiny_model(length=416, seed=3, std=0.08)


def test_var_length_cuts_at_the_first_check(long_model, tok):
    # a prompt of 300 copies of one token: the first check (length 260 for B = 4, 272 for B = 16)
    # sees only that token and cuts the sample to length - 256
    for B, kept in ((4, 4), (16, 16)):
        rec = next(
            iter(
                draft(
                    long_model,
                    DraftConfig(n=1, block_size=B, var_length=True, prompts=[[11] * 300]),
                    tokenizer=tok,
                    progress=False,
                )
            )
        )
        assert (
            rec["tokens"] == [long_model.config.bos_id] + [11] * (kept - 1)
            and rec["entropy_truncated"] is True
        )


def test_fixed_length_rejects_a_dip_anywhere(long_model, tok):
    # distinct tokens, then 256 copies of one token up to position 399: the window dips below 4
    # at boundaries up to 400 (the first at 260); a check of the finished sample alone would
    # see 16 generated tokens in its last 256 and pass
    prompt = list(range(1000, 1143)) + [11] * 256
    kw = dict(n=1, block_size=4, prompts=[prompt], max_retries=2, top_p=1.0)
    with pytest.raises(DidError, match="all 3 draws"):
        list(draft(long_model, DraftConfig(**kw), tokenizer=tok, progress=False))
    rec = next(iter(draft(long_model, DraftConfig(entropy_fail="keep", **kw), tokenizer=tok, progress=False)))
    assert rec["entropy_rejections"] == 2 and rec["low_entropy"] is True and len(rec["tokens"]) == 416
    off = next(iter(draft(long_model, DraftConfig(min_entropy=0.0, **kw), tokenizer=tok, progress=False)))
    assert "low_entropy" not in off and "entropy_rejections" not in off


# ------------------------------------------------------------------------------------- NFE


@pytest.mark.parametrize("L,B", [(64, 4), (64, 16)])
def test_nfe_counts(tok, L, B):
    model = tiny_model(length=L, seed=4)
    cached, plain = (
        next(
            iter(
                draft(
                    model,
                    DraftConfig(n=1, block_size=B, top_p=1.0, use_cache=c),
                    tokenizer=tok,
                    progress=False,
                )
            )
        )
        for c in (True, False)
    )
    # BD3-LM's NFE: one denoising call per generated token, whatever the cache
    assert cached["nfe"] == plain["nfe"] == plain["forward_passes"] == L - 1
    assert cached["forward_passes"] == (L - 1) + (L // B - 1)  # + a commit pass per block but the last


@pytest.mark.slow
def test_nfe_counts_at_1024_and_block_4(tok):
    model = tiny_model(length=1024, seed=4)
    rec = next(iter(draft(model, DraftConfig(n=1, block_size=4, top_p=1.0), tokenizer=tok, progress=False)))
    # 3 + 255 x 4 = 1023 denoising calls (BD3-LM reports 1023); the commit passes add 255
    assert rec["nfe"] == 1023 and rec["forward_passes"] == 1278


# ------------------------------------------------------------------------- gen PPL text


def test_cleanup_replacements(tok):
    cases = {
        "Hello , world .": "Hello, world.",
        "I do n't know": "I don't know",
        "y is ?": "y is?",
        "a ' b": "a'b",
        "He 's here !": "He's here!",
        "I 'm sure we 've seen they 're": "I'm sure we've seen they're",
        "don't": "don't",
        " , ,": ",,",
        "x  ,": "x ,",
        "<|endoftext|> Hi .": "<|endoftext|> Hi.",
    }
    assert {k: clean_up(k) for k in cases} == cases
    assert len(CLEANUP) == 10
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    theirs = getattr(PreTrainedTokenizerBase, "clean_up_tokenization", None)
    if theirs is not None:  # the list is transformers' own
        assert all(theirs(None, k) == v for k, v in cases.items())
    # GPT-2: " ," is its own token (837), "," another (11); the scorer sees the cleaned text
    assert tok.decode([15496, 837, 995]) == "Hello , world"
    sc = Scorer("gpt2", model=None, tokenizer=tok.hf, context=1024)
    assert sc.encode("Hello , world") == [50256, 15496, 11, 995]
    sc.cleanup = False
    assert sc.encode("Hello , world") == [50256, 15496, 837, 995]


# -------------------------------------------------------------------- paired intervals


def test_paired_bootstrap_and_verdicts():
    rng = np.random.default_rng(0)
    a = [{"id": f"s{i}", "ppl": float(p)} for i, p in enumerate(rng.uniform(20, 60, 200))]
    better = [{"id": s["id"], "ppl": s["ppl"] * 0.9} for s in a]  # every sample 10% lower
    ci = bs.relative_change(*bs.paired(a, better, "ppl"))
    assert (
        ci["estimate"] == pytest.approx(-0.1)
        and ci["lo"] == pytest.approx(-0.1)
        and ci["hi"] == pytest.approx(-0.1)
    )
    assert bs.verdict(ci) == "beats"
    noisy = [{"id": s["id"], "ppl": s["ppl"] * float(f)} for s, f in zip(a, rng.uniform(0.8, 1.2, 200))]
    ci = bs.relative_change(*bs.paired(a, noisy, "ppl"))
    assert ci["lo"] < 0 < ci["hi"] and bs.verdict(ci) == "level"
    assert bs.verdict({"lo": 0.01, "hi": 0.2}) == "worse"
    assert bs.paired(a, a[:-1], "ppl") is None  # other ids: not paired
    assert bs.within({"lo": -0.02, "hi": 0.01}, 0.03) and not bs.within({"lo": -0.05, "hi": 0.01}, 0.03)


def test_compare_carries_intervals():
    from did_cli.evaluation.gen_ppl import compare

    s1 = [{"id": str(i), "ppl": 10.0 + i, "entropy": 4.0} for i in range(20)]
    s2 = [{"id": str(i), "ppl": (10.0 + i) * 1.05, "entropy": 4.0 * 0.98} for i in range(20)]

    def summ(s):
        return {
            "n": 20,
            "mean_ppl": np.mean([x["ppl"] for x in s]),
            "mean_entropy": np.mean([x["entropy"] for x in s]),
        }

    rows = compare(
        {
            "a": {"summary": summ(s1), "samples": s1},
            "b": {"summary": summ(s2), "samples": s2},
            "c": {"summary": summ(s2), "samples": s2[:10]},
        }
    )
    assert "verdict" not in rows[0]
    assert rows[1]["rel_mean_ppl_ci"] == pytest.approx([0.05, 0.05]) and rows[1]["verdict"] == "worse"
    assert rows[1]["rel_entropy_ci"] == pytest.approx([-0.02, -0.02]) and rows[1]["paired"] == 20
    assert rows[2]["rel_mean_ppl_ci"] is None and rows[2]["verdict"] is None  # not the same ids


# ---------------------------------------------------------------------------- data rows


def test_raw_row_layout(tmp_path, tok):
    import json

    from did_cli.io.data import PreparedData
    from did_cli.io.packing import prepare

    docs = ["one two three four five six seven", "eight nine ten", "eleven twelve thirteen fourteen"]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    stream = [t for d in docs for t in tok.encode(d) + [tok.eos_id]]
    meta = prepare([str(src)], tmp_path / "raw", seq_len=4, val_docs=0, layout="raw", progress=False)
    rows = np.asarray(PreparedData(tmp_path / "raw").rows("train"))
    n = len(stream) // 4
    assert meta["row_layout"] == "raw" and rows.tolist() == np.asarray(stream[: n * 4]).reshape(n, 4).tolist()
    prepare([str(src)], tmp_path / "bos", seq_len=4, val_docs=0, progress=False)
    bos = np.asarray(PreparedData(tmp_path / "bos").rows("train"))
    assert (bos[:, 0] == tok.bos_id).all() and bos[:, 1:].reshape(-1).tolist() == stream[: len(bos) * 3]
    # position 0 of a raw row is an ordinary token: never masked, never counted
    x = torch.from_numpy(rows.astype(np.int64))
    _, masked, _ = corrupt(x, torch.ones((len(x), 1)), 4, MASK)
    assert not masked[:, 0].any() and masked[:, 1:].all()
    with pytest.raises(UsageError, match="--layout"):
        prepare([str(src)], tmp_path / "x", seq_len=4, layout="bos+eos", progress=False)


# ---------------------------------------------------------------------- leave-one-out


def test_leave_one_out_confidence_equals_one_mask_at_a_time():
    from did_cli.sampling.posthoc import posthoc_confidence

    model = tiny_model(length=16, seed=5)
    x = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        conf, calls = posthoc_confidence(model, x, [(1, 16), (3, 10)], True, rows_per_call=5)
        assert calls == math.ceil((15 + 7) / 5)
        for r, (lo, hi) in enumerate([(1, 16), (3, 10)]):
            for p in range(16):
                if not lo <= p < hi:
                    assert math.isnan(conf[r, p])
                    continue
                xx = x[r : r + 1].clone()
                xx[0, p] = MASK
                lg = model(xx)[0, p].double()
                lg[MASK] = -math.inf
                assert conf[r, p].item() == pytest.approx(torch.softmax(lg, -1)[x[r, p]].item(), rel=1e-6)
        plain, one = posthoc_confidence(model, x, [(1, 16), (3, 10)], False, 5)
    assert one == 1 and not torch.allclose(plain[0, 1:], conf[0, 1:])  # seeing x_i is not leaving it out
