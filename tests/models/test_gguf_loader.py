"""Model resolution and weight/tokenizer loading: the bundled SmolLM2 GGUF against transformers'
own GGUF loader, synthetic GGUF files per tensor type, corrupt files, and HF folders."""

from __future__ import annotations

import json
import os
import struct
import time
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from tandem.shared.models.errors import ModelLoadError, UnsupportedModelError
from tandem.shared.models.gguf_loader import read_gguf
from tandem.shared.models.hf_folder import (
    ModelSource,
    default_model_path,
    iter_weights,
    load_tokenizer,
    resolve_model,
)

TEXTS = [
    "Hello, world!",
    "  leading spaces and\ttabs\nnewlines  ",
    "héllo wörld — naïve café",
    "日本語のテキスト、中文文本",
    "emoji 🎉🚀👩‍👩‍👧 mixed",
    "<|im_start|>user\nhi<|im_end|>",
    "numbers 1234567890 3.14159",
]


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def bundled() -> Path:
    try:
        return default_model_path()
    except ModelLoadError as exc:
        pytest.skip(str(exc))


def write_gguf(
    path: Path,
    tensors: dict[str, tuple[np.ndarray, QT]],
    arch: str = "qwen2",
    *,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    extra: dict[str, object] | None = None,
) -> Path:
    """A minimal GGUF with a 16-token vocabulary; arrays are given in HF shape, quantized here."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(128)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_token_list([f"t{i}" for i in range(16)])
    writer.add_eos_token_id(3)
    for key, value in (extra or {}).items():
        if isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, int(value))
    for name, (array, qtype) in tensors.items():
        if qtype == QT.F32:
            writer.add_tensor(name, array.astype(np.float32))
        elif qtype == QT.F16:
            writer.add_tensor(name, array.astype(np.float16))
        elif array.dtype == np.uint8:  # already raw blocks
            writer.add_tensor(name, array, raw_dtype=qtype)
        else:
            writer.add_tensor(name, gguf.quants.quantize(array.astype(np.float32), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def embed(rows: int = 16, cols: int = 64) -> tuple[np.ndarray, QT]:
    return np.random.default_rng(1).standard_normal((rows, cols)).astype(np.float32), QT.F32


def load_dict(source: ModelSource) -> dict[str, torch.Tensor]:
    return dict(iter_weights(source))


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute (n_head already the kv count for K)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def assert_corrupt(path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        load_dict(resolve_model(path))
    assert str(path) in str(info.value)
    assert "corrupt or truncated" in str(info.value)
    assert time.monotonic() - start < 10


# ---------------------------------------------------------------- the bundled SmolLM2 GGUF


@pytest.fixture(scope="module")
def smollm_source(bundled: Path) -> ModelSource:
    return resolve_model(None)


@pytest.fixture(scope="module")
def smollm_weights(smollm_source: ModelSource) -> dict[str, torch.Tensor]:
    start = time.perf_counter()
    weights = load_dict(smollm_source)
    print(f"\nSmolLM2 GGUF weights loaded in {time.perf_counter() - start:.2f} s")
    return weights


@pytest.fixture(scope="module")
def hf_gguf_model(
    bundled: Path, smollm_source: ModelSource
) -> tuple[object, dict[str, torch.Tensor], dict[str, torch.Size]]:
    """(config, tensors, state-dict shapes) as transformers builds them from the GGUF.

    This is what from_pretrained(dir, gguf_file=...) runs, minus its accelerate requirement and
    a second parse of the file for the config. transformers maps GGUF names onto the parameter
    names of a model it is handed; a meta-device one built from our config serves (a wrong layer
    count there would show up as missing names).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**smollm_source.hf_config))
    parsed = load_gguf_checkpoint(str(bundled), return_tensors=True, model_to_load=model)
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    return AutoConfig.for_model(**parsed["config"]), parsed["tensors"], shapes


@pytest.fixture(scope="module")
def smollm_tokenizer(smollm_source: ModelSource):
    return load_tokenizer(smollm_source)


