"""ModelRunner: turns a SchedulerOutput into one forward pass over a flat varlen batch, samples,
and returns a plain RunnerOutput. It owns the model, the KV caches and the attention backend.

Two paths with the same results:
- torch (CPU, the reference): TorchAttentionBackend and reference ops, metadata as torch tensors.
- Triton (CUDA; on CPU only under TRITON_INTERPRET=1 in tests): TritonAttentionBackend and
  TritonOps; inputs built on the host into pinned buffers and copied without waiting
  (step_inputs.py); CUDA graphs for decode and small mixed steps (cuda_graphs.py). The only wait
  on the device in a step is reading the sampled tokens.
"""

from __future__ import annotations

import os
import time
from collections import Counter

import torch

from tandem.kernels.attention import (
    AttentionBackend,
    AttentionMetadata,
    PrefillSeq,
    padded_block_table,
)
from tandem.shared.config import EngineConfig
from tandem.shared.engine.sampler import Sampler, SamplingMetadata
from tandem.shared.engine.scheduler import RunnerOutput, ScheduledSeq, SchedulerConfig, SchedulerOutput
from tandem.shared.models.decoder import CausalLM, KVCache


def prompt_logprob_rows(seq: ScheduledSeq, row: int) -> tuple[ScheduledSeq, int, int, int] | None:
    """(seq, first hidden row, first target position, count) of the prompt logprobs this slice owes
    (its first row at `row` of the flat batch), or None."""
    if seq.prompt_logprobs_from is None:
        return None
    # logits at position p score token p + 1; owed targets start at prompt_logprobs_from
    end = seq.start + seq.num_tokens
    first_target = max(seq.prompt_logprobs_from, 1)
    last_target = min(end, seq.request.num_prompt_tokens - 1)
    count = last_target - first_target + 1 if first_target - 1 >= seq.start else 0
    if count <= 0 and seq.prompt_logprobs_from != 0:
        return None
    return seq, row + (first_target - 1 - seq.start), first_target, max(count, 0)


