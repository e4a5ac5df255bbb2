"""The fp8 KV codec (`kvstore.codec`): round trips within its stated bounds, its byte
layout, bad input, and engines that store compressed blocks in a namespace of their own
(a real store; the tiny model on the CPU, and on a GPU with the `gpu` marker)."""

from __future__ import annotations

import pytest
import torch

import kvstore
from engines.decode import DecodeEngine
from engines.paged_cache import PagedKVCache
from engines.prefill import PrefillEngine
from engines.presets import load_model
from engines.sampling import SamplingParams
from kvstore.codec import E4M3_MAX, Fp8Codec, check_codec, codec_for
from kvstore.errors import ConfigError
from kvstore.layout import KVLayout

LAYOUT = KVLayout(num_layers=3, num_kv_heads=4, head_dim=32, block_tokens=16,
                  dtype="bfloat16")


def blocks_of(n: int, seed: int = 0) -> torch.Tensor:
    """Values of very different ranges per head, zeros and tiny values included."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 2, 16, 4, 32, generator=g)
    x = x * torch.tensor([1e-3, 1.0, 30.0, 500.0]).view(1, 1, 1, 1, 4, 1)
    x[:, 0, 0, :4] = 0.0
    x[:, 1, 1, 0, 0, :8] = 1e-9
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_within_the_bounds(dtype) -> None:
    codec = Fp8Codec(LAYOUT)
    x = blocks_of(5).to(dtype)
    stored = codec.encode(x)
    assert stored.dtype == torch.uint8 and tuple(stored.shape) == (5, codec.block_bytes)
    y = codec.decode(stored, torch.float32)
    ref = x.float()
    scale = ref.abs().amax(dim=5, keepdim=True) / E4M3_MAX  # one per token and head
    bound = torch.maximum(ref.abs() * 2.0 ** -4, scale * 2.0 ** -10)
    assert bool(((y - ref).abs() <= bound * (1 + 1e-6)).all())
    assert bool((y[:, 0, 0, :4] == 0).all())  # zeros stay zeros
    # Each vector's largest magnitude comes back exactly (448 is an e4m3 value).
    assert torch.allclose(y.abs().amax(dim=5), ref.abs().amax(dim=5), rtol=1e-6)
    assert codec.decode(stored, dtype).dtype == dtype


def test_the_stored_layout_is_chunks_of_fp8_values_then_per_head_scales() -> None:
    codec = Fp8Codec(LAYOUT)
    assert codec.payload_bytes == 16 * 4 * 32
    assert codec.chunk_bytes == 16 * 4 * 32 + 16 * 4 * 4  # values, a scale per token-head
    assert codec.block_bytes == 3 * 2 * codec.chunk_bytes < LAYOUT.block_bytes
    odd = Fp8Codec(KVLayout(num_layers=1, num_kv_heads=3, head_dim=64, block_tokens=5,
                            dtype="bfloat16"))
    assert odd.chunk_bytes == 5 * 3 * 64 + 64  # 15 scales (60 bytes), padded to 64
    padded = odd.encode(torch.randn(1, 1, 2, 5, 3, 64))
    assert bool((padded.view(2, -1)[:, -4:] == 0).all())
    x = blocks_of(1)
    stored = codec.encode(x)[0]
    layer, half = 2, 1
    chunk = stored[(2 * layer + half) * codec.chunk_bytes:][:codec.chunk_bytes]
    scales = chunk[codec.payload_bytes:].clone().view(torch.float32).view(16, 4)
    assert torch.allclose(scales, x[0, layer, half].abs().amax(dim=2) / E4M3_MAX)
    values = chunk[:codec.payload_bytes].clone().view(torch.float8_e4m3fn).float()
    assert torch.allclose(values.view(16, 4, 32) * scales.view(16, 4, 1),
                          codec.decode(stored[None], torch.float32)[0, layer, half])


def test_non_finite_values_and_bad_input() -> None:
    codec = Fp8Codec(LAYOUT)
    x = blocks_of(1)
    x[0, 0, 0, 0, 1, 0] = float("nan")
    x[0, 0, 0, 1, 1, 0] = float("inf")
    x[0, 0, 0, 2, 1, 0] = float("-inf")
    y = codec.decode(codec.encode(x), torch.float32)
    assert bool(torch.isfinite(y).all())
    assert y[0, 0, 0, 0, 1, 0] == 0
    for token, sign in ((1, 1), (2, -1)):  # the vector's largest finite magnitude
        biggest = torch.nan_to_num(x[0, 0, 0, token, 1], posinf=0, neginf=0).abs().max()
        assert torch.isclose(y[0, 0, 0, token, 1, 0], sign * biggest)
    with pytest.raises(ValueError, match="shape"):
        codec.encode(torch.zeros(1, 3, 2, 16, 4, 16))
    with pytest.raises(ValueError, match="uint8"):
        codec.decode(torch.zeros(1, codec.block_bytes - 1, dtype=torch.uint8), torch.float32)
    with pytest.raises(ConfigError, match="unknown KV codec"):
        check_codec("lz4")
    assert codec_for("none", LAYOUT) is None and codec_for(None, LAYOUT) is None
    assert LAYOUT.namespace("m", codec="fp8") != LAYOUT.namespace("m")
    assert LAYOUT.namespace("m", codec="none") == LAYOUT.namespace("m")


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def model(request):
    return load_model("tiny", device=request.param, dtype=torch.float32).model


def prompt_of(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_engines_with_fp8_blocks_share_them_and_only_them(model) -> None:
    """An fp8 prefill engine publishes blocks of half the size; a bf16 (lossless) engine
    on the same store finds none of them, an fp8 decode engine finds them all, and the KV
    it loads is the prefill's within the codec's bounds."""
    prompt = prompt_of(100, seed=1)
    sampling = SamplingParams(max_new_tokens=5)
    with kvstore.Store(kvstore.StoreConfig(dram_bytes="64MiB", hbm_bytes=0)) as store:
        with PrefillEngine(model, store, num_pages=64, kv_codec="fp8") as prefill:
            first = prefill.prefill(prompt)
            assert first.num_published_blocks == 6
            keys = prefill.io.keys(prompt)
            assert store.get(keys[0]) is not None
            assert len(store.get(keys[0])) == prefill.io.codec.block_bytes
            assert prefill.io.codec.block_bytes < prefill.io.layout.block_bytes / 3.5  # fp32
        with DecodeEngine(model, store, num_pages=64) as lossless:
            assert lossless.io.cached_blocks(lossless.io.keys(prompt)) == 0
        with DecodeEngine(model, store, num_pages=64, kv_codec="fp8") as decode:
            request = decode.add_request(prompt, sampling)
            while decode.has_work:
                decode.step()
            assert request.num_cached_tokens == 6 * 16
            assert len(request.output) == 5
            seq = prefill_kv(model, prompt)  # the pages a plain forward makes
            io = decode.io
            from engines.paged_cache import SequenceKV
            mine = SequenceKV()
            assert decode.cache.reserve(mine, 96)
            load = io.fetch(keys[:6], mine)
            load.wait_all()
            for layer in range(model.config.num_layers):
                got = decode.cache.kv[layer][:, mine.pages[:6]].float()
                ref = seq[layer]
                scale = ref.abs().amax(dim=4, keepdim=True) / E4M3_MAX
                bound = torch.maximum(ref.abs() * 2.0 ** -4, scale * 2.0 ** -10)
                assert bool(((got - ref).abs() <= bound * 1.01 + 1e-7).all()), layer
            decode.cache.release(mine)


def prefill_kv(model, prompt: list[int]) -> list[torch.Tensor]:
    """Each layer's K and V of ``prompt``'s 6 full blocks from a plain forward:
    ``[2, 6, tokens, heads, dim]`` in fp32."""
    from engines.paged_cache import SequenceKV

    cache = model.new_cache(num_pages=8, page_tokens=16)
    seq = SequenceKV()
    cache.reserve(seq, len(prompt))
    model.forward(cache, [(seq, prompt)])
    return [cache.kv[layer][:, seq.pages[:6]].float() for layer in range(len(cache.kv))]


def copy_in_place(config: kvstore.StoreConfig, stored: torch.Tensor, codec: Fp8Codec,
                  cache: PagedKVCache, pages: list[int]) -> None:
    """``stored`` blocks put into a store of ``config``, lent in place and copied by the
    fp8 copy kernel into ``pages`` of ``cache``."""
    from engines import uva_copy

    layout = codec.layout
    keys = [bytes([i]) * 16 for i in range(len(stored))]
    with kvstore.Store(config) as store:
        assert store.put_many(keys, list(stored)) == len(keys)
        with store.borrow(keys) as lent:
            assert len(lent.addresses) == len(keys)
            copier = uva_copy.LayerCopier(
                cache, lent.addresses, pages, layout.layer_bytes, layout.kv_bytes,
                fp8=uva_copy.Fp8Chunks(codec.chunk_bytes, codec.payload_bytes,
                                       codec.num_scales, layout.head_dim))
            copier.launch()
            copier.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("tier", ["dram", "hbm"])
def test_the_copy_kernel_dequantizes_fp8_blocks_into_bf16_pages_bit_for_bit(tier) -> None:
    """Blocks stored by the codec, lent in place by the store (pinned DRAM read over PCIe,
    or HBM) and copied layer by layer by the UVA kernel into bf16 pages: every page equals
    `Fp8Codec.decode`'s result exactly, and no other page is touched."""
    from engines import uva_copy

    if not uva_copy.fp8_available():
        pytest.skip("the fp8 copy kernel does not compile here")
    model = load_model("tiny", device="cuda", dtype=torch.bfloat16).model
    layout = model.config.kv_layout(16, torch.bfloat16)
    codec = Fp8Codec(layout)
    cache = model.new_cache(num_pages=32, page_tokens=16)
    for kv in cache.kv:
        kv.fill_(7.0)
    n = 9
    shape = (n, layout.num_layers, 2, 16, layout.num_kv_heads, layout.head_dim)
    blocks = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 5
    stored = codec.encode(blocks.to(torch.bfloat16))
    want = codec.decode(stored, torch.bfloat16).cuda()
    config = (kvstore.StoreConfig(dram_bytes="16MiB", hbm_bytes=0) if tier == "dram" else
              kvstore.StoreConfig(dram_bytes=0, hbm_bytes="16MiB"))
    pages = [3, 4, 5, 11, 12, 20, 21, 22, 30]
    copy_in_place(config, stored.cuda() if tier == "hbm" else stored, codec, cache, pages)
    for layer, kv in enumerate(cache.kv):
        got = kv[:, pages].transpose(0, 1)  # [n, 2, tokens, heads, dim]
        assert torch.equal(got, want[:, layer]), layer
        others = [p for p in range(32) if p not in pages]
        assert bool((kv[:, others] == 7.0).all())