def test_default_model_is_the_bundled_gguf(smollm_source: ModelSource, bundled: Path) -> None:
    assert bundled.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm_source.path == bundled and smollm_source.is_gguf
    assert smollm_source.eos_token_ids == (2,)
    assert "<|im_start|>" in (smollm_source.chat_template or "")


def test_bundled_tensor_types(bundled: Path) -> None:
    # The real file is the only coverage of these types from a llama.cpp-written file.
    types = Counter(QT(t.type_id).name for t in read_gguf(bundled).tensors.values())
    print(f"\nSmolLM2 tensor types: {dict(types)}")
    assert set(types) == {"Q4_1", "Q8_0", "F32"}


def test_weights_match_transformers(smollm_weights: dict[str, torch.Tensor], hf_gguf_model) -> None:
    config, expected, shapes = hf_gguf_model
    assert config.tie_word_embeddings
    # Tied: the file stores no output.weight, so we yield no lm_head.weight (nor does transformers).
    assert set(smollm_weights) == set(expected) == set(shapes) - {"lm_head.weight"}
    for name, tensor in smollm_weights.items():
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu", name
        assert tensor.shape == expected[name].shape == shapes[name], name
        assert torch.equal(tensor, expected[name].float()), name


def test_config_matches_transformers(smollm_source: ModelSource, hf_gguf_model) -> None:
    ours, theirs = smollm_source.hf_config, hf_gguf_model[0]
    rope = getattr(theirs, "rope_parameters", None) or {}
    assert ours["architectures"] == ["LlamaForCausalLM"] and ours["model_type"] == theirs.model_type
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "hidden_act",
    ):
        assert ours[key] == getattr(theirs, key), key
    assert ours["rope_theta"] == rope.get("rope_theta", getattr(theirs, "rope_theta", None))
    assert ours["rope_scaling"] is None and ours["rope_parameters"]["rope_type"] == "default"


def test_tokenizer_matches_transformers(smollm_tokenizer, bundled: Path) -> None:
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(str(bundled.parent), gguf_file=bundled.name)
    for text in TEXTS:
        ids = smollm_tokenizer(text)["input_ids"]
        assert ids == theirs(text)["input_ids"], text
        assert smollm_tokenizer.decode(ids) == text
    # Special tokens follow the file's metadata (transformers 5.17 alone sets eos = bos).
    assert (smollm_tokenizer.bos_token_id, smollm_tokenizer.eos_token_id) == (1, 2)
    assert (smollm_tokenizer.pad_token_id, smollm_tokenizer.unk_token_id) == (2, 0)


def test_chat_template(smollm_tokenizer) -> None:
    messages = [{"role": "user", "content": "What is 2+2? 🤔"}]
    text = smollm_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nWhat is 2+2? 🤔<|im_end|>" in text
    ids = smollm_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    assert ids == smollm_tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- dequantization per type

# gguf can quantize these in Python; tolerance is a fraction of the tensor's max |value|.
QUANTIZABLE = {
    QT.F32: 0.0,
    QT.F16: 1e-3,
    QT.BF16: 1e-2,
    QT.Q8_0: 1 / 100,
    QT.Q4_0: 1 / 7,
    QT.Q4_1: 1 / 12,
    QT.Q5_0: 1 / 14,
    QT.Q5_1: 1 / 25,
}


@pytest.mark.parametrize("qtype", list(QUANTIZABLE), ids=lambda q: q.name)
def test_dequantize_quantizable_types(tmp_path: Path, qtype: QT) -> None:
    original = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    path = write_gguf(
        tmp_path / "m.gguf", {"token_embd.weight": embed(), "blk.0.ffn_up.weight": (original, qtype)}
    )
    loaded = load_dict(resolve_model(path))["model.layers.0.mlp.up_proj.weight"]
    assert loaded.dtype == torch.float32 and tuple(loaded.shape) == original.shape
    if qtype not in (QT.F32, QT.F16):
        exact = gguf.quants.dequantize(gguf.quants.quantize(original, qtype), qtype)
        np.testing.assert_array_equal(loaded.numpy(), exact)
    error = np.abs(loaded.numpy() - original).max()
    assert error <= QUANTIZABLE[qtype] * np.abs(original).max() + 1e-7, error


