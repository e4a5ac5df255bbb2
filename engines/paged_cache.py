"""A paged KV cache: K and V of many sequences in fixed-size pages of one preallocated pool.

Per layer, one tensor holds K and V of every page::

    kv[layer] : [2, num_pages (+ 1 pad page with CUDA graphs), page_tokens,
                 ^ 0 = K, 1 = V                                   num_kv_heads, head_dim]

A sequence owns a page table (a list of page ids); token ``p`` of the sequence lives in
page ``pages[p // page_tokens]`` at row ``p % page_tokens``. Pages are the unit of the
store too: with ``page_tokens == block_tokens``, page ``pages[b]`` holds exactly block
``b`` of the sequence, and one layer of it is ``kv[layer][:, page]``, the same
``K[tokens, heads, dim] | V[tokens, heads, dim]`` bytes as that layer's slice of a stored
block (`kvstore.layout`).

Invariants: a page is in the free list or owned by exactly one sequence; `free` of a page
that is not owned is a bug and raises.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engines.config import ModelConfig


def to_device(values: list[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """An int64 tensor of ``values`` on ``device``, without stalling the host: a plain
    host-to-GPU copy from pageable memory waits for the stream to drain, which would
    serialize the engine's CPU work with the GPU at every layer."""
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values,
                                                                          dtype=torch.long)
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass
class SequenceKV:
    """One sequence's page table and how many of its tokens have KV in the cache."""

    pages: list[int] = field(default_factory=list)
    num_tokens: int = 0

    def slots(self, start: int, end: int, page_tokens: int) -> torch.Tensor:
        """Flat row indices (page * page_tokens + row) of tokens ``[start, end)``."""
        positions = torch.arange(start, end)
        pages = torch.tensor(self.pages, dtype=torch.long)[positions // page_tokens]
        return pages * page_tokens + positions % page_tokens


class PagedKVCache:
    def __init__(self, config: ModelConfig, *, num_pages: int, page_tokens: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu",
                 cuda_graphs: bool = False) -> None:
        if num_pages <= 0 or page_tokens <= 0:
            raise ValueError(f"num_pages and page_tokens must be positive, got "
                             f"{num_pages} and {page_tokens}")
        self.config = config
        self.num_pages = num_pages
        self.page_tokens = page_tokens
        self.dtype = dtype
        self.device = torch.device(device)
        # With CUDA graphs, one more page that no sequence gets: the padding rows of a
        # graph's bucket write their K and V there (`engines.cuda_graphs`). The graphs
        # themselves are the model's (`LlamaModel.graphs`): the cache stays plain tensors.
        self.has_graphs = cuda_graphs and self.device.type == "cuda"
        self.pad_slot = num_pages * page_tokens if self.has_graphs else None
        num_pad_pages = 1 if self.has_graphs else 0
        shape = (2, num_pages + num_pad_pages, page_tokens, config.num_kv_heads,
                 config.head_dim)
        self.kv = [torch.zeros(shape, dtype=dtype, device=self.device)
                   for _ in range(config.num_layers)]
        # Free pages, lowest first once sorted: a request gets the lowest free pages, so a
        # cache that is not fragmented hands out consecutive ones, whose K and V every
        # layer's attention reads as a view (`plan`) instead of gathering them (an 8K-token
        # prompt of llama3-8b: 33 MB copied per layer). FIFO reuse rotated the free list and
        # made every later request's pages wrap around.
        self._free: list[int] = list(range(num_pages))
        self._free_sorted = True
        self._owned = [False] * num_pages

    @property
    def num_pool_pages(self) -> int:
        """Pages in each layer's K (and V) half: `num_pages`, plus the pad page if any."""
        return self.kv[0].shape[1]

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def page_bytes(self) -> int:
        """K and V of one page across all layers: one stored block."""
        return self.kv[0][:, 0].numel() * self.kv[0].element_size() * len(self.kv)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_tokens)

    def can_allocate(self, num_pages: int) -> bool:
        return num_pages <= len(self._free)

    def allocate(self, num_pages: int) -> list[int] | None:
        """``num_pages`` free pages, or None if there are not that many."""
        if num_pages > len(self._free):
            return None
        if not self._free_sorted:
            self._free.sort()
            self._free_sorted = True
        pages, self._free = self._free[:num_pages], self._free[num_pages:]
        for page in pages:
            self._owned[page] = True
        return pages

    def free(self, pages: list[int]) -> None:
        self._free_sorted = False
        for page in pages:
            if not self._owned[page]:
                raise ValueError(f"page {page} freed but not allocated")
            self._owned[page] = False
            self._free.append(page)

    def reserve(self, seq: SequenceKV, num_tokens: int) -> bool:
        """Grow ``seq``'s page table to hold ``num_tokens`` tokens; False if out of pages."""
        missing = self.pages_for(num_tokens) - len(seq.pages)
        if missing <= 0:
            return True
        pages = self.allocate(missing)
        if pages is None:
            return False
        seq.pages.extend(pages)
        return True

    def release(self, seq: SequenceKV) -> None:
        self.free(seq.pages)
        seq.pages = []
        seq.num_tokens = 0

    def write(self, layer: int, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """Store K and V of ``layer`` at flat ``slots``: ``kv`` is ``[tokens, 2 * kv_heads,
        head_dim]``, each token's K heads then its V heads (one copy for both)."""
        heads, dim = self.config.num_kv_heads, self.config.head_dim
        flat = self.kv[layer].view(2, -1, heads, dim)
        flat.index_copy_(1, slots, kv.view(-1, 2, heads, dim).transpose(0, 1).to(self.dtype))

    def plan(self, seq: SequenceKV, num_tokens: int) -> slice | torch.Tensor:
        """Where the first ``num_tokens`` tokens of ``seq`` are: a slice of pages when they
        are consecutive (then `gather` is a view, no copy), else the page indices. Made
        once per forward and used by every layer."""
        pages = seq.pages[:self.pages_for(num_tokens)]
        if pages[-1] - pages[0] == len(pages) - 1 and pages == list(
                range(pages[0], pages[-1] + 1)):
            return slice(pages[0], pages[-1] + 1)
        return to_device(pages, self.device)

    def gather(self, layer: int, plan: slice | torch.Tensor, num_tokens: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V (``[tokens, heads, dim]``) of the tokens a `plan` locates."""
        kv = self.kv[layer]
        kv = kv[:, plan] if isinstance(plan, slice) else kv.index_select(1, plan)
        kv = kv.reshape(2, -1, self.config.num_kv_heads, self.config.head_dim)[:, :num_tokens]
        return kv[0], kv[1]

    def page_layer(self, layer: int, page: int) -> torch.Tensor:
        """K and V of one page of one layer, ``[2, page_tokens, heads, dim]`` (a view)."""
        return self.kv[layer][:, page]
