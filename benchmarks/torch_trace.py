"""One helper the GPU benchmarks share for their ``--profile DIR`` option: a call run under
torch's profiler (host calls, and CUDA kernels where there is a GPU), its Chrome trace
written as ``DIR/NAME.json.gz`` (open it in Perfetto)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def traced(profile_dir: str, name: str, fn: Callable[[], T]) -> T:
    """``fn()`` under torch's profiler, the device synchronized before its trace ends;
    its result. The trace goes to ``profile_dir/NAME.json.gz``."""
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(profile_dir, exist_ok=True)
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        result = fn()
        if cuda:
            torch.cuda.synchronize()
    prof.export_chrome_trace(os.path.join(profile_dir, f"{name}.json.gz"))
    return result
