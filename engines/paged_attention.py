"""Attention of a few new tokens over a paged KV cache, in two Triton kernels that a CUDA
graph can hold.

A decode step (one new token for each of several sequences) or the tail of a prompt whose
prefix came from the store reads every cached K and V of its sequences once per layer and
does little arithmetic: it is bound by memory, and by the host when each sequence's
attention is a handful of eager kernels (`engines.model.LlamaModel._attend`). Here the
whole batch's attention is two launches whose shapes are fixed per bucket of token counts,
reading each row's context length and each sequence's page table from device buffers, so
the forward of a layer, attention included, is one CUDA graph (`engines.cuda_graphs`).

The new tokens come as *rows* (one per token, the batch's chunks one after another) and
are grouped into *tiles*: up to `tile_rows` consecutive rows of one sequence. A program
takes one tile, one KV head and one *split* of the tile's context (flash-decoding: a long
context is cut into `splits` ranges read in parallel), runs an online softmax over its
range for every query head of the KV head's group and every row of the tile, and leaves
its unnormalised output with the running maximum and sum. A second kernel combines the
splits of each row and head. Row r of a tile at position p attends to positions
``[0, p]`` (causal, aligned to the lower right as `engines.model.causal_mask`).

The tiles' table (`TILE_FIELDS` by rows) and the page tables are inputs, filled per forward
by `fill_tiles`. Numerics: scores and the softmax in fp32 (exp2 with the scale folded in),
probabilities rounded to the cache's dtype before the product with V, as flash attention
does; results match `torch.nn.functional.scaled_dot_product_attention` to its rounding.

Triton is optional: without it (or on the CPU) `available()` is False and the forward runs
its eager attention as before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install: the eager attention runs instead
    triton = None

# One int64 row each in the tiles' table: the tile's sequence (its page table's row), its
# first row, its row count (0: no tile), the position of its first row's token.
TILE_FIELDS = ("seq", "row0", "rows", "pos0")
BLOCK_N = 64  # keys per step of a program's loop


def available(device: torch.device) -> bool:
    """Whether the kernels can run on ``device`` (a CUDA device, with Triton installed)."""
    return triton is not None and device.type == "cuda"


def supports(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether the kernels handle a model of these heads (a power-of-two head size of at
    least 16, query heads a multiple of the KV heads)."""
    return (head_dim >= 16 and head_dim & (head_dim - 1) == 0
            and num_heads % num_kv_heads == 0)