@pytest.mark.gpu
def test_the_copy_kernel_dequantizes_every_e4m3_code_under_extreme_scales_as_decode() -> None:
    """Chunks written byte by byte: every finite e4m3 code in every chunk, under scales
    from float32 subnormals (products below float32's normal range: a flush-to-zero
    multiply, CuPy's default, would lose them) to 1e38 (products past bf16's range), on a
    layout whose chunks take a thread block two steps (1,152 vectors) and whose head
    vectors are 9 loads long: the bf16 pages equal `Fp8Codec.decode`'s bit for bit."""
    from engines import uva_copy
    from engines.config import ModelConfig

    if not uva_copy.fp8_available():
        pytest.skip("the fp8 copy kernel does not compile here")
    config = ModelConfig(name="odd", vocab_size=16, hidden_size=1152, intermediate_size=64,
                         num_layers=2, num_heads=8, num_kv_heads=8, head_dim=144)
    layout = config.kv_layout(16, torch.bfloat16)
    codec = Fp8Codec(layout)
    n, g = 6, torch.Generator().manual_seed(5)
    codes = torch.randint(0, 256, (n, layout.num_layers, 2, codec.payload_bytes), generator=g)
    codes[..., :256] = torch.arange(256)
    codes[(codes & 0x7F) == 0x7F] = 0x3C  # NaN codes: the encoder never writes them
    extremes = torch.tensor([1e-45, 3e-39, 2.0**-126, 2.0**-130, 1e-38, 2.0**-120, 1.0,
                             -0.75, 1 / 448, 1e38, 3.4e38])
    scales = torch.exp(torch.empty(n, layout.num_layers, 2, codec.num_scales)
                       .uniform_(-90.0, 88.0, generator=g))
    picked = torch.randint(0, 2, scales.shape, generator=g).bool()
    scales = torch.where(picked, extremes[torch.randint(0, len(extremes), scales.shape,
                                                        generator=g)], scales)
    stored = torch.zeros(n, layout.num_layers, 2, codec.chunk_bytes, dtype=torch.uint8)
    stored[..., :codec.payload_bytes] = codes.to(torch.uint8)
    scales_end = codec.payload_bytes + codec.num_scales * 4
    stored[..., codec.payload_bytes:scales_end] = scales.view(torch.uint8).reshape(
        n, layout.num_layers, 2, -1)
    stored = stored.reshape(n, codec.block_bytes)
    want = codec.decode(stored, torch.bfloat16).cuda()
    assert bool((want.float().abs() < 2.0**-126).logical_and(want != 0).any())  # subnormal
    assert bool(torch.isinf(want).any())
    cache = PagedKVCache(config, num_pages=16, page_tokens=16, dtype=torch.bfloat16,
                         device="cuda")
    pages = [1, 2, 7, 8, 9, 14]
    copy_in_place(kvstore.StoreConfig(dram_bytes="16MiB"), stored, codec, cache, pages)
    for layer, kv in enumerate(cache.kv):
        got = kv[:, pages].transpose(0, 1)
        assert torch.equal(got.view(torch.int16), want[:, layer].view(torch.int16)), layer
