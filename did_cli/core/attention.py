"""The kernel core: block-diffusion attention masks and the back-ends that run them.

One predicate per mask kind, written once over (query index, key index); every back-end is built
from it: a dense boolean mask for `scaled_dot_product_attention` (CPU, and the fallback), and a
FlexAttention `BlockMask` on CUDA. Both are cached per (kind, block size, length, device), so a
mix-scale run that switches block sizes every step builds each mask once.

No block size or length reaches a compiled region as a Python number: the dense mask is a tensor
input, and a BlockMask's mask function reads the block size from a 0-d tensor it captures, so
one compiled graph per shape serves every block size (an int there would be a guarded constant:
one recompile per block size, and past dynamo's recompile limit the unfused eager flex path that
materialises the whole score matrix).

Mask kinds
- "train": the vectorised `[x_t ; x_0]` pass over 2n tokens (BD3-LM). A query sees a key when
  (a) both are in the same half and the same block; (b) the query is noisy, the key clean and the
  key's block strictly earlier; (c) both are clean and the key's block is not later.
- "causal": block-causal over n tokens (sampling without a KV cache): a token sees its own block
  and every earlier one.
- block size >= n means one block: no mask at all (full bidirectional attention, MDLM).

Tensors are laid out [batch, heads, seq, head_dim] throughout. Keys and values may have fewer
heads than queries (grouped-query attention): each key/value head serves a contiguous group of
query heads, and no back-end copies them out to the query count.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from did_cli.util import first_line, warn

try:  # FlexAttention ships with torch >= 2.5; only its forward runs on CPU
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

    HAS_FLEX = True
except ImportError:  # pragma: no cover - old torch
    HAS_FLEX = False

try:  # optional: `pip install did-cli[flash]`
    from flash_attn import flash_attn_func  # type: ignore

    HAS_FLASH = True
except ImportError:
    HAS_FLASH = False


# --------------------------------------------------------------------------------------------
# The predicates (plain tensor arithmetic, valid for broadcasted index tensors)
# --------------------------------------------------------------------------------------------


def train_predicate(q: torch.Tensor, k: torch.Tensor, block_size: int | torch.Tensor, n: int) -> torch.Tensor:
    """Block-diffusion training mask over `[x_t ; x_0]` (indices 0..2n-1); `block_size` an int or
    a 0-d integer tensor."""
    q_clean, k_clean = q >= n, k >= n
    q_blk = torch.where(q_clean, q - n, q) // block_size
    k_blk = torch.where(k_clean, k - n, k) // block_size
    same_block = (q_blk == k_blk) & (q_clean == k_clean)
    noisy_sees_earlier_clean = (~q_clean) & k_clean & (k_blk < q_blk)
    clean_causal = q_clean & k_clean & (k_blk <= q_blk)
    return same_block | noisy_sees_earlier_clean | clean_causal


def causal_predicate(
    q: torch.Tensor, k: torch.Tensor, block_size: int | torch.Tensor, n: int
) -> torch.Tensor:
    """Block-causal mask over n tokens: a token sees its own and earlier blocks."""
    return (k // block_size) <= (q // block_size)


PREDICATES: dict[str, Callable[..., torch.Tensor]] = {"train": train_predicate, "causal": causal_predicate}


class MaskSpec(NamedTuple):
    """What the attention of one forward pass must respect. `kind=None` means no mask."""

    kind: str | None
    block_size: int
    n: int  # tokens per half: the sequence length L

    @property
    def seq_len(self) -> int:
        return 2 * self.n if self.kind == "train" else self.n


def mask_spec(kind: str, block_size: int, n: int) -> MaskSpec:
    if kind not in PREDICATES:
        raise ValueError(f"unknown mask kind {kind!r}")
    if block_size <= 0 or n % block_size:
        raise ValueError(f"block size {block_size} does not divide length {n}")
    if kind == "causal" and block_size >= n:
        return MaskSpec(None, n, n)  # one block: full attention
    return MaskSpec(kind, block_size, n)


# --------------------------------------------------------------------------------------------
# Cached mask objects
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def dense_mask(kind: str, block_size: int, n: int, device: torch.device) -> torch.Tensor:
    """Boolean [S, S] mask (True = may attend) for SDPA, built from the predicate."""
    s = 2 * n if kind == "train" else n
    idx = torch.arange(s, device=device)
    return PREDICATES[kind](idx[:, None], idx[None, :], block_size, n)


@functools.lru_cache(maxsize=64)
def flex_mask(kind: str, block_size: int, n: int, device: torch.device) -> BlockMask:
    """FlexAttention BlockMask from the same predicate (built once per key). The block size is a
    0-d tensor the mask function captures: compiled code reads it as an input, not a constant."""
    pred = PREDICATES[kind]
    bs = torch.tensor(block_size, dtype=torch.int32, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        return pred(q_idx, kv_idx, bs, n)

    s = 2 * n if kind == "train" else n
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=s, KV_LEN=s, device=str(device))


# --------------------------------------------------------------------------------------------
# Back-ends
# --------------------------------------------------------------------------------------------

_BACKEND = os.environ.get("DID_ATTN_BACKEND", "auto")  # auto | sdpa | flex


def set_backend(name: str) -> None:
    """Force a back-end for masked attention: 'auto' (flex on CUDA), 'sdpa' or 'flex'."""
    global _BACKEND
    if name not in ("auto", "sdpa", "flex"):
        raise ValueError(f"unknown attention backend {name!r}")
    _BACKEND = name


def get_backend() -> str:
    return _BACKEND


def _flex_fixed(q, k, v, block_mask, enable_gqa=False):
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def _flex_any(q, k, v, block_mask, enable_gqa=False):
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


FLEX_FAILED: set[str] = set()
"""Mask kinds whose compiled flex failed once (warned): they run as SDPA with a dense mask."""

COMPILE_ERRORS = (RuntimeError, ImportError, OSError)
"""What a failed compile or kernel launch raises (dynamo's and inductor's errors, an OOM, a
missing triton): caught to fall back. Anything else, an interrupt or a deadline, passes through."""

_DENSE_OF: dict[int, tuple[BlockMask, torch.Tensor]] = {}


@functools.lru_cache(maxsize=2)
def _compiled_flex(fixed: bool) -> Callable:
    # flex_attention is only fast when compiled. Two functions, two dynamo caches: the training
    # pass (one graph per shape, static) and the sampling passes, whose length follows the
    # prefix (dynamic, so a new length reuses the graph instead of counting towards the limit)
    return torch.compile(_flex_fixed, dynamic=False) if fixed else torch.compile(_flex_any, dynamic=True)


def _use_flex(device: torch.device) -> bool:
    if not HAS_FLEX:
        return False
    if _BACKEND == "flex":
        return True
    return _BACKEND == "auto" and device.type == "cuda"


def mask_for(spec: MaskSpec | None, device: torch.device) -> BlockMask | torch.Tensor | None:
    """The cached mask object `attend` uses for `spec` on `device` under the current back-end:
    a BlockMask (flex), a dense boolean tensor (SDPA), or None (unmasked). Looked up outside a
    compiled region and passed in, so torch.compile never traces the cache or the mask build."""
    if spec is None or spec.kind is None:
        return None
    if _use_flex(device):
        return flex_mask(spec.kind, spec.block_size, spec.n, device)
    return dense_mask(spec.kind, spec.block_size, spec.n, device)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: MaskSpec | None,
    mask: BlockMask | torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention of [B, H, S, D] tensors under `spec` (None = unmasked).
    `mask`: the object `mask_for(spec, q.device)` returns (looked up here when not given)."""
    kind = None if spec is None else spec.kind
    if kind is not None and mask is None:
        mask = mask_for(spec, q.device)
    return attend_kind(q, k, v, kind, mask)


