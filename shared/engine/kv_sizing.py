"""How many KV blocks an engine gets.

- `num_kv_blocks` set: that many.
- CPU: `kv_cache_memory` bytes.
- CUDA: what `gpu_memory_utilization` of the card leaves after the weights, the peak activations of
  a profiling forward at the largest step (max_num_batched_tokens tokens, logits and a log-softmax
  for max_num_seqs rows) and the memory others hold (CUDA context, other processes):

      kv_bytes = total * gpu_memory_utilization - torch peak - memory not held by torch

  CUDA graphs are captured after the KV pool exists, in the margin that the utilization leaves.
"""

from __future__ import annotations

import logging

import torch

from tandem.shared.config import EngineConfig
from tandem.shared.models.decoder import CausalLM

logger = logging.getLogger(__name__)


def num_kv_blocks(config: EngineConfig, model: CausalLM, bytes_per_block: int, device: torch.device) -> int:
    if config.num_kv_blocks:
        return config.num_kv_blocks
    if device.type != "cuda":
        return config.kv_cache_memory // bytes_per_block
    max_tokens = config.max_num_batched_tokens or 2048  # EngineCore's default step budget
    free_bytes = gpu_kv_bytes(model, config.gpu_memory_utilization, max(max_tokens, config.max_num_seqs),
                              config.max_num_seqs, config.block_size, device)
    return max(free_bytes // bytes_per_block, 0)


@torch.inference_mode()
def gpu_kv_bytes(model: CausalLM, utilization: float, max_tokens: int, max_seqs: int, block_size: int,
                 device: torch.device) -> int:
    """Bytes left for the KV pool after a profiling forward of max_tokens tokens (one prompt)."""
    from tandem.kernels.model_ops import TritonOps
    from tandem.kernels.triton_attention import TritonAttentionBackend, TritonAttentionMetadata, prefill_tile_table

    cfg = model.config
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    model.ops = TritonOps()
    # A one-block cache: the forward's KV lands in it (slots wrap), its values do not matter.
    shape = (1, block_size, cfg.num_kv_heads, cfg.head_dim)
    caches = [(torch.zeros(shape, dtype=model.compute_dtype, device=device),) * 2 for _ in range(cfg.num_layers)]
    i32 = dict(dtype=torch.int32, device=device)
    empty = torch.zeros(0, **i32)
    meta = TritonAttentionMetadata(
        slot_mapping=torch.arange(max_tokens, **i32) % block_size,
        decode_rows=empty, decode_block_table=empty.view(0, 1), decode_context_lens=empty, decode_max_len=0,
        prefill_q_start=torch.zeros(1, **i32), prefill_q_len=torch.full((1,), max_tokens, **i32),
        prefill_prefix_len=torch.zeros(1, **i32), prefill_block_table=torch.zeros(1, 1, **i32),
        prefill_max_q_len=max_tokens, prefill_tiles=torch.tensor(prefill_tile_table([max_tokens]), **i32),
    )
    input_ids = torch.randint(0, cfg.vocab_size, (max_tokens,), **i32)
    hidden = model(input_ids, torch.arange(max_tokens, **i32), caches, meta, TritonAttentionBackend())
    rows = torch.arange(min(max_seqs, max_tokens), device=device)
    logits = model.compute_logits(hidden.index_select(0, rows))
    logits.log_softmax(-1).argmax(-1)  # the sampler's largest temporaries
    del hidden, logits, caches
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    free, total = torch.cuda.mem_get_info(device)
    not_torch = total - free - torch.cuda.memory_reserved(device)
    kv_bytes = int(total * utilization) - peak - not_torch
    logger.info("GPU memory: total %.1f GiB, torch peak %.1f GiB (profiling %d tokens), others %.1f GiB, "
                "KV pool %.1f GiB", total / 2**30, peak / 2**30, max_tokens, not_torch / 2**30, kv_bytes / 2**30)
    torch.cuda.empty_cache()
    return kv_bytes