def k_quant_blocks(qtype: QT, n_blocks: int) -> np.ndarray:
    """Random K-quant blocks with small finite fp16 super-block scales (random bytes there could be
    inf/nan)."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, size=(n_blocks, 2)).astype(np.float16).view(np.uint8)
    if qtype == QT.Q6_K:
        blocks[:, -2:] = scales[:, :2]  # d is the block's last field
    else:
        blocks[:, :4] = scales  # d, dmin lead the block
    return blocks


# gguf has no Python quantizer for K-quants (quantize raises NotImplementedError), and the
# bundled file has none: check our plumbing (offsets, byte shapes, HF shape) returns exactly what
# gguf.quants.dequantize makes of the same raw blocks.
@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q5_K, QT.Q6_K], ids=lambda q: q.name)
def test_dequantize_k_quants(tmp_path: Path, qtype: QT) -> None:
    with pytest.raises(NotImplementedError):
        gguf.quants.quantize(np.zeros((1, 256), np.float32), qtype)
    rows, cols = 4, 512
    blocks = k_quant_blocks(qtype, rows * cols // 256).reshape(rows, -1)
    path = write_gguf(
        tmp_path / "m.gguf", {"token_embd.weight": embed(), "blk.0.ffn_down.weight": (blocks, qtype)}
    )
    loaded = load_dict(resolve_model(path))["model.layers.0.mlp.down_proj.weight"].numpy()
    assert loaded.shape == (rows, cols)
    np.testing.assert_array_equal(loaded, gguf.quants.dequantize(blocks, qtype))
    assert np.isfinite(loaded).all()


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    blocks = np.zeros((4, gguf.GGML_QUANT_SIZES[QT.Q2_K][1]), np.uint8)
    path = write_gguf(
        tmp_path / "m.gguf", {"token_embd.weight": embed(), "blk.0.ffn_up.weight": (blocks, QT.Q2_K)}
    )
    with pytest.raises(UnsupportedModelError, match=r"blk\.0\.ffn_up\.weight.*Q2_K"):
        resolve_model(path)


# ---------------------------------------------------------------- architecture specifics


def test_llama_qk_permutation_is_undone(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    q = rng.standard_normal((64, 64)).astype(np.float32)  # 4 heads x 16
    k = rng.standard_normal((32, 64)).astype(np.float32)  # 2 kv heads x 16
    tensors = {
        "token_embd.weight": embed(),
        "blk.0.attn_q.weight": (llama_cpp_permute(q, 4), QT.F32),
        "blk.0.attn_k.weight": (llama_cpp_permute(k, 2), QT.F32),
        "output.weight": embed(),
    }
    source = resolve_model(write_gguf(tmp_path / "m.gguf", tensors, arch="llama"))
    weights = load_dict(source)
    np.testing.assert_array_equal(weights["model.layers.0.self_attn.q_proj.weight"].numpy(), q)
    np.testing.assert_array_equal(weights["model.layers.0.self_attn.k_proj.weight"].numpy(), k)
    assert "lm_head.weight" in weights and source.hf_config["tie_word_embeddings"] is False


def test_qwen2_is_not_permuted_and_has_bias(tmp_path: Path) -> None:
    q = np.random.default_rng(3).standard_normal((64, 64)).astype(np.float32)
    bias = np.arange(64, dtype=np.float32)
    tensors = {
        "token_embd.weight": embed(),
        "blk.0.attn_q.weight": (q, QT.F32),
        "blk.0.attn_q.bias": (bias, QT.F32),
    }
    source = resolve_model(write_gguf(tmp_path / "m.gguf", tensors, arch="qwen2"))
    weights = load_dict(source)
    np.testing.assert_array_equal(weights["model.layers.0.self_attn.q_proj.weight"].numpy(), q)
    np.testing.assert_array_equal(weights["model.layers.0.self_attn.q_proj.bias"].numpy(), bias)
    assert source.hf_config["attention_bias"] is True
    assert source.hf_config["architectures"] == ["Qwen2ForCausalLM"]


def test_gemma_norm_offset_is_undone(tmp_path: Path) -> None:
    w = np.random.default_rng(4).standard_normal(64).astype(np.float32) * 0.1
    tensors = {"token_embd.weight": embed(), "blk.0.attn_norm.weight": (w + 1, QT.F32)}
    source = resolve_model(
        write_gguf(tmp_path / "m.gguf", tensors, arch="gemma", extra={"gemma.attention.key_length": 32})
    )
    got = load_dict(source)["model.layers.0.input_layernorm.weight"].numpy()
    np.testing.assert_allclose(got, w, atol=1e-7)
    assert source.hf_config["head_dim"] == 32 and source.hf_config["hidden_act"] == "gelu_pytorch_tanh"


def llama3_freq_factors(theta: float, head_dim: int, factor: float, original: int) -> np.ndarray:
    """convert_hf_to_gguf.py's rope_freqs computation for rope_type llama3."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < original / 4.0:
            out.append(1.0)
        elif wavelen > original / 1.0:
            out.append(factor)
        else:
            smooth = (original / wavelen - 1.0) / (4.0 - 1.0)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path: Path) -> None:
    factors = llama3_freq_factors(500000.0, 16, 8.0, 64)
    tensors = {"token_embd.weight": embed(), "rope_freqs.weight": (factors, QT.F32)}
    extra = {"llama.rope.scaling.original_context_length": 64, "llama.rope.freq_base": 500000.0}
    path = write_gguf(tmp_path / "m.gguf", tensors, arch="llama", extra=extra)
    source = resolve_model(path)
    scaling = source.hf_config["rope_scaling"]
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == pytest.approx(8.0)
    assert scaling["original_max_position_embeddings"] == 64
    assert source.hf_config["rope_parameters"]["rope_type"] == "llama3"
    assert "rope_freqs.weight" not in load_dict(source)
    bogus = write_gguf(
        tmp_path / "b.gguf",
        {**tensors, "rope_freqs.weight": (factors[::-1].copy(), QT.F32)},
        arch="llama",
        extra=extra,
    )
    with pytest.raises(UnsupportedModelError, match="llama3"):
        resolve_model(bogus)