def tile_rows_for(num_heads: int, num_kv_heads: int) -> int:
    """Rows of a tile: 16 new tokens of one sequence, or fewer for a large group of query
    heads (a program's matrix is rows x group, at most 64)."""
    group = num_heads // num_kv_heads
    return max(1, min(16, 64 // group))


def splits_for(num_rows: int) -> int:
    """Splits of each tile's context in a forward of ``num_rows`` rows: enough programs to
    fill the GPU for one decoding sequence, fewer as the rows grow (their partial outputs
    take rows x heads x splits x head_dim floats)."""
    return max(1, min(32, 512 // num_rows))


def fill_tiles(tiles: torch.Tensor, chunks: Sequence[tuple[int, int]], tile_rows: int
               ) -> None:
    """Write the tiles of a forward into ``tiles`` (a host tensor ``[4, num_rows]``): each
    of ``chunks`` is ``(cached tokens, new tokens)`` of one sequence, in row order; the
    sequence's index is its row in the page tables. Unused tiles are all 0 (no rows)."""
    tiles.zero_()
    t = row = 0
    for seq, (start, n) in enumerate(chunks):
        for c in range(0, n, tile_rows):
            tiles[0, t], tiles[1, t] = seq, row + c
            tiles[2, t], tiles[3, t] = min(tile_rows, n - c), start + c
            t += 1
        row += n


def page_tables(pages: Sequence[Sequence[int]], width: int, *, pin: bool) -> torch.Tensor:
    """The int32 page tables ``[len(pages), width]`` of a forward's sequences (each one's
    first ``width`` pages, zeros after its last), in page-locked memory if ``pin``."""
    tables = torch.zeros(len(pages), width, dtype=torch.int32, pin_memory=pin)
    for row, owned in enumerate(pages):
        owned = owned[:width]
        tables[row, :len(owned)] = torch.tensor(owned, dtype=torch.int32)
    return tables


class PagedAttention:
    """The kernels' launches for one bucket of ``num_rows`` rows over one cache layout,
    with their scratch buffers (partial outputs of every split)."""

    def __init__(self, *, num_rows: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 page_tokens: int, device: torch.device) -> None:
        if not supports(num_heads, num_kv_heads, head_dim):
            raise ValueError(f"paged attention does not support {num_heads} heads over "
                             f"{num_kv_heads} KV heads of size {head_dim}")
        self.num_rows = num_rows
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.group = num_heads // num_kv_heads
        self.tile_rows = tile_rows_for(num_heads, num_kv_heads)
        self.program_rows = max(16, triton.next_power_of_2(self.tile_rows * self.group))
        self.page_tokens = page_tokens
        self.splits = splits_for(num_rows)
        self.scale = 1.0 / math.sqrt(head_dim)
        self._out = torch.empty(num_rows, num_heads, self.splits, head_dim,
                                dtype=torch.float32, device=device)
        self._max_sum = torch.empty(2, num_rows, num_heads, self.splits, dtype=torch.float32,
                                    device=device)

    def __call__(self, q: torch.Tensor, kv: torch.Tensor, tiles: torch.Tensor,
                 pages: torch.Tensor, valid: torch.Tensor, out: torch.Tensor) -> None:
        """Attention of ``q`` (``[num_rows, heads, dim]``, any strides with a unit last
        one) over the cache layer ``kv`` (``[2, pages, page_tokens, kv heads, dim]``,
        contiguous) into ``out`` (``[num_rows, heads, dim]``, contiguous). ``tiles``:
        the tiles' table (`fill_tiles`), ``pages``: int32 page tables ``[sequences,
        max pages]``, ``valid``: 1 for each row in a tile (the others' output is 0)."""
        rows = self.num_rows
        _split_kernel[(rows, self.num_kv_heads, self.splits)](
            q, kv, pages, tiles, self._out, self._max_sum,
            q.stride(0), q.stride(1), kv.stride(0), pages.stride(0),
            rows, self.splits, self.scale * 1.4426950408889634,
            GROUP=self.group, KV_HEADS=self.num_kv_heads, DIM=self.head_dim,
            PAGE=self.page_tokens, ROWS=self.program_rows, BLOCK_N=BLOCK_N,
            # fp32 products in fp32, not TF32 (the default): the eager forward's numbers
            PRECISION="ieee" if kv.dtype == torch.float32 else "tf32")
        _combine_kernel[(rows, self.num_heads)](
            self._out, self._max_sum, valid, out, rows, self.num_heads, self.splits,
            DIM=self.head_dim, SPLITS=triton.next_power_of_2(self.splits))


if triton is not None:
    @triton.jit
    def _split_kernel(q_ptr, kv_ptr, pages_ptr, tiles_ptr, out_ptr, max_sum_ptr,
                      q_row_stride, q_head_stride, v_offset, pages_stride,
                      num_rows, num_splits, scale_log2,
                      GROUP: tl.constexpr, KV_HEADS: tl.constexpr, DIM: tl.constexpr,
                      PAGE: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                      PRECISION: tl.constexpr):
        tile = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        rows = tl.load(tiles_ptr + 2 * num_rows + tile)  # 0: no tile (nothing read)
        seq = tl.load(tiles_ptr + tile)
        row0 = tl.load(tiles_ptr + num_rows + tile)
        pos0 = tl.load(tiles_ptr + 3 * num_rows + tile)
        context = pos0 + rows  # keys [0, context) are the tile's to read
        chunk = tl.cdiv(tl.cdiv(context, num_splits), BLOCK_N) * BLOCK_N
        start = split * chunk
        end = tl.minimum(start + chunk, context)

        i = tl.arange(0, ROWS)
        r = i // GROUP  # the program's matrix rows: (row of the tile, head of the group)
        live = r < rows
        row = row0 + r
        head = kv_head * GROUP + i % GROUP
        position = pos0 + r
        d = tl.arange(0, DIM)
        q = tl.load(q_ptr + row[:, None] * q_row_stride + head[:, None] * q_head_stride
                    + d[None, :], mask=live[:, None], other=0.0)
        v_ptr = kv_ptr + v_offset
        high = tl.full([ROWS], float("-inf"), tl.float32)
        total = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, DIM], tl.float32)
        n = tl.arange(0, BLOCK_N)
        for n0 in range(start, end, BLOCK_N):
            key = n0 + n
            inside = key < end
            page = tl.load(pages_ptr + seq * pages_stride + key // PAGE, mask=inside, other=0)
            at = ((page.to(tl.int64) * PAGE + key % PAGE) * KV_HEADS + kv_head) * DIM
            k = tl.load(kv_ptr + at[:, None] + d[None, :], mask=inside[:, None], other=0.0)
            v = tl.load(v_ptr + at[:, None] + d[None, :], mask=inside[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            seen = inside[None, :] & (key[None, :] <= position[:, None])
            s = tl.where(seen, s, float("-inf"))
            new_high = tl.maximum(high, tl.max(s, 1))
            base = tl.where(new_high == float("-inf"), 0.0, new_high)
            p = tl.exp2(s - base[:, None])
            keep = tl.exp2(high - base)
            total = total * keep + tl.sum(p, 1)
            acc = acc * keep[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            high = new_high
        at = (row * GROUP * KV_HEADS + head) * num_splits + split
        tl.store(out_ptr + at[:, None] * DIM + d[None, :], acc, mask=live[:, None])
        plane = num_rows * GROUP * KV_HEADS * num_splits
        tl.store(max_sum_ptr + at, high, mask=live)
        tl.store(max_sum_ptr + plane + at, total, mask=live)

    @triton.jit
    def _combine_kernel(out_ptr, max_sum_ptr, valid_ptr, result_ptr, num_rows, num_heads,
                        num_splits, DIM: tl.constexpr, SPLITS: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        d = tl.arange(0, DIM)
        valid = tl.load(valid_ptr + row) != 0
        s = tl.arange(0, SPLITS)
        used = s < num_splits
        at = (row * num_heads + head) * num_splits + s
        plane = num_rows * num_heads * num_splits
        high = tl.load(max_sum_ptr + at, mask=used, other=float("-inf"))
        total = tl.load(max_sum_ptr + plane + at, mask=used, other=0.0)
        top = tl.max(high, 0)
        weight = tl.where(high == float("-inf"), 0.0, tl.exp2(high - top))
        parts = tl.load(out_ptr + at[:, None] * DIM + d[None, :], mask=used[:, None],
                        other=0.0)
        result = tl.sum(parts * weight[:, None], 0) / tl.sum(total * weight, 0)
        result = tl.where(valid, result, 0.0)  # a padding row: whatever its partials held
        tl.store(result_ptr + (row * num_heads + head) * DIM + d,
                 result.to(result_ptr.dtype.element_ty))
