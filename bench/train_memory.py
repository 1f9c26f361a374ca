"""Training memory of the `small` DiT at L = 1024: an estimate by formula, checked by measurement.

    python bench/train_memory.py                 # the table of docs/train.md, then the checks
    python bench/train_memory.py --no-measure    # the table only

The estimate (per GPU, one process, bf16 autocast as `did train` runs on CUDA, block size < L:
the 2L `[x_t ; x_0]` pass of B x 2L tokens):
- weights, gradients, AdamW's two moments and the EMA: 4 bytes per parameter each (8 for AdamW),
  plus autocast's bf16 copies of the matrices the forward uses (kept for the backward);
- activations: what autograd keeps per transformer layer and token, each tensor counted from the
  code (`layer_bytes_per_token`); with --activation-checkpointing a layer keeps only its float32
  input, and the backward rebuilds one layer at a time;
- logits: the masked positions' output layer, [N, V] with N = masked fraction x B x L (0.5 on
  average over t ~ U[0, 1]; a clipped block-4 range such as [0.45, 0.95] makes it 0.7).
  ~12 bytes per logit alive at the peak (the saved float32 log-softmax, its gradient and the
  gradient of the logits, at the start of the log-softmax's backward). Chunked
  (`did_cli.core.diffusion.token_nll`): at most LOSS_CHUNK_ELEMENTS logits at a time. Before:
  the whole [N, V] at once (the float32 copy Accelerate's output conversion made came first).
Not counted: the allocator's fragmentation and cached blocks, CUDA context (~0.5 GiB), the
validation pass. The reference implementation used 34.5 GiB at batch 16 (66 GiB at 32) on the
same model (REFERENCE.md section 7).

The checks, on this machine's CPU at a small shape (the `tiny` width, L = 64):
- activations: the bytes autograd saves inside each transformer layer, per token (the difference
  between two batch sizes, so per-call constants cancel), against `layer_bytes_per_token` (a CPU
  dropout keeps a bf16 mask where CUDA's fused kernel keeps a bool one);
- logits: the peak resident memory of the loss's forward and backward over N rows, whole vs
  chunked, each in a fresh process, against the formula's bytes per logit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from did_cli.core.diffusion import LOSS_CHUNK_ELEMENTS, masked_nll  # noqa: E402
from did_cli.core.dit import DiT  # noqa: E402
from did_cli.core.model_config import preset  # noqa: E402

GIB = 2**30
F32, B16 = 4, 2
BYTES_PER_LOGIT = 12  # alive per logit at the peak of the loss's backward (see the module note)


def layer_bytes_per_token(d: int, heads: int, ff: int, mask_bytes: int = 1) -> int:
    """Bytes a DiT layer keeps for its backward per token under bf16 autocast (`mask_bytes`:
    one dropout mask element; 1 on CUDA, 2 on a CPU)."""
    norm = F32 * d + 2 * F32 + F32 * d + F32 * d  # LayerNorm input, mean/rstd, output, weighted output
    attention = (
        norm
        + B16 * d  # q/k/v projection input (autocast's bf16 copy)
        + B16 * 2 * d  # rotated q and k
        + B16 * 3 * d  # v: a view that keeps the whole q/k/v projection output alive
        + B16 * d
        + F32 * heads  # attention output and its log-sum-exp
        + B16 * d  # output projection input
        + mask_bytes * d
        + B16 * d  # dropout mask, dropped branch (the gate's multiplicand)
    )
    mlp = norm + B16 * d + B16 * ff * 2 + mask_bytes * d + B16 * d  # fc1 input, GELU in, fc2 in
    return attention + mlp


def model_facts(name: str = "small", length: int = 1024) -> dict:
    cfg = preset(name, model_length=length)
    with torch.device("meta"):
        model = DiT(cfg)
    params = sum(p.numel() for p in model.parameters())
    matrices = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "vocab_embed" not in n)
    return dict(cfg=cfg, params=params, matrices=matrices)


def estimate(batch: int, checkpointing: bool, facts: dict, masked: float = 0.5) -> dict[str, float]:
    """GiB per component for one process (see the module note)."""
    cfg, p = facts["cfg"], facts["params"]
    d, n, layers = cfg.hidden_dim, cfg.model_length, cfg.n_layers
    tokens = batch * 2 * n
    per_layer = layer_bytes_per_token(d, cfg.n_heads, cfg.mlp_ratio * d) * tokens
    rows = masked * batch * n
    logits = rows * cfg.vocab_size
    out = {
        "weights": F32 * p,
        "grads": F32 * p,
        "adamw": 2 * F32 * p,
        "ema": F32 * p,
        "bf16 copies": B16 * facts["matrices"],
        "per layer": F32 * d * tokens if checkpointing else per_layer,
        "activations": (F32 * d * tokens * layers + per_layer) if checkpointing else per_layer * layers,
        "logits": BYTES_PER_LOGIT * min(logits, LOSS_CHUNK_ELEMENTS),
        "logits before": BYTES_PER_LOGIT * logits,
    }
    out["total"] = sum(v for k, v in out.items() if k not in ("per layer", "logits before"))
    return {k: v / GIB for k, v in out.items()}


def table(facts: dict) -> str:
    cols = ["weights", "grads", "adamw", "ema", "bf16 copies", "per layer", "activations", "logits", "total"]
    lines = [
        "| batch | checkpointing | " + " | ".join(cols) + " | logits before chunking |",
        "|---" * (len(cols) + 3) + "|",
    ]
    for batch in (16, 32, 64):
        for ac in (False, True):
            e = estimate(batch, ac, facts)
            cells = " | ".join(f"{e[c]:.1f}" if e[c] >= 0.1 else f"{e[c]:.2f}" for c in cols)
            lines.append(f"| {batch} | {'on' if ac else 'off'} | {cells} | {e['logits before']:.1f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ checks


def saved_per_layer(model: DiT, batch: int, length: int) -> list[int]:
    """Bytes autograd saves inside each transformer layer during one training forward (distinct
    storages; parameters excluded, their bf16 copies are a constant the caller cancels)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    current: list[int | None] = [None]
    seen: set[int] = set()
    per = [0] * len(model.blocks)

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if current[0] is not None and ptr not in seen and ptr not in params:
            seen.add(ptr)
            per[current[0]] += t.untyped_storage().nbytes()
        return t

    hooks = []
    for i, blk in enumerate(model.blocks):
        hooks.append(blk.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i)))
        hooks.append(blk.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, model.config.vocab_size - 1, (batch, length), generator=g)
    masked = torch.rand((batch, length), generator=g) < 0.5
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        _, nll = masked_nll(model, x0, masked, 4, model.config.mask_id)
    for h in hooks:
        h.remove()
    del nll
    return per