def test_yarn_and_linear_rope_scaling(tmp_path: Path) -> None:
    extra = {
        "qwen2.rope.scaling.type": "yarn",
        "qwen2.rope.scaling.factor": 4.0,
        "qwen2.rope.scaling.original_context_length": 32,
    }
    source = resolve_model(write_gguf(tmp_path / "y.gguf", {"token_embd.weight": embed()}, extra=extra))
    assert source.hf_config["rope_scaling"] == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    extra = {"qwen2.rope.scaling.type": "linear", "qwen2.rope.scaling.factor": 2.0}
    source = resolve_model(write_gguf(tmp_path / "l.gguf", {"token_embd.weight": embed()}, extra=extra))
    assert source.hf_config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    extra = {"qwen2.rope.scaling.type": "longrope"}
    with pytest.raises(UnsupportedModelError, match="longrope"):
        resolve_model(write_gguf(tmp_path / "x.gguf", {"token_embd.weight": embed()}, extra=extra))


def test_unknown_architecture_and_tensor(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="phi3"):
        resolve_model(write_gguf(tmp_path / "a.gguf", {"token_embd.weight": embed()}, arch="phi3"))
    tensors = {"token_embd.weight": embed(), "blk.0.attn_qkv.weight": embed(192, 64)}
    with pytest.raises(UnsupportedModelError, match="attn_qkv"):
        resolve_model(write_gguf(tmp_path / "b.gguf", tensors))


def test_missing_required_metadata(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    writer.add_tensor("token_embd.weight", embed()[0])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="llama.embedding_length"):
        resolve_model(tmp_path / "m.gguf")


