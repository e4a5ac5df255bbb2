"""Which fetched blocks the copy engines move (the plan `engines.uva_copy` makes on the CPU;
the copies themselves are tested on the GPU in test_gpu_engines.py)."""

from __future__ import annotations


def test_dma_runs_split_blocks_where_address_stride_or_page_breaks():
    from engines.uva_copy import MAX_DMA_RUNS, MIN_DMA_RUN, dma_runs

    n = MIN_DMA_RUN
    packed = [1000 + 64 * i for i in range(n)]
    spread = [9000 + 128 * i for i in range(n)]
    pages = list(range(n))
    assert dma_runs(packed, pages) == [(0, n, 64)]
    # a stride change, then a page jump: three runs
    assert dma_runs(packed + spread + [s + 4096 for s in spread],
                    pages + [p + n for p in pages] + [p + 5 * n for p in pages]) == [
        (0, n, 64), (n, n, 128), (2 * n, n, 128)]
    assert dma_runs(packed[:-1], pages[:-1]) is None  # too short: small DMAs crawl
    scattered = [1000 + 64 * ((i * 7) % n) for i in range(n)]
    assert dma_runs(scattered, pages) is None
    def runs_apart(count: int) -> list[int]:  # ``count`` runs of n blocks, 10 MB apart
        return [10**7 * r + 64 * i for r in range(count) for i in range(n)]

    assert dma_runs(runs_apart(MAX_DMA_RUNS), list(range(n * MAX_DMA_RUNS))) is not None
    assert dma_runs(runs_apart(MAX_DMA_RUNS + 1), list(range(n * (MAX_DMA_RUNS + 1)))) is None
    assert dma_runs([], []) is None