def attend_kind(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str | None, mask: BlockMask | torch.Tensor | None
) -> torch.Tensor:
    """`attend` given the mask kind and object only: what a compiled region calls, so that no
    block size or length is among its arguments. k and v may have fewer heads than q (GQA)."""
    gqa = k.shape[1] != q.shape[1]
    if kind is None:
        if HAS_FLASH and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            # flash-attn wants [B, S, H, D] (and takes fewer key/value heads as they are)
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return out.transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if HAS_FLEX and isinstance(mask, BlockMask):
        if not q.is_cuda or torch.compiler.is_compiling():  # CPU (forward only); a compiled caller fuses it
            return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
        return compiled_flex_or_dense(q, k, v, kind, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def dense_of(mask: BlockMask) -> torch.Tensor:
    """The boolean [Q, KV] mask a BlockMask stands for, from its own mask function (cached)."""
    hit = _DENSE_OF.get(id(mask))
    if hit is None or hit[0] is not mask:
        q_len, kv_len = mask.seq_lengths
        dev = mask.kv_num_blocks.device
        zero = torch.zeros((), dtype=torch.int32, device=dev)
        q, k = torch.arange(q_len, device=dev), torch.arange(kv_len, device=dev)
        dense = mask.mask_mod(zero, zero, q[:, None], k[None, :]).expand(q_len, kv_len).contiguous()
        if len(_DENSE_OF) >= 64:
            _DENSE_OF.clear()
        hit = _DENSE_OF[id(mask)] = (mask, dense)
    return hit[1]


def compiled_flex_or_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kind: str,
    mask: BlockMask,
    flex: Callable | None = None,
) -> torch.Tensor:
    """Compiled flex attention (`flex`: the compiled function, by default `_compiled_flex`). When
    compiling or running it fails, the mask kind runs from then on as SDPA with the equivalent
    dense mask, which on CUDA takes the memory-efficient kernel: never the uncompiled flex,
    which materialises [B, H, S, S] float32 scores (~3 GB per layer at L = 1024, batch 16)."""
    gqa = k.shape[1] != q.shape[1]
    if kind not in FLEX_FAILED:
        try:
            return (flex or _compiled_flex(kind == "train"))(q, k, v, mask, gqa)
        except COMPILE_ERRORS as e:
            FLEX_FAILED.add(kind)
            warn(
                f"compiling flex_attention failed ({first_line(e)}); the {kind} mask runs as SDPA with a "
                "dense mask from now on (DID_ATTN_BACKEND=sdpa skips flex)"
            )
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_of(mask), enable_gqa=gqa)