# ---------------------------------------------------------------- corrupt files and bad paths


@pytest.mark.parametrize("keep", ["half", "all-but-one", "metadata-only"])
def test_truncated_real_file(tmp_path: Path, bundled: Path, keep: str) -> None:
    data = bundled.read_bytes()
    end = {"half": len(data) // 2, "all-but-one": len(data) - 1, "metadata-only": 100_000}[keep]
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:end])
    assert_corrupt(path)


@pytest.mark.parametrize(
    "content",
    [
        os.urandom(4096),
        b"",
        b"GGUF",
        b"GGML" + b"\0" * 100,
        b"GGUF"
        + struct.pack("<IQQ", 3, 0, 1)
        + struct.pack("<Q", 1)
        + b"k"
        + struct.pack("<IIQ", 9, 0, 1 << 62),
        b"GGUF" + struct.pack("<IQQ", 3, 1 << 60, 0),
        b"GGUF" + struct.pack("<IQQ", 99, 0, 0),
    ],
    ids=["random", "empty", "magic-only", "wrong-magic", "huge-array", "huge-tensor-count", "bad-version"],
)
def test_corrupt_bytes(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    assert_corrupt(path)


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "model.gguf"
    with pytest.raises(ModelLoadError, match="no such file"):
        resolve_model(missing)
    with pytest.raises(ModelLoadError) as info:
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct-not-here")
    assert "SmolLM2-135M-Instruct-not-here" in str(info.value)


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("not a model")
    with pytest.raises(ModelLoadError, match="config.json") as info:
        resolve_model(tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(ModelLoadError, match="not a model"):
        resolve_model(tmp_path / "README.md")


def test_folder_with_gguf_files(tmp_path: Path, bundled: Path) -> None:
    (tmp_path / bundled.name).symlink_to(bundled)
    source = resolve_model(tmp_path)
    assert source.is_gguf and source.path == tmp_path / bundled.name
    (tmp_path / "other.gguf").symlink_to(bundled)
    with pytest.raises(ModelLoadError, match="several"):
        resolve_model(tmp_path)


# ---------------------------------------------------------------- HF folders


def save_tiny_llama(path: Path, tied: bool) -> dict[str, torch.Tensor]:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=49152,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    GenerationConfig(eos_token_id=[2, 7]).save_pretrained(path)
    return model.state_dict()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_hf_folder_weights(tmp_path: Path, tied: bool) -> None:
    expected = save_tiny_llama(tmp_path, tied)
    source = resolve_model(tmp_path)
    assert not source.is_gguf and source.path == tmp_path
    assert source.hf_config["architectures"] == ["LlamaForCausalLM"]
    assert source.eos_token_ids == (2, 7)  # generation_config.json wins over config.json
    weights = load_dict(source)
    # Tied: save_pretrained drops lm_head.weight and so do we (only stored tensors are yielded).
    assert set(weights) == set(expected) - ({"lm_head.weight"} if tied else set())
    for name, tensor in weights.items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name


def test_hf_folder_tokenizer_and_chat_template(tmp_path: Path, smollm_tokenizer) -> None:
    save_tiny_llama(tmp_path, tied=True)
    smollm_tokenizer.save_pretrained(tmp_path)
    source = resolve_model(tmp_path)
    assert source.chat_template == smollm_tokenizer.chat_template
    tokenizer = load_tokenizer(source)
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == smollm_tokenizer(text)["input_ids"], text


def test_hf_folder_eos_fallbacks(tmp_path: Path) -> None:
    save_tiny_llama(tmp_path, tied=True)
    (tmp_path / "generation_config.json").unlink()
    assert resolve_model(tmp_path).eos_token_ids == (2,)


def test_hf_folder_corrupt_safetensors(tmp_path: Path) -> None:
    save_tiny_llama(tmp_path, tied=True)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError) as info:
        load_dict(resolve_model(tmp_path))
    assert str(weights) in str(info.value)


def test_hf_folder_without_safetensors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match="pickle"):
        resolve_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_model(tmp_path)
