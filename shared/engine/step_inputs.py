"""One step's inputs for the runner's Triton path, built on the host without touching the device:
token ids, positions, slots and the attention metadata go into pinned int32 staging arrays, then
into static device buffers with non-blocking copies. The same buffers feed eager steps (exact
sizes) and CUDA-graph replays (padded sizes, see cuda_graphs.py), so a step never waits for the
device before its forward is queued.

Padding (a layout larger than the step): padding tokens have id 0, position 0 and slot -1 (no KV
stored); padding decode entries have context length 0 (skipped); padding prefill tiles are -1
(skipped); padding sample rows point at row 0 (their logits are ignored).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tandem.kernels.triton_attention import PREFILL_BLOCK_M, TritonAttentionMetadata, decode_num_splits
from tandem.shared.engine.runner import prompt_logprob_rows
from tandem.shared.engine.scheduler import ScheduledSeq, SchedulerOutput


@dataclass(frozen=True, order=True)
class Layout:
    """Sizes of one forward: tokens, decode entries, prefill chunks, prefill tiles, sampled rows."""

    num_tokens: int
    num_decode: int
    num_prefill: int
    num_tiles: int
    num_sample: int

    def fits(self, other: Layout) -> bool:
        """Can a forward of this (padded) layout run a step of `other`'s exact sizes?"""
        return (self.num_tokens >= other.num_tokens and self.num_decode >= other.num_decode
                and self.num_prefill >= other.num_prefill and self.num_tiles >= other.num_tiles
                and self.num_sample >= other.num_sample and (other.num_prefill == 0 or self.num_tiles > 0))


@dataclass
class StepPlan:
    layout: Layout  # the step's exact sizes
    sample_seqs: list[ScheduledSeq] = field(default_factory=list)  # in sample-row order
    # (seq, first hidden row, first target position, count) per sequence owed prompt logprobs
    prompt_lp_rows: list[tuple[ScheduledSeq, int, int, int]] = field(default_factory=list)


