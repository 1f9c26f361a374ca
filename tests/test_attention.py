"""The mask predicates and the back-ends built from them."""

from __future__ import annotations

import pytest
import torch

from did_cli.core import attention
from did_cli.core.attention import attend, causal_predicate, dense_mask, mask_spec, train_predicate


def test_train_predicate_hand_written_case():
    # n = 4 tokens per half, blocks of 2: noisy x_t = 0..3, clean x_0 = 4..7
    n, bs = 4, 2
    idx = torch.arange(2 * n)
    got = train_predicate(idx[:, None], idx[None, :], bs, n).int()
    want = torch.tensor(
        [
            # xt0 xt1 xt2 xt3 x00 x01 x02 x03
            [1, 1, 0, 0, 0, 0, 0, 0],  # xt0: own noisy block only
            [1, 1, 0, 0, 0, 0, 0, 0],
            [0, 0, 1, 1, 1, 1, 0, 0],  # xt2: own noisy block + clean block 0
            [0, 0, 1, 1, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 1, 0, 0],  # x00: clean block 0 only, never noisy tokens
            [0, 0, 0, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 1, 1, 1],  # x02: clean blocks 0 and 1
            [0, 0, 0, 0, 1, 1, 1, 1],
        ]
    )
    assert torch.equal(got, want)


def test_causal_predicate_hand_written_case():
    idx = torch.arange(6)
    got = causal_predicate(idx[:, None], idx[None, :], 3, 6).int()
    want = torch.tensor([[1, 1, 1, 0, 0, 0]] * 3 + [[1] * 6] * 3)
    assert torch.equal(got, want)


def test_clean_tokens_never_see_noisy_ones():
    n = 32
    for bs in (1, 4, 8, 32):
        m = dense_mask("train", bs, n, torch.device("cpu"))
        assert not m[n:, :n].any()
        assert m.diagonal().all()  # every token sees itself (no empty softmax rows)


def test_masks_are_cached_per_key():
    cpu = torch.device("cpu")
    assert dense_mask("train", 4, 64, cpu) is dense_mask("train", 4, 64, cpu)
    assert dense_mask("train", 4, 64, cpu) is not dense_mask("train", 8, 64, cpu)


def test_block_size_equal_length_means_no_mask():
    assert mask_spec("causal", 16, 16).kind is None
    with pytest.raises(ValueError):
        mask_spec("train", 5, 16)


@pytest.mark.skipif(not attention.HAS_FLEX, reason="this torch has no FlexAttention")
@pytest.mark.parametrize("kind,bs", [("train", 1), ("train", 4), ("train", 16), ("causal", 4), ("causal", 8)])
def test_flex_equals_dense(kind, bs):
    torch.manual_seed(0)
    n = 64
    spec = mask_spec(kind, bs, n)
    q, k, v = (torch.randn(2, 2, spec.seq_len, 16) for _ in range(3))
    attention.set_backend("sdpa")
    dense = attend(q, k, v, spec)
    attention.set_backend("flex")
    try:
        flex = attend(q, k, v, spec)
    finally:
        attention.set_backend("auto")
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


def test_dense_mask_equals_explicit_softmax():
    torch.manual_seed(0)
    n, bs = 16, 4
    spec = mask_spec("train", bs, n)
    q, k, v = (torch.randn(1, 1, 2 * n, 8) for _ in range(3))
    scores = (q @ k.transpose(-1, -2)) / 8**0.5
    scores = scores.masked_fill(~dense_mask("train", bs, n, torch.device("cpu")), float("-inf"))
    torch.testing.assert_close(attend(q, k, v, spec), scores.softmax(-1) @ v, atol=1e-5, rtol=1e-5)
