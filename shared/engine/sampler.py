"""Sampler: turns one step's logits into next tokens (+ raw logprobs), vectorized over the batch.

Order (vLLM V1): logit_bias, min_tokens suppression, repetition/frequency/presence penalties,
greedy argmax; for random rows: temperature, min_p, top_k/top_p, exponential-race sampling.
Logprobs are of the raw model distribution (vLLM's default "raw_logprobs" mode).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from tandem.shared.sampling_params import SamplingParams

_GREEDY_EPS = 1e-5  # same threshold as SamplingParams.is_greedy


@dataclass
class SamplingMetadata:
    """Per-row sampling inputs for one step; row i is the i-th logits row."""

    temperature: list[float]
    top_k: list[int]  # 0 = off
    top_p: list[float]
    min_p: list[float]
    presence_penalty: list[float]
    frequency_penalty: list[float]
    repetition_penalty: list[float]
    logit_bias: list[dict[int, float] | None]
    prompt_token_ids: list[list[int]]
    output_token_ids: list[list[int]]
    generators: list[torch.Generator | None]  # seeded rows; on the logits' device
    suppressed_token_ids: list[list[int]]  # masked to -inf (min_tokens not reached yet)
    num_logprobs: list[int | None]  # None = no logprobs; k >= 0 = chosen + top-k

    @property
    def num_rows(self) -> int:
        return len(self.temperature)

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        prompt_token_ids: Sequence[list[int]],
        output_token_ids: Sequence[list[int]],
        generators: Sequence[torch.Generator | None] | None = None,
        eos_token_ids: int | Iterable[int] | None = None,
    ) -> SamplingMetadata:
        """Build from request params; `eos_token_ids` is the model's eos id(s)."""
        if eos_token_ids is None:
            eos: set[int] = set()
        elif isinstance(eos_token_ids, int):
            eos = {eos_token_ids}
        else:
            eos = set(eos_token_ids)
        n = len(params)
        suppressed: list[list[int]] = []
        for p, out in zip(params, output_token_ids):
            # min_tokens blocks eos and stop ids even with ignore_eos.
            if len(out) < p.min_tokens:
                stop_ids = eos | set(p.stop_token_ids or ())
                suppressed.append(sorted(stop_ids))
            else:
                suppressed.append([])
        return cls(
            temperature=[p.temperature for p in params],
            top_k=[p.top_k if p.top_k > 0 else 0 for p in params],
            top_p=[p.top_p for p in params],
            min_p=[p.min_p for p in params],
            presence_penalty=[p.presence_penalty for p in params],
            frequency_penalty=[p.frequency_penalty for p in params],
            repetition_penalty=[p.repetition_penalty for p in params],
            logit_bias=[p.logit_bias or None for p in params],
            prompt_token_ids=list(prompt_token_ids),
            output_token_ids=list(output_token_ids),
            generators=list(generators) if generators is not None else [None] * n,
            suppressed_token_ids=suppressed,
            num_logprobs=[p.logprobs for p in params],
        )


@dataclass
class TokenLogprobs:
    """Plain data (msgpack-friendly)."""

    token_id: int
    logprob: float
    rank: int  # 1-based rank of token_id in the raw distribution
    top_token_ids: list[int]
    top_logprobs: list[float]


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[TokenLogprobs | None]  # one per row