def check_layers() -> None:
    cfg = preset("tiny", model_length=64, dropout=0.1)
    model = DiT(cfg).train()
    d = cfg.hidden_dim
    formula = layer_bytes_per_token(d, cfg.n_heads, cfg.mlp_ratio * d, mask_bytes=2)
    for ac in (False, True):
        model.set_checkpointing(ac)
        small, large = saved_per_layer(model, 2, 64), saved_per_layer(model, 4, 64)
        slope = [(b - a) / (2 * 2 * 64) for a, b in zip(small, large)]
        want = F32 * d if ac else formula  # with checkpointing: the layer's float32 input
        print(
            f"activations per layer and token, checkpointing {'on ' if ac else 'off'}: measured "
            f"{', '.join(f'{s:.0f}' for s in slope)} B, formula {want} B"
        )


LOSS_CHILD = """
import resource, sys, torch
import torch.nn.functional as F
from did_cli.core.diffusion import masked_token_loss, token_nll
rows, vocab, d, chunk = (int(a) for a in sys.argv[1:4] + sys.argv[5:6])
mode = sys.argv[4]
torch.manual_seed(0)
h = torch.randn(rows, d, requires_grad=True)
w = (torch.randn(vocab, d) * 0.02).requires_grad_()
b = torch.zeros(vocab, requires_grad=True)
t = torch.randint(0, vocab - 1, (rows,))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.autocast("cpu", dtype=torch.bfloat16):
    if mode == "whole":  # logits, the float32 copy Accelerate's output conversion makes, the loss
        loss = masked_token_loss(F.linear(h, w, b).float(), t, vocab - 1).sum()
    else:
        loss = token_nll(h, w, b, t, vocab - 1, chunk_elements=chunk).sum()
loss.backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


def check_logits(rows: int = 1024, vocab: int = 50258, d: int = 64, chunk: int = 1 << 22) -> None:
    root = str(Path(__file__).resolve().parents[1])
    got = {}
    for mode in ("whole", "chunked"):
        r = subprocess.run(
            [sys.executable, "-c", LOSS_CHILD, str(rows), str(vocab), str(d), mode, str(chunk)],
            capture_output=True,
            text=True,
            env={"PYTHONPATH": root, "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        )
        got[mode] = int(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else float("nan")
    fixed = 3 * F32 * vocab * d  # the weight's gradient and bf16 copy, the bias's: no logits
    print(
        f"loss over {rows} x {vocab} logits, peak resident growth: whole {got['whole'] / 2**20:.0f} MiB "
        f"({got['whole'] / (rows * vocab):.1f} B per logit), chunks of {chunk} logits "
        f"{got['chunked'] / 2**20:.0f} MiB ({(got['chunked'] - fixed) / chunk:.1f} B per chunk logit beyond "
        f"the weight's gradient); the estimate takes {BYTES_PER_LOGIT} B per logit alive (a CPU's resident "
        "size misses the zero-filled pages of the loss's gradient that are never written)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-measure", action="store_true", help="print the estimate only")
    ap.add_argument("--json", action="store_true", help="the estimate as JSON")
    args = ap.parse_args()
    facts = model_facts()
    if args.json:
        print(json.dumps({f"{b}/{ac}": estimate(b, ac, facts) for b in (16, 32, 64) for ac in (False, True)}))
        return
    cfg = facts["cfg"]
    print(
        f"`small`: {facts['params'] / 1e6:.1f}M parameters, L = {cfg.model_length}, bf16 autocast, block < L "
        f"(B x {2 * cfg.model_length} tokens per pass), GiB per process:\n"
    )
    print(table(facts))
    if not args.no_measure:
        print()
        torch.set_num_threads(1)
        check_layers()
        check_logits()


if __name__ == "__main__":
    main()