class ModelRunner:
    def __init__(
        self, model: CausalLM, num_blocks: int, block_size: int, backend: AttentionBackend,
        device: torch.device, limits: SchedulerConfig | None = None, triton: bool | None = None,
        cuda_graphs: bool | None = None,
    ) -> None:
        """limits: the scheduler's step sizes (the Triton path sizes its buffers and graphs by them).
        triton: the Triton path (default: on CUDA); `backend` is then replaced by
        TritonAttentionBackend. cuda_graphs (default: on CUDA, unless TANDEM_CUDA_GRAPHS=0)."""
        cfg = model.config
        self.model = model
        self.block_size = block_size
        self.backend = backend
        self.device = device
        self.sampler = Sampler()
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        kv_dtype = model.compute_dtype
        self.triton = device.type == "cuda" if triton is None else triton
        if self.triton:
            limits = limits or SchedulerConfig()
            self._init_triton(num_blocks, limits.max_num_seqs, limits.max_num_batched_tokens, cuda_graphs)
            return
        # torch.empty: pages are committed only when a block is first written.
        # Blocks [0, num_zeroed_blocks) have been zeroed. Attention reads whole blocks and masks
        # the unwritten tail; never-written memory may hold NaN, which a zero weight does not
        # cancel (0 * NaN = NaN). The pool hands out low block ids first, so zeroing up to the
        # highest id in use touches only blocks that are actually used.
        self.num_zeroed_blocks = 0
        self.kv_caches: list[KVCache] = [
            (torch.empty(shape, dtype=kv_dtype, device=device), torch.empty(shape, dtype=kv_dtype, device=device))
            for _ in range(cfg.num_layers)
        ]

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        if self.triton:
            return self._execute_triton(sched)
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[torch.Tensor] = []
        slots: list[torch.Tensor] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillSeq] = []
        sample_rows: list[int] = []
        sample_seqs = []
        prompt_lp_rows: list[tuple[object, int, int, int]] = []  # seq, first row, first target, count

        row = 0
        for seq in sched.seqs:
            req = seq.request
            end = seq.start + seq.num_tokens
            input_ids.extend(req.all_token_ids[seq.start : end])
            pos = torch.arange(seq.start, end)
            positions.append(pos)
            table = torch.tensor(req.block_ids, dtype=torch.long)
            slots.append(table[pos // bs] * bs + pos % bs)
            if seq.num_tokens == 1:
                decode_rows.append(row)
                decode_tables.append(req.block_ids)
                decode_lens.append(end)
            else:
                # With a cached prefix, attention reads the whole context from the pages
                # (this chunk's K/V is stored before attention runs); without, from the new K/V.
                context_table = table[: -(-end // bs)] if seq.start else table[:0]
                prefills.append(PrefillSeq(row, seq.num_tokens, end, context_table.to(self.device)))
            lp_rows = prompt_logprob_rows(seq, row)
            if lp_rows is not None:
                prompt_lp_rows.append(lp_rows)
            if seq.samples:
                sample_rows.append(row + seq.num_tokens - 1)
                sample_seqs.append(seq)
            row += seq.num_tokens

        self._zero_new_blocks(max(max(s.request.block_ids) for s in sched.seqs) + 1)
        dev = self.device
        if decode_rows:
            dtable, dmask = padded_block_table(decode_tables, decode_lens, bs)
        else:
            dtable, dmask = torch.zeros(0, 1, dtype=torch.long), None
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slots).to(dev),
            decode_rows=torch.tensor(decode_rows, dtype=torch.long, device=dev),
            decode_block_table=dtable.to(dev),
            decode_max_len=max(decode_lens, default=0),
            decode_mask=None if dmask is None else dmask.to(dev),
            prefills=prefills,
        )
        hidden = self.model(
            torch.tensor(input_ids, dtype=torch.long, device=dev),
            torch.cat(positions).to(dev),
            self.kv_caches,
            meta,
            self.backend,
        )  # [T, hidden]

        out = RunnerOutput()
        if sample_rows:
            self._sample(self.model.compute_logits(hidden[sample_rows]), sample_seqs, out)  # [num_sample, vocab]
        self._prompt_logprobs(hidden, prompt_lp_rows, out)
        return out

    def _sample(self, logits: torch.Tensor, sample_seqs: list, out: RunnerOutput) -> None:
        """logits [num_sample, vocab] of sample_seqs, in order. Reads the tokens back: the step's wait."""
        sampled = self.sampler(logits, self._sampling_metadata(sample_seqs))
        for seq, token_id, lp in zip(sample_seqs, sampled.token_ids, sampled.logprobs, strict=True):
            out.sampled[seq.request.request_id] = token_id
            if lp is not None:
                out.logprobs[seq.request.request_id] = lp

    def _prompt_logprobs(self, hidden: torch.Tensor | None, rows: list, out: RunnerOutput) -> None:
        """hidden [T, hidden]; rows: (seq, first row, first target, count) per sequence."""
        for seq, first_row, first_target, count in rows:
            req = seq.request
            lps = []
            if count:
                logits = self.model.compute_logits(hidden[first_row : first_row + count])  # [count, vocab]
                targets = torch.tensor(req.prompt_token_ids[first_target : first_target + count], device=self.device)
                lps = self.sampler.prompt_logprobs(logits, targets, req.params.prompt_logprobs)
            out.prompt_logprobs[req.request_id] = ([None] if seq.prompt_logprobs_from == 0 else []) + lps

    # --- Triton path --------------------------------------------------------------------------
    def _init_triton(self, num_blocks: int, max_num_seqs: int, max_num_batched_tokens: int,
                     cuda_graphs: bool | None) -> None:
        from tandem.kernels.model_ops import TritonOps
        from tandem.kernels.triton_attention import TritonAttentionBackend
        from tandem.shared.engine.cuda_graphs import CudaGraphs, graph_layouts
        from tandem.shared.engine.step_inputs import Layout, StepInputs

        cfg, dev = self.model.config, self.device
        self.model.ops = TritonOps()
        self.backend = TritonAttentionBackend()
        shape = (num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim)
        # Zeroed once: the kernels never read past a context's end, but a KV pull may land anywhere.
        # One allocation, K0 V0 K1 V1 ...: a KV transfer gathers or scatters many layers in one call.
        whole = torch.zeros((cfg.num_layers, 2, *shape), dtype=self.model.compute_dtype, device=dev)
        self.kv_caches = [(whole[layer, 0], whole[layer, 1]) for layer in range(cfg.num_layers)]
        self.num_zeroed_blocks = num_blocks
        self.step_stats: Counter[str] = Counter()
        max_tokens = max(max_num_batched_tokens, max_num_seqs)
        self.inputs = StepInputs(max_tokens, max_num_seqs, cfg.max_model_len, self.block_size, cfg.num_kv_heads, dev)
        if cuda_graphs is None:
            cuda_graphs = dev.type == "cuda" and os.environ.get("TANDEM_CUDA_GRAPHS", "1") != "0"
        self.graphs = None
        if cuda_graphs:
            logits = torch.empty(max_num_seqs, cfg.vocab_size, dtype=torch.float32, device=dev)
            empty = Layout(0, 0, 0, 0, 0)
            self.graphs = CudaGraphs(
                self._forward_logits, graph_layouts(max_num_seqs, max_tokens), logits,
                lambda layout: self.inputs.upload(empty, layout), capture=dev.type == "cuda",
            )
            with torch.inference_mode():
                self.graphs.capture()

    def _forward(self, layout) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward over the static inputs of `layout`: (hidden [T, hidden], sample rows [S])."""
        input_ids, positions, meta, sample_rows = self.inputs.views(layout)
        return self.model(input_ids, positions, self.kv_caches, meta, self.backend), sample_rows

    def _forward_logits(self, layout, logits_out: torch.Tensor) -> None:
        hidden, sample_rows = self._forward(layout)
        self.model.compute_logits(hidden.index_select(0, sample_rows), out=logits_out)

    def _execute_triton(self, sched: SchedulerOutput) -> RunnerOutput:
        t0 = time.perf_counter()
        plan = self.inputs.plan(sched)
        exact = plan.layout
        padded = None
        if self.graphs is not None and not plan.prompt_lp_rows:
            padded = self.graphs.pick(exact)
        out = RunnerOutput()
        self.last_layout = padded or exact
        if padded is not None:
            kind = "graph_mixed" if padded.num_prefill else "graph_decode"
            self.inputs.upload(exact, padded)
            logits = self.graphs.run(padded)[: exact.num_sample]
            if plan.sample_seqs:
                self._sample(logits, plan.sample_seqs, out)
        else:
            kind = "eager"
            self.inputs.upload(exact, exact)
            hidden, sample_rows = self._forward(exact)
            if plan.sample_seqs:
                self._sample(self.model.compute_logits(hidden.index_select(0, sample_rows)), plan.sample_seqs, out)
            self._prompt_logprobs(hidden, plan.prompt_lp_rows, out)
        # steps, tokens and seconds (to the sampled tokens on the host) per path
        self.step_stats[kind + "_steps"] += 1
        self.step_stats[kind + "_tokens"] += exact.num_tokens
        self.step_stats[kind + "_s"] += time.perf_counter() - t0
        return out

    @staticmethod
    def kv_blocks(config: EngineConfig, model: CausalLM, bytes_per_block: int, device: torch.device) -> int:
        """KV blocks for an engine of `config` (kv_sizing.py: on CUDA, from free memory)."""
        from tandem.shared.engine.kv_sizing import num_kv_blocks

        return num_kv_blocks(config, model, bytes_per_block, device)

    def disable_cuda_graphs(self) -> None:
        """Run every step eagerly from now on (tests compare both)."""
        self.graphs = None

    def prepare_external_write(self, block_ids: list[int]) -> None:
        """Blocks that another writer (a KV pull) fills: zero the never-used range below them now,
        so that a later first use does not wipe what was written."""
        if block_ids:
            self._zero_new_blocks(max(block_ids) + 1)

    def _zero_new_blocks(self, upto: int) -> None:
        if upto <= self.num_zeroed_blocks:
            return
        for key_cache, value_cache in self.kv_caches:
            key_cache[self.num_zeroed_blocks : upto].zero_()
            value_cache[self.num_zeroed_blocks : upto].zero_()
        self.num_zeroed_blocks = upto

    def _sampling_metadata(self, seqs) -> SamplingMetadata:
        reqs = [s.request for s in seqs]
        return SamplingMetadata.from_params(
            [r.params for r in reqs],
            [r.prompt_token_ids for r in reqs],
            [r.output_token_ids for r in reqs],
            [r.generator for r in reqs],
            eos_token_ids=set().union(*(r.eos_token_ids for r in reqs)),  # one engine: one eos set
        )
