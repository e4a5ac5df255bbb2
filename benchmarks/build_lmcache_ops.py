#!/usr/bin/env python3
"""Build LMCache's CUDA kernels (``lmcache.cuda_ops``) against the torch installed here.

LMCache's wheels carry ``cuda_ops`` built against one torch (0.5.6: torch 2.13). On
another torch it fails to import (``undefined symbol: c10::...``) and LMCache falls back
to plain torch copies, so `vs_lmcache_gpu.py` would time the fallback, not LMCache's
kernel. This builds the same sources the way LMCache's own CUDA build profile does
(every ``.cu`` and ``.cpp`` of ``csrc/cuda``, ``csrc`` on the include path, the C++11
ABI) with torch's extension builder, and puts the module in place of the wheel's:

    python benchmarks/build_lmcache_ops.py --csrc LMCACHE_SDIST/csrc --into SITE/lmcache

``--csrc`` is the ``csrc`` directory of LMCache's source distribution (the sdist of the
same version as the installed wheel); ``--into`` the installed ``lmcache`` package. The
wheel's module is kept beside it as ``*.wheel``. JSON on stdout: the module's path, the
torch it was built against and the build's seconds. LMCache is a benchmark peer, never a
dependency of kvstore.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csrc", type=Path, required=True,
                        help="the csrc directory of LMCache's source distribution")
    parser.add_argument("--into", type=Path, required=True,
                        help="the installed lmcache package directory (holding __init__.py)")
    parser.add_argument("--arch", default="9.0",
                        help="TORCH_CUDA_ARCH_LIST for the build (default 9.0: Hopper)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="parallel compiles (default: every CPU)")
    args = parser.parse_args()

    cuda_dir = args.csrc / "cuda"
    sources = sorted(str(p) for p in cuda_dir.iterdir() if p.suffix in (".cu", ".cpp"))
    if not sources or not (cuda_dir / "pybind.cpp").exists():
        parser.error(f"{cuda_dir} holds no LMCache CUDA sources (pybind.cpp and *.cu)")
    if not (args.into / "__init__.py").exists():
        parser.error(f"{args.into} is not an installed lmcache package (no __init__.py)")

    os.environ["TORCH_CUDA_ARCH_LIST"] = args.arch
    os.environ["MAX_JOBS"] = str(args.jobs)
    import torch
    from torch.utils import cpp_extension

    abi = "-D_GLIBCXX_USE_CXX11_ABI=1"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as build:
        # The module's name must be cuda_ops: pybind.cpp defines PYBIND11_MODULE(cuda_ops).
        # Built, not imported as a module here: its initialisation imports
        # lmcache.lmcache_native, so it is imported below from its place in the package.
        cpp_extension.load(
            name="cuda_ops", sources=sources, extra_include_paths=[str(args.csrc)],
            extra_cflags=[abi], extra_cuda_cflags=[abi], build_directory=build,
            is_python_module=False, verbose=False)
        built = Path(build) / "cuda_ops.so"
        target = args.into / f"cuda_ops{sysconfig.get_config_var('EXT_SUFFIX')}"
        if target.exists() and not target.with_name(target.name + ".wheel").exists():
            target.rename(target.with_name(target.name + ".wheel"))
        shutil.copy2(built, target)
    seconds = time.perf_counter() - started
    sys.path.insert(0, str(args.into.parent))
    import lmcache.cuda_ops  # noqa: F401  (the check that it loads where LMCache looks)

    print(json.dumps({"module": str(target), "sources": len(sources),
                      "torch": torch.__version__, "cuda": torch.version.cuda,
                      "arch": args.arch, "build_s": round(seconds, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
