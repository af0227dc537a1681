"""The benchmark's workloads: how many tokens each request sends and asks for, and its text.

- `random` (default in 128 / out 128): independent prompts; lengths fixed, or lognormal
  (`--length-dist lognormal`) with the given length as mean and `--length-sigma`.
- `sharegpt` (means in 202 / out 179): independent prompts with a ShareGPT-like length mix. Our choice,
  not fitted to the raw data: lognormal with the means usually quoted for ShareGPT V3 under a Llama
  tokenizer, sigma 1.0 for both (medians ~122 / ~109: a long tail), clipped to [4, 1024] each and
  in + out <= 2048 as vLLM's ShareGPT loader filters (means after clipping ~193 / ~173).
- `shared-prefix` (P 4, prefix 256, suffix 32, out 64): P prefixes (`--num-prefixes`, `--prefix-len`)
  x S suffixes (`--input-len` tokens each); request i uses prefix i mod P, in a shuffled order;
  S = num_prompts / P (one more for the first prefixes when it does not divide).
- `multi-turn` (4 turns, message 64, out 64): conversations of `--num-turns` turns over the chat
  endpoint; each turn resends the whole history (earlier user messages and the server's actual
  answers) plus a new user message of `--input-len` tokens; num_prompts counts turns.
- `long-context` (in: 3/4 of the server's max_model_len, out 32): independent long prompts.

Every workload is seeded (`--seed`): the same arguments give the same lengths and texts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tandem.loadtests.bench_text import TextMaker

WORKLOADS = ("random", "sharegpt", "shared-prefix", "multi-turn", "long-context")
DEFAULT_LENS = {"random": (128, 128), "sharegpt": (202, 179), "shared-prefix": (32, 64), "multi-turn": (64, 64),
                "long-context": (None, 32)}
SHAREGPT_SIGMA = 1.0
SHAREGPT_MAX_LEN = 1024  # per side
SHAREGPT_MAX_TOTAL = 2048
CHAT_TEMPLATE_MARGIN = 32  # tokens a chat template may add per message pair (checked against max_model_len)


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    num_prompts: int
    input_len: int | None = None  # None: the workload's default
    output_len: int | None = None
    length_dist: str = "fixed"  # fixed | lognormal (random, multi-turn)
    length_sigma: float = 0.5
    num_prefixes: int = 4
    prefix_len: int = 256
    num_turns: int = 4
    max_model_len: int | None = None  # the server's, when it reports one
    chat: bool = False  # the requests go to the chat endpoint (its template adds tokens)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in WORKLOADS:
            raise ValueError(f"unknown workload {self.name!r}; choose one of {', '.join(WORKLOADS)}")
        if self.num_prompts < 1:
            raise ValueError(f"--num-prompts must be >= 1, got {self.num_prompts}")
        for flag, value in (("--input-len", self.input_len), ("--output-len", self.output_len)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.length_dist not in ("fixed", "lognormal"):
            raise ValueError(f"--length-dist must be fixed or lognormal, got {self.length_dist!r}")
        if not self.length_sigma > 0:
            raise ValueError(f"--length-sigma must be > 0, got {self.length_sigma}")
        if self.num_prefixes < 1 or self.prefix_len < 1:
            raise ValueError("--num-prefixes and --prefix-len must be >= 1")
        if self.num_turns < 1:
            raise ValueError(f"--num-turns must be >= 1, got {self.num_turns}")

    def effective_lens(self) -> tuple[int, int]:
        """(input_len, output_len) with the workload's defaults filled in."""
        default_in, default_out = DEFAULT_LENS[self.name]
        in_len = self.input_len or default_in
        if in_len is None:  # long-context: 3/4 of the server's context
            if self.max_model_len is None:
                raise ValueError("long-context needs --input-len (the server reports no max_model_len)")
            in_len = max(1, (self.max_model_len * 3) // 4)
        return in_len, self.output_len or default_out


@dataclass(frozen=True)
class TurnPlan:
    """One request's lengths: `input_len` tokens of new text (after the shared prefix, if any)."""

    input_len: int
    output_len: int
    prefix_id: int | None = None


@dataclass(frozen=True)
class Turn:
    """One request's text: the whole prompt, or (multi-turn) the new user message."""

    text: str
    text_len: int  # its tokens, without special tokens or chat template
    output_len: int


@dataclass(frozen=True)
class Conversation:
    turns: list[Turn]
    with_history: bool  # multi-turn: each turn resends the earlier turns and answers


def lognormal_lengths(rng: np.random.Generator, mean: float, sigma: float, size: int) -> np.ndarray:
    """Integer lengths >= 1 from a lognormal whose mean is `mean`."""
    mu = math.log(mean) - sigma * sigma / 2
    return np.maximum(1, np.rint(rng.lognormal(mu, sigma, size))).astype(np.int64)


def _lengths(spec: WorkloadSpec, rng: np.random.Generator, mean: int, size: int) -> np.ndarray:
    if spec.length_dist == "lognormal":
        return lognormal_lengths(rng, mean, spec.length_sigma, size)
    return np.full(size, mean, dtype=np.int64)


def plan_workload(spec: WorkloadSpec) -> tuple[list[list[TurnPlan]], list[int]]:
    """(conversations as lists of turn lengths, prefix lengths); no text yet. Checks every request
    fits the server's max_model_len, with a clear error naming the numbers when it cannot."""
    rng = np.random.default_rng(spec.seed)
    in_len, out_len = spec.effective_lens()
    n = spec.num_prompts
    limit = spec.max_model_len
    margin = CHAT_TEMPLATE_MARGIN if spec.chat else 0
    prefix_lens: list[int] = []

    if spec.name == "sharegpt":
        ins = np.clip(lognormal_lengths(rng, in_len, SHAREGPT_SIGMA, n), 4, SHAREGPT_MAX_LEN)
        outs = np.clip(lognormal_lengths(rng, out_len, SHAREGPT_SIGMA, n), 4, SHAREGPT_MAX_LEN)
        total_cap = SHAREGPT_MAX_TOTAL if limit is None else min(SHAREGPT_MAX_TOTAL, limit - margin)
        outs = np.minimum(outs, np.maximum(1, total_cap - ins))
        ins = np.maximum(1, np.minimum(ins, total_cap - outs))
        convs = [[TurnPlan(int(i), int(o))] for i, o in zip(ins, outs)]
    elif spec.name == "shared-prefix":
        prefix_lens = [spec.prefix_len] * spec.num_prefixes
        ids = rng.permutation(np.arange(n) % spec.num_prefixes)
        convs = [[TurnPlan(in_len, out_len, int(p))] for p in ids]
        _check_fits(spec.prefix_len + 1 + in_len + out_len + margin, limit, "prefix + suffix + output")
    elif spec.name == "multi-turn":
        num_convs = math.ceil(n / spec.num_turns)
        sizes = [spec.num_turns] * (num_convs - 1) + [n - spec.num_turns * (num_convs - 1)]
        ins = _lengths(spec, rng, in_len, n)
        outs = _lengths(spec, rng, out_len, n)
        convs, k = [], 0
        for size in sizes:
            convs.append([TurnPlan(int(ins[k + t]), int(outs[k + t])) for t in range(size)])
            k += size
        longest = max(sum(t.input_len + t.output_len + CHAT_TEMPLATE_MARGIN for t in c) for c in convs)
        _check_fits(longest, limit, f"a {spec.num_turns}-turn conversation (history + template)")
    else:  # random, long-context
        ins = _lengths(spec, rng, in_len, n) if spec.name == "random" else np.full(n, in_len)
        outs = _lengths(spec, rng, out_len, n) if spec.name == "random" else np.full(n, out_len)
        if spec.length_dist == "lognormal" and spec.name == "random" and limit is not None:
            outs = np.minimum(outs, max(1, limit - margin - 1))
            ins = np.maximum(1, np.minimum(ins, limit - margin - outs))
        convs = [[TurnPlan(int(i), int(o))] for i, o in zip(ins, outs)]
        _check_fits(int(max(i + o for i, o in zip(ins, outs))) + margin, limit, "input + output")
    return convs, prefix_lens


def _check_fits(tokens: int, limit: int | None, what: str) -> None:
    if limit is not None and tokens > limit:
        raise ValueError(f"{what} needs {tokens} tokens but the server's max_model_len is {limit}: "
                         "lower --input-len / --output-len / --prefix-len / --num-turns")


async def build_conversations(spec: WorkloadSpec, text: TextMaker) -> list[Conversation]:
    """The workload's conversations with their texts (see the module docstring)."""
    plans, prefix_lens = plan_workload(spec)
    rng = np.random.default_rng(spec.seed + 1)  # corpus windows; separate from the lengths' stream
    corpus_len = len(text.corpus_ids)
    prefixes = await text.make_many(prefix_lens, [int(s) for s in rng.integers(0, corpus_len, len(prefix_lens))])
    flat = [t for conv in plans for t in conv]
    bodies = await text.make_many([t.input_len for t in flat], [int(s) for s in rng.integers(0, corpus_len, len(flat))])
    turns = []
    for plan, (body, body_len) in zip(flat, bodies):
        if plan.prefix_id is not None:
            prefix, prefix_len = prefixes[plan.prefix_id]
            turns.append(Turn(prefix + "\n" + body, prefix_len + 1 + body_len, plan.output_len))
        else:
            turns.append(Turn(body, body_len, plan.output_len))
    out, k = [], 0
    for conv in plans:
        out.append(Conversation(turns[k:k + len(conv)], with_history=spec.name == "multi-turn"))
        k += len(conv)
    return out
