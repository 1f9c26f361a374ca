"""Our backbone reproduces the public reference implementation's logits (../shared/golden)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from did_cli.core import attention
from did_cli.io.model_folder import load_model

TOL = 1e-4


@pytest.fixture
def golden(golden_dir):
    model, info = load_model(golden_dir)  # the path users take for public checkpoints
    return (
        model,
        info,
        load_file(str(golden_dir / "inputs.safetensors")),
        load_file(str(golden_dir / "expected.safetensors")),
    )


def _check(logits: torch.Tensor, exp: dict, case: str, x0: torch.Tensor, positions=slice(None)) -> None:
    e = {k.split(".", 1)[1]: v[:, positions] for k, v in exp.items() if k.startswith(case + ".")}
    assert e, f"no stored case {case}"
    torch.testing.assert_close(logits[..., :512], e["logits_first512"], atol=TOL, rtol=0)
    got_x0 = logits.gather(-1, x0[:, positions, None])[..., 0]
    torch.testing.assert_close(got_x0, e["logit_of_x0"], atol=TOL, rtol=0)
    torch.testing.assert_close(logits[..., :50257].logsumexp(-1), e["logsumexp_no_mask"], atol=TOL, rtol=0)
    if "argmax_no_mask" in e:
        assert torch.equal(logits[..., :50257].argmax(-1), e["argmax_no_mask"].long())


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_training_pass_matches_reference(golden, backend):
    if backend == "flex" and not attention.HAS_FLEX:
        pytest.skip("this torch has no FlexAttention")
    model, _, inp, exp = golden
    attention.set_backend(backend)
    try:
        with torch.no_grad():
            for bs in (4, 16, 64):
                _check(model(inp["xt"], bs, x0=inp["x0"]), exp, f"train_block{bs}", inp["x0"])
            _check(model(inp["sample_input"], 4), exp, "sample_block4", inp["x0"])
    finally:
        attention.set_backend("auto")


def test_full_pass_matches_reference(golden):
    model, _, inp, exp = golden
    with torch.no_grad():
        _check(model(inp["xt"]), exp, "full_1L", inp["x0"])
        # block size = L through the training entry point drops the clean half: same logits
        _check(model(inp["xt"], 64, x0=inp["x0"]), exp, "train_block64", inp["x0"])


def test_kv_cache_sampling_matches_reference(golden):
    model, _, inp, exp = golden
    x = inp["sample_input"]
    cache = model.new_cache(batch=2, capacity=64)
    with torch.no_grad():
        for start in range(0, 60, 4):
            model.step(x[:, start : start + 4], cache, commit=True, need_logits=False)
        assert cache.length == 60
        logits = model.step(x[:, 60:64], cache)
    _check(logits, exp, "sample_block4", inp["x0"], positions=slice(60, 64))


def test_clip_range_is_read(golden):
    _, info, _, _ = golden
    lo, hi = info["clip"]
    assert lo == pytest.approx(0.45, abs=1e-6) and hi == pytest.approx(0.95, abs=1e-6)
