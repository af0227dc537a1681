"""EngineConfig: one frozen config for an engine, built in one place (LLM(...) or a CLI)."""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # HF folder, .gguf file, or None for the bundled SmolLM2
    dtype: str = "auto"
    device: str = "cpu"
    max_model_len: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # default: max(2048, max_model_len)
    kv_cache_memory: int = 4 * GiB  # CPU: bytes for the KV pool
    num_kv_blocks: int | None = None  # overrides kv_cache_memory (tests force preemption with it)
    gpu_memory_utilization: float = 0.9
    load_format: str = "auto"  # "auto" or "dummy" (random weights from config.json alone)
    skip_tokenizer_init: bool = False
    seed: int = 0
    enforce_eager: bool = False  # CUDA: no CUDA graphs (every step launched kernel by kernel)

    def __post_init__(self) -> None:
        def bad(field: str, message: str) -> None:
            raise ValueError(f"{field}: {message}")

        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            bad("block_size", f"must be a power of two up to 128, got {self.block_size}")
        if self.max_num_seqs < 1:
            bad("max_num_seqs", f"must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            bad("max_num_batched_tokens", f"must be at least 1, got {self.max_num_batched_tokens}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            bad("num_kv_blocks", f"must be at least 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory <= 0:
            bad("kv_cache_memory", f"must be positive, got {self.kv_cache_memory}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            bad("gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.load_format not in ("auto", "dummy"):
            bad("load_format", f"must be 'auto' or 'dummy', got {self.load_format!r}")


def parse_bytes(text: str | int) -> int:
    """'4GiB', '512MiB', '2G', '1000000' -> bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().lower().replace(" ", "")
    units = {"gib": GiB, "gb": 10**9, "g": GiB, "mib": 1 << 20, "mb": 10**6, "m": 1 << 20, "kib": 1024, "k": 1024}
    for suffix, mult in units.items():
        if s.endswith(suffix):
            return int(float(s[: -len(suffix)]) * mult)
    return int(float(s))
