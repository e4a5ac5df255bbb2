"""The conductor over engines on the nodes of a pool: it asks the pool's index where a
prefix lives (one round trip) and routes to the engine whose own node holds it."""

from __future__ import annotations

import logging

import pytest
import torch

import kvstore
from engines.conductor import Conductor
from engines.decode import DecodeEngine
from engines.kv_io import KVBlockIO
from engines.presets import load_model
from engines.sampling import SamplingParams
from tests.cluster.conftest import Pool, wait_until
from tests.cluster.test_client import cluster_url
from tests.engines.test_conductor import COST


@pytest.mark.timeout(180)
def test_the_conductor_routes_to_the_engine_whose_node_holds_the_prefix(
        pool: Pool, caplog) -> None:
    caplog.set_level(logging.INFO, logger="engines.conductor")
    n0 = pool.start("n0", "--dram", "64MiB")
    n1 = pool.start("n1", "--dram", "64MiB")
    model = load_model("tiny").model
    prompt = torch.randint(0, 512, (200,), generator=torch.Generator().manual_seed(5)).tolist()
    sampling = SamplingParams(max_new_tokens=4)
    with kvstore.connect(n0.url) as s0, kvstore.connect(n1.url) as s1, \
            kvstore.connect(cluster_url(pool)) as whole:
        pool.wait_peers("n0", {"n1"}, s0)
        def engines() -> list[DecodeEngine]:  # (a conductor's close stops its engines)
            return [DecodeEngine(model, s, num_pages=64) for s in (s0, s1)]

        with Conductor([], engines()[1:], cost=COST) as only_d1:
            first = only_d1.run(prompt, sampling)  # computes the prefix on n1's engine
        probe = engines()
        keys = probe[0].io.keys(prompt)
        full = len(prompt) // probe[0].block_tokens
        wait_until(lambda: any(loc.leading == full for loc in whole.locate(keys)),
                   what="n1 published the prefix")
        # Any node serves the pool: asked one by one, both engines see the whole prefix.
        assert probe[0].io.cached_blocks(keys) == probe[1].io.cached_blocks(keys) == full
        with Conductor([], engines(), cost=COST) as blind:
            assert blind.route(prompt, sampling).decode == 0  # a tie: the first engine
        with Conductor([], engines(), cost=COST, pool=whole) as aware:
            route = aware.route(prompt, sampling)
            assert route.decode == 1 and route.cached_blocks_decode > 0
            assert len(route.local_blocks["d1"]) == full and route.local_blocks["d0"] == ()
            again = aware.run(prompt, sampling)
        assert again.output == first.output  # the same tokens, from the cached prefix
        assert again.num_cached_tokens > 0
    assert any("local d1=" in r.getMessage() and "tiers dram" in r.getMessage()
               for r in caplog.records)


@pytest.mark.timeout(300)
def test_kvstore_serve_on_a_pool_shares_prefixes_across_its_nodes(pool: Pool,
                                                                 tmp_path) -> None:
    """``kvstore serve --url kvstore+cluster://...``: engine processes on the pool's
    cluster-aware client; a prompt computed once is fetched from the pool the second
    time, and the conductor routed by the pool's index (its log names the nodes)."""
    import json
    import socket
    import urllib.request

    from tests.serving.process import ServeProcess

    n0 = pool.start("n0", "--dram", "64MiB")
    pool.start("n1", "--dram", "64MiB")
    with kvstore.connect(n0.url) as admin:
        pool.wait_peers("n0", {"n1"}, admin)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    served = ServeProcess(port, tmp_path / "serve.log", "--model", "tiny",
                          "--skip-tokenizer-init", "--max-model-len", "1024",
                          "--url", cluster_url(pool), "--log-level", "INFO", timeout_s=180)
    prompt = torch.randint(0, 512, (200,), generator=torch.Generator().manual_seed(8)).tolist()

    def complete() -> list[int]:
        body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 4,
                           "temperature": 0}).encode()
        request = urllib.request.Request(f"{served.url}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as answer:
            return json.loads(answer.read())["choices"][0]["token_ids"]

    def fetched_tokens() -> float:
        _, text = served.get("/metrics")
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith('kvstore_serve_prompt_tokens_total{source="fetched"}'))

    try:
        first = complete()
        model = load_model("tiny").model
        io = KVBlockIO(model, model.new_cache(num_pages=16, page_tokens=16), None)
        keys = io.keys(prompt)  # the engines' keys (their model's namespace)
        io.close()
        with kvstore.connect(cluster_url(pool)) as whole:
            wait_until(lambda: any(loc.leading >= len(prompt) // 16 - 1
                                   for loc in whole.locate(keys)), what="the prefix published")
        assert complete() == first == model.generate(prompt, 4)
        assert fetched_tokens() >= 176
    finally:
        served.close()
    log = served.log.read_text()
    assert "route " in log and "local d0=" in log
