"""Drafting: KV cache vs recomputation, samplers, NFEs, snapshot confidence, nucleus, errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

from did_cli.errors import UsageError
from did_cli.io.records import validate
from did_cli.sampling import DraftConfig, draft
from did_cli.sampling.core import gumbel_argmax, nucleus, token_probs
from did_cli.sampling.race import draw_noise
from did_cli.util import unigram_entropy

L = 32


@pytest.fixture(scope="module")
def model():
    return tiny_model(length=L, seed=1, std=0.08)


def run(model, tok, **kw):
    kw.setdefault("n", 2)
    kw.setdefault("batch_size", 2)
    return list(draft(model, DraftConfig(**kw), tokenizer=tok, progress=False))


# the parallel cases skip the nucleus sort (top-p 1): it is the costliest part on a CPU
CASES = [
    ("first-hitting", None, None, 1, 0.9),
    ("first-hitting", None, None, 4, 0.9),
    ("first-hitting", None, None, 16, 0.9),
    ("parallel", 2, None, 4, 1.0),
    ("parallel", 3, None, 16, 0.9),
    ("parallel", None, 0.5, 16, 1.0),
]


@pytest.mark.parametrize("sampler,k,thr,block,top_p", CASES)
def test_cached_equals_uncached(model, tok, sampler, k, thr, block, top_p):
    kw = dict(block_size=block, sampler=sampler, tokens_per_step=k, threshold=thr, seed=3, top_p=top_p)
    cached = run(model, tok, use_cache=True, **kw)
    plain = run(model, tok, use_cache=False, **kw)
    for a, b in zip(cached, plain):
        assert a["tokens"] == b["tokens"]
        assert a["confidence"][1:] == pytest.approx(b["confidence"][1:], rel=1e-5)
    # the two samples of a batch differ (per-sample generators)
    assert cached[0]["tokens"] != cached[1]["tokens"]


@pytest.mark.parametrize("block", [1, 4, 16])
def test_first_hitting_nfe_and_records(model, tok, block):
    cached = run(model, tok, block_size=block, n=1)
    plain = run(model, tok, block_size=block, n=1, use_cache=False)
    # nfe: one denoising call per generated token (BD3-LM's count); forward_passes adds the
    # cache's commit pass after each block but the last
    assert plain[0]["nfe"] == cached[0]["nfe"] == plain[0]["forward_passes"] == L - 1
    assert cached[0]["forward_passes"] == (L - 1) + (L // block - 1)
    rec = cached[0]
    validate(rec, vocab_size=model.config.vocab_size)
    assert rec["tokens"][0] == model.config.bos_id and len(rec["tokens"]) == L
    assert rec["confidence"][0] is None
    assert all(0.0 < c <= 1.0 for c in rec["confidence"][1:])
    assert model.config.mask_id not in rec["tokens"]
    assert (
        rec["model"]["vocab_size"] == model.config.vocab_size
        and rec["model"]["fingerprint"] == tok.fingerprint
    )
    assert rec["draft"]["block_size"] == block and rec["text"] == tok.decode(rec["tokens"][1:])


def test_parallel_k_takes_fewer_calls(model, tok):
    rec = run(model, tok, block_size=4, sampler="parallel", tokens_per_step=2, n=1, use_cache=False)[0]
    # first block: 3 masks -> 2 calls; 7 other blocks of 4 -> 2 calls each
    assert rec["nfe"] == 2 + 7 * 2


def test_snapshot_confidence_is_probability_at_commit(model, tok):
    """Block size 1: the logits a token was drawn from are those of its prefix + [MASK]."""
    rec = run(model, tok, block_size=1, n=1, top_p=0.9)[0]
    toks, conf = rec["tokens"], rec["confidence"]
    mask = model.config.mask_id
    with torch.no_grad():
        for i in (1, 7, L - 1):
            x = torch.tensor([toks[:i] + [mask]])
            probs = token_probs(model(x, 1)[0, i], mask, 0.9)
            assert probs[toks[i]].item() > 0.0
            assert conf[i] == pytest.approx(probs[toks[i]].item(), rel=1e-6)


def test_nucleus_convention():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    # BD3-LM: keep cumulative <= p; the token that crosses p (0.15 at 0.95) is dropped
    assert nucleus(p, 0.85)[0].tolist() == pytest.approx([0.625, 0.375, 0.0, 0.0])
    # the top token survives even when it alone exceeds p
    assert nucleus(p, 0.2)[0].tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0])
    assert torch.equal(nucleus(p, 1.0), p)
    # [MASK] never gets mass, whatever its logit
    logits = torch.tensor([[0.0, 1.0, 50.0]])
    probs = token_probs(logits, mask_id=2)
    assert probs[0, 2].item() == 0.0 and probs.sum().item() == pytest.approx(1.0)
    assert probs.dtype == torch.float64


def test_gumbel_argmax_never_picks_filtered_tokens():
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.0, 0.7, 0.0, 0.3], dtype=torch.float64).expand(4000, 4)
    picks = gumbel_argmax(probs, draw_noise(g, 4000, "cpu"))
    counts = torch.bincount(picks, minlength=4).tolist()
    assert counts[0] == counts[2] == 0
    assert abs(counts[1] / 4000 - 0.7) < 0.03


def test_batch_composition_does_not_change_samples(model, tok):
    alone = run(model, tok, n=3, batch_size=1, seed=5)
    together = run(model, tok, n=3, batch_size=3, seed=5)
    assert [r["tokens"] for r in alone] == [r["tokens"] for r in together]
    assert [r["id"] for r in together] == ["draft-5-0", "draft-5-1", "draft-5-2"]
    other_seed = run(model, tok, n=1, batch_size=1, seed=6)
    assert other_seed[0]["tokens"] != alone[0]["tokens"]


@pytest.fixture(scope="module")
def eos_model():
    m = tiny_model(length=L, seed=1, std=0.08)
    with torch.no_grad():  # make EOS likely so that samples end early
        m.output_layer.linear.bias[m.config.eos_id] += 10.0
    return m


def test_var_length_stops_at_first_eos(eos_model, tok):
    eos = eos_model.config.eos_id
    kw = dict(n=4, batch_size=4, block_size=4, var_length=True, seed=2)
    cached = run(eos_model, tok, **kw)
    plain = run(eos_model, tok, use_cache=False, **kw)
    assert [r["tokens"] for r in cached] == [r["tokens"] for r in plain]
    assert any(len(r["tokens"]) < L for r in cached)
    for r in cached:
        body = r["tokens"][1:]
        if len(r["tokens"]) < L:
            assert body[-1] == eos and eos not in body[:-1]
        else:
            assert eos not in body[:-1]
        assert len(r["confidence"]) == len(r["tokens"])
    # without --var-length the same model keeps full-length samples
    assert all(len(r["tokens"]) == L for r in run(eos_model, tok, n=2, block_size=4, seed=2))


def test_min_entropy_needs_more_than_256_tokens(model, tok, eos_model):
    # L = 32: no window of 256 tokens ever exists, so even an impossible bar changes nothing
    recs = run(model, tok, n=1, min_entropy=100.0, max_retries=2, block_size=16, top_p=1.0)
    first = run(model, tok, n=1, block_size=16, top_p=1.0, min_entropy=0.0)
    assert [r["entropy_rejections"] for r in recs] == [0] and recs[0]["tokens"] == first[0]["tokens"]
    assert "entropy_rejections" not in first[0]
    # a short variable-length sample (entropy at most ln n < 4) is kept as it is
    short = run(eos_model, tok, n=2, block_size=4, var_length=True, seed=2)
    assert all(len(r["tokens"]) < L and not r.get("entropy_truncated") for r in short)


def test_unigram_entropy():
    assert unigram_entropy([1, 1, 1]) == 0.0
    assert unigram_entropy([1, 2, 3, 4]) == pytest.approx(math.log(4))


@pytest.mark.parametrize(
    "kw,flag",
    [
        (dict(block_size=5), "--block-size"),
        (dict(length=64), "--length"),
        (dict(sampler="parallel"), "--sampler parallel"),
        (dict(sampler="parallel", tokens_per_step=2, threshold=0.5), "mutually exclusive"),
        (dict(tokens_per_step=2), "--sampler parallel"),
        (dict(sampler="greedy"), "--sampler"),
        (dict(top_p=0.0), "--top-p"),
        (dict(n=0), "-n"),
    ],
)
def test_config_errors(model, tok, kw, flag):
    with pytest.raises(UsageError, match=flag):
        run(model, tok, **kw)


def test_bf16_autocast_runs(model, tok):
    rec = run(model, tok, n=1, block_size=16, dtype="bf16")[0]
    assert len(rec["tokens"]) == L and all(0.0 < c <= 1.0 for c in rec["confidence"][1:])
