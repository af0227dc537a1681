"""GGUF files: HF-style config, tokenizer metadata and dequantized weights under HF names."""

from __future__ import annotations

import math
import mmap
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize, quant_shape_to_byte_shape
from tqdm import tqdm

from tandem.shared.models.errors import ModelLoadError, UnsupportedModelError

SUPPORTED_TENSOR_TYPES: frozenset[GGMLQuantizationType] = frozenset(
    {
        GGMLQuantizationType.F32,
        GGMLQuantizationType.F16,
        GGMLQuantizationType.BF16,
        GGMLQuantizationType.Q8_0,
        GGMLQuantizationType.Q4_0,
        GGMLQuantizationType.Q4_1,
        # llama.cpp's K-quant mixes fall back to Q5_0/Q5_1 for rows not divisible by 256.
        GGMLQuantizationType.Q5_0,
        GGMLQuantizationType.Q5_1,
        GGMLQuantizationType.Q4_K,
        GGMLQuantizationType.Q5_K,
        GGMLQuantizationType.Q6_K,
    }
)


@dataclass(frozen=True)
class GGUFArchitecture:
    hf_architecture: str
    model_type: str
    hidden_act: str
    # llama.cpp's converter interleaves Q/K rows per head for its rope layout.
    permuted_qk: bool
    # llama.cpp stores gemma's RMSNorm weights as 1 + w.
    norm_offset: float = 0.0


ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "llama": GGUFArchitecture("LlamaForCausalLM", "llama", "silu", permuted_qk=True),
    "qwen2": GGUFArchitecture("Qwen2ForCausalLM", "qwen2", "silu", permuted_qk=False),
    "qwen3": GGUFArchitecture("Qwen3ForCausalLM", "qwen3", "silu", permuted_qk=False),
    "gemma": GGUFArchitecture(
        "GemmaForCausalLM", "gemma", "gelu_pytorch_tanh", permuted_qk=False, norm_offset=1.0
    ),
}

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_TOP_RE = re.compile(r"(\w+)\.(weight|bias)")
# Llama 3 rope scaling is stored as precomputed per-frequency divisors, not as metadata.
ROPE_FREQS_TENSOR = "rope_freqs.weight"

_GGUF_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
_MAX_TENSOR_DIMS = 8
# struct format per scalar metadata type (byte order is prefixed)
_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    type_id: int  # raw ggml type; may be one gguf does not know
    shape: tuple[int, ...]  # HF order: GGUF lists dims fastest-first, i.e. reversed
    offset: int  # absolute byte offset in the file
    n_bytes: int


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]


@dataclass(frozen=True)
class GGUFMetadata:
    hf_config: dict[str, Any]
    eos_token_ids: tuple[int, ...]
    chat_template: str | None


def hf_tensor_name(gguf_name: str) -> str | None:
    """HF parameter name for a GGUF tensor name; None if it has no HF counterpart."""
    if m := _BLOCK_RE.fullmatch(gguf_name):
        layer, part, kind = m.groups()
        hf_part = _BLOCK_NAMES.get(part)
        return None if hf_part is None else f"model.layers.{layer}.{hf_part}.{kind}"
    if m := _TOP_RE.fullmatch(gguf_name):
        part, kind = m.groups()
        hf_part = _TOP_LEVEL_NAMES.get(part)
        return None if hf_part is None else f"{hf_part}.{kind}"
    return None


def _corrupt(path: Path, detail: str) -> ModelLoadError:
    return ModelLoadError(f"{path}: GGUF file is corrupt or truncated ({detail})")


class _Malformed(Exception):
    pass