def max_tiles(num_tokens: int, num_prefill: int) -> int:
    """Most prefill tiles of `num_prefill` chunks holding `num_tokens` tokens in all."""
    return -(-num_tokens // PREFILL_BLOCK_M) + num_prefill if num_prefill else 0


class StepInputs:
    """Pinned host staging + static device buffers for the largest step; views of them per layout."""

    def __init__(self, max_tokens: int, max_seqs: int, max_model_len: int, block_size: int, num_kv_heads: int,
                 device: torch.device) -> None:
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.num_kv_heads = num_kv_heads
        self.device = device
        self.width = -(-max_model_len // block_size)  # block-table columns
        max_prefill = max(1, min(max_seqs, max_tokens // 2))
        self.max_layout = Layout(max_tokens, max_seqs, max_prefill, max_tiles(max_tokens, max_prefill), max_seqs)
        # One int32 buffer on each side, segments at fixed offsets; the block tables last, so that
        # a step copies one prefix of it: [0, end of the last row it uses).
        sizes = {
            "ids": max_tokens, "pos": max_tokens, "slots": max_tokens,
            "d_rows": max_seqs, "d_lens": max_seqs, "sample": max_seqs,
            "p_start": max_prefill, "p_len": max_prefill, "p_prefix": max_prefill, "tiles": self.max_layout.num_tiles,
            "d_table": max_seqs * self.width, "p_table": max_prefill * self.width,
        }
        self.offsets: dict[str, int] = {}
        total = 0
        for name, n in sizes.items():
            self.offsets[name] = total
            total += n
        self._host_buf = torch.zeros(total, dtype=torch.int32, pin_memory=device.type == "cuda")
        self._dev_buf = torch.zeros(total, dtype=torch.int32, device=device)
        host = self._host_buf.numpy()
        self.host = {k: host[o : o + sizes[k]] for k, o in self.offsets.items()}
        self.dev = {k: self._dev_buf[o : o + sizes[k]] for k, o in self.offsets.items()}
        self.host["d_table2"] = self.host["d_table"].reshape(max_seqs, self.width)
        self.host["p_table2"] = self.host["p_table"].reshape(max_prefill, self.width)
        self._copied = torch.cuda.Event() if device.type == "cuda" else None
        self._tables: dict[str, tuple] = {}  # request id -> (block_ids list, its length, int32 copy)

    # --- host side ------------------------------------------------------------------------------
    def _block_array(self, req, cache: dict) -> np.ndarray:
        """req.block_ids as int32, rebuilt only when the list was replaced or grew (the KV manager
        only appends to a request's list, or gives it a new one)."""
        blocks = req.block_ids
        entry = self._tables.get(req.request_id)
        if entry is None or entry[0] is not blocks or entry[1] != len(blocks):
            entry = (blocks, len(blocks), np.array(blocks, dtype=np.int32))
        cache[req.request_id] = entry
        return entry[2]

    def plan(self, sched: SchedulerOutput) -> StepPlan:
        """Fill the staging arrays from the scheduled slices (no device work). Returns the exact layout."""
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copies have left the staging arrays
        h = self.host
        ids, pos, slots = h["ids"], h["pos"], h["slots"]
        d_table, p_table = h["d_table2"], h["p_table2"]
        bs = self.block_size
        plan = StepPlan(Layout(0, 0, 0, 0, 0))
        tables: dict[str, tuple] = {}
        sample_rows: list[int] = []
        q_lens: list[int] = []
        # single-token sequences: gathered into lists, written with one vectorized store each
        d_rows: list[int] = []
        d_ids: list[int] = []
        d_pos: list[int] = []
        d_slots: list[int] = []
        d_lens: list[int] = []
        row = num_prefill = 0
        for seq in sched.seqs:
            req = seq.request
            start, n = seq.start, seq.num_tokens
            end = start + n
            table = self._block_array(req, tables)
            num_blocks = -(-end // bs)
            if n == 1:
                d_table[len(d_rows), :num_blocks] = table[:num_blocks]
                d_rows.append(row)
                d_ids.append(req.all_token_ids[start])
                d_pos.append(start)
                d_slots.append(int(table[start // bs]) * bs + start % bs)
                d_lens.append(end)
            else:
                ids[row : row + n] = req.all_token_ids[start:end]
                p = np.arange(start, end, dtype=np.int32)
                pos[row : row + n] = p
                slots[row : row + n] = table[p // bs] * bs + p % bs
                p_table[num_prefill, :num_blocks] = table[:num_blocks]
                h["p_start"][num_prefill] = row
                h["p_len"][num_prefill] = n
                h["p_prefix"][num_prefill] = start
                q_lens.append(n)
                num_prefill += 1
            lp_rows = prompt_logprob_rows(seq, row)
            if lp_rows is not None:
                plan.prompt_lp_rows.append(lp_rows)
            if seq.samples:
                sample_rows.append(row + n - 1)
                plan.sample_seqs.append(seq)
            row += n
        self._tables = tables  # finished requests drop out
        num_decode = len(d_rows)
        if num_decode:
            rows = np.array(d_rows, dtype=np.int64)
            ids[rows], pos[rows], slots[rows] = d_ids, d_pos, d_slots
            h["d_rows"][:num_decode] = rows
            h["d_lens"][:num_decode] = d_lens
        tiles = [(s << 16) | t for s, q in enumerate(q_lens) for t in range(-(-q // PREFILL_BLOCK_M))]
        h["tiles"][: len(tiles)] = tiles
        h["sample"][: len(sample_rows)] = sample_rows
        plan.layout = Layout(row, num_decode, num_prefill, len(tiles), len(sample_rows))
        if not self.max_layout.fits(plan.layout):
            raise ValueError(f"step {plan.layout} exceeds the runner's buffers {self.max_layout}")
        return plan

    def upload(self, exact: Layout, padded: Layout) -> None:
        """Pad the staging arrays from `exact` up to `padded`, then queue the copies to the device."""
        h = self.host
        t0, t1 = exact.num_tokens, padded.num_tokens
        h["ids"][t0:t1] = 0
        h["pos"][t0:t1] = 0
        h["slots"][t0:t1] = -1
        h["d_lens"][exact.num_decode : padded.num_decode] = 0
        h["d_rows"][exact.num_decode : padded.num_decode] = 0
        h["tiles"][exact.num_tiles : padded.num_tiles] = -1
        h["sample"][exact.num_sample : padded.num_sample] = 0
        if exact.num_prefill:
            end = self.offsets["p_table"] + exact.num_prefill * self.width
        else:
            end = self.offsets["d_table"] + exact.num_decode * self.width
        self._dev_buf[:end].copy_(self._host_buf[:end], non_blocking=True)  # one copy: no wait
        if self._copied is not None:
            self._copied.record()

    # --- device side ----------------------------------------------------------------------------
    def views(self, layout: Layout) -> tuple[torch.Tensor, torch.Tensor, TritonAttentionMetadata, torch.Tensor]:
        """(input_ids [T], positions [T], attention metadata, sample rows [S]) over the static buffers."""
        d = self.dev
        t, nd, npf = layout.num_tokens, layout.num_decode, layout.num_prefill
        w = self.width
        meta = TritonAttentionMetadata(
            slot_mapping=d["slots"][:t],
            decode_rows=d["d_rows"][:nd],
            decode_block_table=d["d_table"][: nd * w].view(nd, w),
            decode_context_lens=d["d_lens"][:nd],
            decode_max_len=self.max_model_len,
            prefill_q_start=d["p_start"][:npf],
            prefill_q_len=d["p_len"][:npf],
            prefill_prefix_len=d["p_prefix"][:npf],
            prefill_block_table=d["p_table"][: npf * w].view(npf, w),
            prefill_max_q_len=0,
            decode_num_splits=decode_num_splits(nd, self.num_kv_heads, self.max_model_len, self.device),
            prefill_tiles=d["tiles"][: layout.num_tiles] if layout.num_tiles else None,
        )
        return d["ids"][:t], d["pos"][:t], meta, d["sample"][: layout.num_sample]