class Sampler:
    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        # logits: [num_rows, vocab]
        num_rows = logits.shape[0]
        assert meta.num_rows == num_rows, (meta.num_rows, num_rows)
        want_logprobs = any(k is not None for k in meta.num_logprobs)
        raw_logprobs = logits.log_softmax(dim=-1, dtype=torch.float32) if want_logprobs else None

        greedy = [t < _GREEDY_EPS for t in meta.temperature]
        x = self._process_logits(logits, meta)
        if all(greedy):
            sampled = x.argmax(dim=-1)  # [num_rows]
        else:
            sampled = self._sample_random(x, meta, greedy)
            if any(greedy):
                greedy_mask = torch.tensor(greedy, device=x.device)
                sampled = torch.where(greedy_mask, x.argmax(dim=-1), sampled)

        logprobs: list[TokenLogprobs | None] = [None] * num_rows
        if raw_logprobs is not None:
            rows = [i for i, k in enumerate(meta.num_logprobs) if k is not None]
            ks = [meta.num_logprobs[i] or 0 for i in rows]
            if len(rows) < num_rows:
                row_idx = torch.tensor(rows, device=logits.device)
                raw_logprobs, chosen = raw_logprobs[row_idx], sampled[row_idx]
            else:
                chosen = sampled
            gathered = _gather_logprobs(raw_logprobs, chosen, ks)
            for i, lp in zip(rows, gathered):
                logprobs[i] = lp
        return SamplerOutput(token_ids=sampled.tolist(), logprobs=logprobs)

    def prompt_logprobs(
        self, logits: torch.Tensor, target_token_ids: torch.Tensor, k: int
    ) -> list[TokenLogprobs]:
        # logits: [T, vocab]; target_token_ids: [T] (token at position t+1 for logits row t)
        raw = logits.log_softmax(dim=-1, dtype=torch.float32)  # [T, vocab]
        return _gather_logprobs(
            raw, target_token_ids.to(device=logits.device, dtype=torch.long), [k] * raw.shape[0]
        )

    def _process_logits(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Argmax-affecting processing; returns float32 logits (a copy if anything is applied)."""
        num_rows, vocab = logits.shape
        device = logits.device
        x = logits.float()
        copied = x.data_ptr() != logits.data_ptr()

        def writable() -> torch.Tensor:
            nonlocal x, copied
            if not copied:
                x = x.clone()
                copied = True
            return x

        bias_rows: list[int] = []
        bias_cols: list[int] = []
        bias_vals: list[float] = []
        for i, bias in enumerate(meta.logit_bias):
            for tok, val in (bias or {}).items():
                if 0 <= tok < vocab:
                    bias_rows.append(i)
                    bias_cols.append(tok)
                    bias_vals.append(val)
        if bias_rows:
            writable().index_put_(
                (torch.tensor(bias_rows, device=device), torch.tensor(bias_cols, device=device)),
                torch.tensor(bias_vals, dtype=torch.float32, device=device),
                accumulate=True,
            )

        sup_rows: list[int] = []
        sup_cols: list[int] = []
        for i, ids in enumerate(meta.suppressed_token_ids):
            for tok in ids:
                if 0 <= tok < vocab:
                    sup_rows.append(i)
                    sup_cols.append(tok)
        if sup_rows:
            sup_idx = (torch.tensor(sup_rows, device=device), torch.tensor(sup_cols, device=device))
            writable()[sup_idx] = -float("inf")

        needs_rep = [r != 1.0 for r in meta.repetition_penalty]
        needs_out = [
            rep or f != 0.0 or p != 0.0
            for rep, f, p in zip(needs_rep, meta.frequency_penalty, meta.presence_penalty)
        ]
        if any(needs_out):
            x = writable()
            out_lists = [ids if need else [] for ids, need in zip(meta.output_token_ids, needs_out)]
            out_counts = _bin_counts(out_lists, vocab, device)  # [num_rows, vocab]
            out_mask = out_counts > 0
            if any(needs_rep):
                prompt_lists = [ids if need else [] for ids, need in zip(meta.prompt_token_ids, needs_rep)]
                seen = out_mask | (_bin_counts(prompt_lists, vocab, device) > 0)  # [num_rows, vocab]
                rep = torch.tensor(meta.repetition_penalty, dtype=torch.float32, device=device)[:, None]
                penalty = torch.where(seen, rep, 1.0)  # [num_rows, vocab]
                x.mul_(torch.where(x > 0, 1.0 / penalty, penalty))
            freq = torch.tensor(meta.frequency_penalty, dtype=torch.float32, device=device)[:, None]
            pres = torch.tensor(meta.presence_penalty, dtype=torch.float32, device=device)[:, None]
            x.sub_(freq * out_counts).sub_(pres * out_mask)
        assert x.shape == (num_rows, vocab)
        return x

    def _sample_random(self, x: torch.Tensor, meta: SamplingMetadata, greedy: list[bool]) -> torch.Tensor:
        """Sample every row as if random (greedy rows use temperature 1; the caller overrides them)."""
        num_rows, vocab = x.shape
        device = x.device
        temps = [1.0 if g else t for g, t in zip(greedy, meta.temperature)]
        # x may alias the caller's logits only if nothing was applied; division makes a new tensor.
        x = x / torch.tensor(temps, dtype=torch.float32, device=device)[:, None]  # [num_rows, vocab]

        if any(m > 0.0 for m in meta.min_p):
            probs = x.softmax(dim=-1)
            min_p = torch.tensor(meta.min_p, dtype=torch.float32, device=device)[:, None]
            x.masked_fill_(probs < min_p * probs.amax(dim=-1, keepdim=True), -float("inf"))

        use_top_k = any(0 < k < vocab for k in meta.top_k)
        use_top_p = any(p < 1.0 for p in meta.top_p)
        if use_top_p:
            ks = [k if 0 < k < vocab else vocab for k in meta.top_k]
            x = _apply_top_k_top_p_sorted(x, ks if use_top_k else None, meta.top_p)
        elif use_top_k:
            x = _apply_top_k(x, meta.top_k)

        probs = x.softmax(dim=-1)  # [num_rows, vocab]
        q = torch.empty_like(probs)
        seeded = [i for i, (g, gen) in enumerate(zip(greedy, meta.generators)) if gen is not None and not g]
        if len(seeded) < num_rows:
            q.exponential_()
        for i in seeded:
            # Each seeded row draws its own noise: its result doesn't depend on the rest of the batch.
            q[i].exponential_(generator=meta.generators[i])
        # exponential_ may return 0 on some backends; 0/0 would make argmax pick a NaN.
        q.clamp_(min=torch.finfo(q.dtype).tiny)
        return probs.div_(q).argmax(dim=-1)  # [num_rows]


def _bin_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """Per-row token counts, float32 [num_rows, vocab]; ids >= vocab (and padding) are dropped."""
    num_rows = len(token_lists)
    max_len = max((len(t) for t in token_lists), default=0)
    counts = torch.zeros(num_rows, vocab + 1, dtype=torch.float32, device=device)  # last bin = padding
    if max_len == 0:
        return counts[:, :vocab]
    padded = [t + [vocab] * (max_len - len(t)) for t in token_lists]
    idx = torch.tensor(padded, dtype=torch.long, device=device).clamp_(0, vocab)  # [num_rows, max_len]
    counts.scatter_add_(1, idx, torch.ones(idx.shape, dtype=torch.float32, device=device))
    return counts[:, :vocab]


def _apply_top_k(x: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """Keep logits >= the k-th largest per row (ties at the threshold are kept); k = 0 keeps all."""
    num_rows, vocab = x.shape
    max_k = max(k for k in top_k if 0 < k < vocab)
    kth = [k - 1 if 0 < k < vocab else -1 for k in top_k]
    top_vals = x.topk(max_k, dim=-1).values  # [num_rows, max_k], descending
    idx = torch.tensor([max(k, 0) for k in kth], device=x.device)[:, None]
    threshold = top_vals.gather(1, idx)  # [num_rows, 1]
    off = torch.tensor([k < 0 for k in kth], device=x.device)[:, None]
    threshold = threshold.masked_fill(off, -float("inf"))
    return x.masked_fill(x < threshold, -float("inf"))


def _apply_top_k_top_p_sorted(x: torch.Tensor, top_k: list[int] | None, top_p: list[float]) -> torch.Tensor:
    """One ascending sort serves both filters; the top token always survives top_p."""
    num_rows, vocab = x.shape
    device = x.device
    sorted_x, order = x.sort(dim=-1, descending=False)  # [num_rows, vocab]
    if top_k is not None:
        # Entry at position vocab - k is the k-th largest.
        pos = torch.tensor([vocab - k for k in top_k], device=device)[:, None]
        threshold = sorted_x.gather(1, pos)  # [num_rows, 1]
        sorted_x.masked_fill_(sorted_x < threshold, -float("inf"))
    p = torch.tensor(top_p, dtype=torch.float32, device=device)[:, None]
    cum = sorted_x.softmax(dim=-1).cumsum_(dim=-1)  # [num_rows, vocab], ascending mass
    drop = cum <= 1.0 - p
    drop[:, -1] = False
    sorted_x.masked_fill_(drop, -float("inf"))
    return torch.empty_like(x).scatter_(1, order, sorted_x)


def _gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, ks: list[int]) -> list[TokenLogprobs]:
    """logprobs [R, vocab] float32, token_ids [R]; row r gets its token + top ks[r]."""
    num_rows = logprobs.shape[0]
    if num_rows == 0:
        return []
    token_ids = token_ids.long()
    chosen = logprobs.gather(1, token_ids[:, None])  # [R, 1]
    ranks = (logprobs >= chosen).sum(dim=-1)  # [R]
    max_k = min(max(ks), logprobs.shape[1])
    if max_k > 0:
        top_vals, top_ids = logprobs.topk(max_k, dim=-1)  # [R, max_k], descending
        top_vals_l: list[list[float]] = top_vals.tolist()
        top_ids_l: list[list[int]] = top_ids.tolist()
    else:
        top_vals_l = [[] for _ in range(num_rows)]
        top_ids_l = [[] for _ in range(num_rows)]
    ids_l: list[int] = token_ids.tolist()
    chosen_l: list[float] = chosen[:, 0].tolist()
    ranks_l: list[int] = ranks.tolist()
    return [
        TokenLogprobs(
            token_id=ids_l[r],
            logprob=chosen_l[r],
            rank=ranks_l[r],
            top_token_ids=top_ids_l[r][: ks[r]],
            top_logprobs=top_vals_l[r][: ks[r]],
        )
        for r in range(num_rows)
    ]