class _HeaderParser:
    """Bounds-checked GGUF header parser.

    Not gguf.GGUFReader: that one takes ~3 s and ~150 MB to build per-token numpy views of a
    49k-token vocabulary, and it trusts counts read from the file, so a corrupt array length can
    make it loop ~2**64 times on reads past the end instead of failing.
    """

    def __init__(self, buf: mmap.mmap, order: str) -> None:
        self.buf = buf
        self.end = len(buf)
        self.pos = 0
        self.order = order

    def take(self, n: int) -> int:
        start = self.pos
        if start + n > self.end:
            raise _Malformed(f"a field at byte {start} needs {n} bytes, but the file ends at byte {self.end}")
        self.pos = start + n
        return start

    def scalar(self, fmt: str) -> Any:
        return struct.unpack_from(self.order + fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("Q")
        start = self.take(n)
        try:
            return self.buf[start : start + n].decode("utf-8")
        except UnicodeDecodeError:
            raise _Malformed(f"invalid UTF-8 in a string at byte {start}") from None

    def value_type(self) -> GGUFValueType:
        pos, raw = self.pos, self.scalar("I")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise _Malformed(f"unknown metadata value type {raw} at byte {pos}") from None

    def value(self, vtype: GGUFValueType) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[vtype])
        if vtype == GGUFValueType.STRING:
            return self.string()
        item_type = self.value_type()
        count = self.scalar("Q")
        if item_type in _SCALAR_FORMATS:
            fmt = f"{self.order}{count}{_SCALAR_FORMATS[item_type]}"
            return list(struct.unpack_from(fmt, self.buf, self.take(count * struct.calcsize(fmt[-1]))))
        # Each string or nested-array item consumes at least 8 bytes, so a corrupt count runs
        # out of file (and raises) after at most file_size / 8 iterations.
        return [self.value(item_type) for _ in range(count)]

    def parse(self, path: Path) -> GGUFFile:
        self.take(8)  # magic + version, checked by the caller
        n_tensors, n_kv = self.scalar("Q"), self.scalar("Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self.string()
            if key in metadata:
                raise _Malformed(f"duplicate metadata key {key!r}")
            metadata[key] = self.value(self.value_type())
        infos = [self.tensor_info() for _ in range(n_tensors)]
        alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise _Malformed(f"general.alignment {alignment!r} is not a power of two")
        data_start = -(-self.pos // alignment) * alignment
        tensors: dict[str, GGUFTensorInfo] = {}
        for name, dims, type_id, rel_offset in infos:
            if name in tensors:
                raise _Malformed(f"duplicate tensor {name!r}")
            tensors[name] = _tensor_info(name, dims, type_id, data_start + rel_offset, self.end, path)
        return GGUFFile(path, metadata, tensors)

    def tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self.string()
        n_dims = self.scalar("I")
        if n_dims > _MAX_TENSOR_DIMS:
            raise _Malformed(f"tensor {name!r} claims {n_dims} dimensions")
        dims = tuple(self.scalar("Q") for _ in range(n_dims))
        return name, dims, self.scalar("I"), self.scalar("Q")


def _tensor_info(
    name: str, dims: tuple[int, ...], type_id: int, offset: int, file_size: int, path: Path
) -> GGUFTensorInfo:
    shape = tuple(reversed(dims))
    try:
        qtype = GGMLQuantizationType(type_id)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise UnsupportedModelError(f"{path}: tensor {name} has unknown ggml type id {type_id}") from None
    n_elements = math.prod(shape)
    if shape and shape[-1] % block_size:
        raise _Malformed(f"tensor {name!r} rows of {shape[-1]} are not whole {qtype.name} blocks")
    n_bytes = n_elements // block_size * type_size
    if offset + n_bytes > file_size:
        raise _Malformed(
            f"tensor {name!r} needs bytes up to {offset + n_bytes}, but the file has {file_size}"
        )
    return GGUFTensorInfo(name, type_id, shape, offset, n_bytes)


def read_gguf(path: Path) -> GGUFFile:
    """Header (metadata + tensor index) of a GGUF file; every tensor is checked to lie inside it."""
    try:
        size = path.stat().st_size
        if size < 24:
            raise _corrupt(path, f"only {size} bytes, shorter than a GGUF header")
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != _GGUF_MAGIC:
                raise _corrupt(path, f"bad magic {bytes(buf[:4])!r}, expected {_GGUF_MAGIC!r}")
            version = struct.unpack_from("<I", buf, 4)[0]
            if version not in (2, 3):
                if struct.unpack_from(">I", buf, 4)[0] in (2, 3):
                    raise UnsupportedModelError(f"{path}: big-endian GGUF files are not supported")
                raise _corrupt(path, f"unsupported GGUF version {version}")
            return _HeaderParser(buf, "<").parse(path)
    except _Malformed as exc:
        raise _corrupt(path, str(exc)) from None
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read the file: {exc}") from exc


def read_gguf_metadata(path: Path) -> GGUFMetadata:
    """Config, eos ids and chat template of a GGUF file; checks every tensor is one we can load."""
    gguf_file = read_gguf(path)
    template = gguf_file.metadata.get("tokenizer.chat_template")
    return GGUFMetadata(
        hf_config=_build_config(gguf_file),
        eos_token_ids=_eos_token_ids(gguf_file.metadata),
        chat_template=template if isinstance(template, str) else None,
    )


def _uniform_int(value: Any, key: str, path: Path) -> int:
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise UnsupportedModelError(
                f"{path}: per-layer {key} values {sorted(set(value))} are unsupported"
            )
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ModelLoadError(f"{path}: GGUF metadata {key} is {value!r}, expected a number")
    return int(value)


def _number(value: Any, key: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ModelLoadError(f"{path}: GGUF metadata {key} is {value!r}, expected a number")
    return float(value)


class _Keys:
    """Typed access to `{arch}.*` metadata, with errors naming the file and key."""

    def __init__(self, gguf_file: GGUFFile, arch_name: str) -> None:
        self.metadata = gguf_file.metadata
        self.path = gguf_file.path
        self.prefix = f"{arch_name}."

    def has(self, key: str) -> bool:
        return self.prefix + key in self.metadata

    def raw(self, key: str) -> Any:
        return self.metadata.get(self.prefix + key)

    def _value(self, key: str, default: float | None) -> Any:
        if self.has(key):
            return self.raw(key)
        if default is None:
            raise ModelLoadError(f"{self.path}: GGUF metadata lacks the required key {self.prefix + key!r}")
        return default

    def integer(self, key: str, default: int | None = None) -> int:
        return _uniform_int(self._value(key, default), self.prefix + key, self.path)

    def number(self, key: str, default: float | None = None) -> float:
        return _number(self._value(key, default), self.prefix + key, self.path)


def _architecture(gguf_file: GGUFFile) -> tuple[str, GGUFArchitecture]:
    name = gguf_file.metadata.get("general.architecture")
    if not isinstance(name, str):
        raise ModelLoadError(f"{gguf_file.path}: GGUF metadata lacks general.architecture")
    arch = ARCHITECTURES.get(name)
    if arch is None:
        supported = ", ".join(ARCHITECTURES)
        raise UnsupportedModelError(
            f"{gguf_file.path}: GGUF architecture {name!r} is not supported (supported: {supported})"
        )
    return name, arch


def _check_tensors(gguf_file: GGUFFile) -> None:
    for tensor in gguf_file.tensors.values():
        if tensor.name != ROPE_FREQS_TENSOR and hf_tensor_name(tensor.name) is None:
            raise UnsupportedModelError(
                f"{gguf_file.path}: GGUF tensor {tensor.name!r} has no Hugging Face counterpart"
            )
        _tensor_type(tensor, gguf_file.path)


def _tensor_type(tensor: GGUFTensorInfo, path: Path) -> GGMLQuantizationType:
    qtype = GGMLQuantizationType(tensor.type_id)
    if qtype not in SUPPORTED_TENSOR_TYPES:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TENSOR_TYPES))
        raise UnsupportedModelError(
            f"{path}: tensor {tensor.name} has type {qtype.name}, which is not supported "
            f"(supported: {supported})"
        )
    return qtype


def _build_config(gguf_file: GGUFFile) -> dict[str, Any]:
    path, metadata, tensors = gguf_file.path, gguf_file.metadata, gguf_file.tensors
    arch_name, arch = _architecture(gguf_file)
    _check_tensors(gguf_file)
    if "token_embd.weight" not in tensors:
        raise ModelLoadError(f"{path}: GGUF file has no token_embd.weight tensor")
    keys = _Keys(gguf_file, arch_name)
    hidden = keys.integer("embedding_length")
    n_heads = keys.integer("attention.head_count")
    n_kv = keys.integer("attention.head_count_kv", n_heads)
    if min(hidden, n_heads, n_kv) <= 0:
        raise ModelLoadError(f"{path}: GGUF metadata has non-positive sizes ({hidden=}, {n_heads=}, {n_kv=})")
    head_dim = keys.integer("attention.key_length", hidden // n_heads)
    if keys.integer("attention.value_length", head_dim) != head_dim:
        raise UnsupportedModelError(f"{path}: value head size differs from key head size {head_dim}")
    rope_dim = keys.integer("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise UnsupportedModelError(f"{path}: partial rotary embedding ({rope_dim} of {head_dim} dims)")
    rope_theta = keys.number("rope.freq_base", 10000.0)
    rope_scaling = _rope_scaling(gguf_file, keys, rope_theta, head_dim)
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab_size = len(tokens) if isinstance(tokens, list) else tensors["token_embd.weight"].shape[0]
    config: dict[str, Any] = {
        "architectures": [arch.hf_architecture],
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "intermediate_size": keys.integer("feed_forward_length"),
        "num_hidden_layers": keys.integer("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": keys.number("attention.layer_norm_rms_epsilon"),
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta, **(rope_scaling or {})},
        "max_position_embeddings": keys.integer("context_length"),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
        "hidden_act": arch.hidden_act,
        "torch_dtype": "float32",
    }
    for hf_key, gguf_key in (
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
        ("unk_token_id", "tokenizer.ggml.unknown_token_id"),
    ):
        value = metadata.get(gguf_key)
        config[hf_key] = None if value is None else _uniform_int(value, gguf_key, path)
    if keys.has("attention.sliding_window"):
        config["sliding_window"] = keys.integer("attention.sliding_window")
    return config


def _rope_scaling(
    gguf_file: GGUFFile, keys: _Keys, rope_theta: float, head_dim: int
) -> dict[str, Any] | None:
    path = gguf_file.path
    kind = keys.raw("rope.scaling.type")
    factor = keys.number("rope.scaling.factor", keys.number("rope.scale_linear", 1.0))
    original = keys.integer("rope.scaling.original_context_length", 0) or None
    if ROPE_FREQS_TENSOR in gguf_file.tensors:
        freq_factors = _read_tensor(gguf_file, gguf_file.tensors[ROPE_FREQS_TENSOR]).astype(np.float64)
        return _llama3_rope_scaling(freq_factors.reshape(-1), rope_theta, head_dim, original or 8192, path)
    if kind in (None, "none"):
        return None if factor == 1.0 else {"rope_type": "linear", "factor": factor}
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        if keys.number("rope.scaling.attn_factor", 1.0) != 1.0:
            raise UnsupportedModelError(f"{path}: yarn rope with an attn_factor other than 1")
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": factor}
        if original is not None:
            scaling["original_max_position_embeddings"] = original
        for gguf_name, hf_name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if keys.has(f"rope.scaling.{gguf_name}"):
                scaling[hf_name] = keys.number(f"rope.scaling.{gguf_name}")
        return scaling
    raise UnsupportedModelError(f"{path}: rope scaling type {kind!r} is not supported")


def _llama3_rope_scaling(
    freq_factors: np.ndarray, rope_theta: float, head_dim: int, original: int, path: Path
) -> dict[str, Any] | None:
    """HF's llama3 rope_scaling, recovered from the rope_freqs tensor llama.cpp computes from it."""
    if freq_factors.shape != (head_dim // 2,):
        raise ModelLoadError(
            f"{path}: {ROPE_FREQS_TENSOR} has shape {freq_factors.shape}, expected ({head_dim // 2},)"
        )
    if np.allclose(freq_factors, 1.0):
        return None
    factor = float(freq_factors.max())
    low, high = 1.0, 4.0  # what every Llama 3.x release uses
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    expected = np.where(
        wavelen < original / high,
        1.0,
        np.where(wavelen > original / low, factor, 1.0 / ((1 - smooth) / factor + smooth)),
    )
    if not np.allclose(freq_factors, expected, rtol=1e-3):
        raise UnsupportedModelError(f"{path}: {ROPE_FREQS_TENSOR} does not match llama3 rope scaling")
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }


def _eos_token_ids(metadata: dict[str, Any]) -> tuple[int, ...]:
    keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    ids = [metadata[k] for k in keys if isinstance(metadata.get(k), int)]
    return tuple(dict.fromkeys(ids))


def _read_tensor(gguf_file: GGUFFile, tensor: GGUFTensorInfo) -> np.ndarray:
    """float32 values in HF shape; a fresh writable array."""
    qtype = _tensor_type(tensor, gguf_file.path)
    raw = np.fromfile(gguf_file.path, dtype=np.uint8, count=tensor.n_bytes, offset=tensor.offset)
    return _dequantize(raw, qtype, tensor.shape)


def _dequantize(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    rows = raw.reshape(quant_shape_to_byte_shape(shape or (1,), qtype))
    values = dequantize(rows, qtype).reshape(shape)
    # F32 comes back as a view of the (read-only, memory-mapped) file bytes.
    return values if values.flags.writeable and values.dtype == np.float32 else values.astype(np.float32)


def _unpermute_rows(weight: np.ndarray, n_heads: int, name: str, path: Path) -> np.ndarray:
    # llama.cpp turns each head's rows from HF's rope pairing (i, i + d/2) into adjacent pairs
    # (2i, 2i + 1) via reshape(n_heads, 2, d/2).swapaxes(1, 2); this is the inverse.
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise ModelLoadError(f"{path}: tensor {name} has {rows} rows, not a whole number of {n_heads} heads")
    split = weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
    return np.ascontiguousarray(split.swapaxes(1, 2)).reshape(weight.shape)


def iter_gguf_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 CPU tensor) for every weight in the file; lm_head only if stored (untied)."""
    gguf_file = read_gguf(path)
    config = _build_config(gguf_file)
    _, arch = _architecture(gguf_file)
    data = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)
    for tensor in tqdm(gguf_file.tensors.values(), desc="Loading weights", unit="tensor"):
        name = hf_tensor_name(tensor.name)
        if name is None:
            continue  # rope_freqs: already folded into the config's rope_scaling
        raw = data[tensor.offset : tensor.offset + tensor.n_bytes]
        values = _dequantize(raw, _tensor_type(tensor, path), tensor.shape)
        if arch.permuted_qk and ".self_attn.q_proj." in name:
            values = _unpermute_rows(values, config["num_attention_heads"], tensor.name, path)
        elif arch.permuted_qk and ".self_attn.k_proj." in name:
            values = _unpermute_rows(values, config["num_key_value_heads"], tensor.name, path)
        if arch.norm_offset and name.endswith("norm.weight"):
            values -= arch.norm_offset
        yield name, torch.from_numpy(values)
