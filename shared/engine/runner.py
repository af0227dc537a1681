"""ModelRunner: turns a SchedulerOutput into one forward pass over a flat varlen batch, samples,
and returns a plain RunnerOutput. It owns the model, the KV caches and the attention backend."""

from __future__ import annotations

import torch

from tandem.kernels.attention import (
    AttentionBackend,
    AttentionMetadata,
    PrefillSeq,
    padded_block_table,
)
from tandem.shared.engine.sampler import Sampler, SamplingMetadata
from tandem.shared.engine.scheduler import RunnerOutput, SchedulerOutput
from tandem.shared.models.decoder import CausalLM, KVCache


class ModelRunner:
    def __init__(
        self, model: CausalLM, num_blocks: int, block_size: int, backend: AttentionBackend,
        device: torch.device,
    ) -> None:
        cfg = model.config
        self.model = model
        self.block_size = block_size
        self.backend = backend
        self.device = device
        self.sampler = Sampler()
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        kv_dtype = model.compute_dtype
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
            if seq.prompt_logprobs_from is not None:
                # logits at position p score token p + 1; owed targets start at prompt_logprobs_from
                first_target = max(seq.prompt_logprobs_from, 1)
                last_target = min(end, req.num_prompt_tokens - 1)
                count = last_target - first_target + 1 if first_target - 1 >= seq.start else 0
                if count > 0 or seq.prompt_logprobs_from == 0:
                    first_row = row + (first_target - 1 - seq.start)
                    prompt_lp_rows.append((seq, first_row, first_target, max(count, 0)))
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
            logits = self.model.compute_logits(hidden[sample_rows])  # [num_sample, vocab]
            sampled = self.sampler(logits, self._sampling_metadata(sample_seqs))
            for seq, token_id, lp in zip(sample_seqs, sampled.token_ids, sampled.logprobs, strict=True):
                out.sampled[seq.request.request_id] = token_id
                if lp is not None:
                    out.logprobs[seq.request.request_id] = lp
        for seq, first_row, first_target, count in prompt_lp_rows:
            req = seq.request
            lps = []
            if count:
                logits = self.model.compute_logits(hidden[first_row : first_row + count])  # [count, vocab]
                targets = torch.tensor(req.prompt_token_ids[first_target : first_target + count], device=dev)
                lps = self.sampler.prompt_logprobs(logits, targets, req.params.prompt_logprobs)
            out.prompt_logprobs[req.request_id] = ([None] if seq.prompt_logprobs_from == 0 else []) + lps
        return out

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
