from __future__ import annotations

import math

import pytest
import torch

from tandem.shared.engine.sampler import Sampler, SamplingMetadata
from tandem.shared.sampling_params import SamplingParams

VOCAB = 32


def _meta(
    params: list[SamplingParams], outputs: list[list[int]] | None = None, prompts=None, gens=None, eos=None
):
    n = len(params)
    return SamplingMetadata.from_params(
        params,
        prompts if prompts is not None else [[] for _ in range(n)],
        outputs if outputs is not None else [[] for _ in range(n)],
        gens,
        eos,
    )


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _logits(rows: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=_gen(seed)) * 2.0


def _sample_many(
    logits_row: torch.Tensor, params: SamplingParams, n: int = 400, rows: int = 50
) -> torch.Tensor:
    """Draw n samples of one row via seeded generators (rows at a time); returns [n] token ids."""
    out: list[int] = []
    sampler = Sampler()
    for start in range(0, n, rows):
        gens = [_gen(start + r) for r in range(rows)]
        meta = _meta([params] * rows, gens=gens)
        out += sampler(logits_row.expand(rows, -1).contiguous(), meta).token_ids
    return torch.tensor(out)


def test_greedy_equals_argmax() -> None:
    logits = _logits(8)
    out = Sampler()(logits, _meta([SamplingParams(temperature=0.0)] * 8))
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 8


def test_greedy_bf16_equals_argmax() -> None:
    logits = _logits(4).to(torch.bfloat16)
    out = Sampler()(logits, _meta([SamplingParams(temperature=0.0)] * 4))
    assert out.token_ids == logits.argmax(-1).tolist()


def test_mixed_greedy_and_random_rows() -> None:
    logits = _logits(6)
    params = [SamplingParams(temperature=0.0 if i % 2 == 0 else 1.0) for i in range(6)]
    out = Sampler()(logits, _meta(params))
    for i in range(0, 6, 2):
        assert out.token_ids[i] == int(logits[i].argmax())


def test_top_k_restricts_support() -> None:
    logits = _logits(1)[0]
    got = set(_sample_many(logits, SamplingParams(temperature=1.5, top_k=3)).tolist())
    allowed = set(logits.topk(3).indices.tolist())
    assert got <= allowed and len(got) >= 2


def test_top_p_restricts_support() -> None:
    logits = _logits(1)[0]
    probs = logits.softmax(-1)
    sorted_p, order = probs.sort(descending=True)
    cum = sorted_p.cumsum(0)
    top_p = 0.6
    n_keep = int((cum < top_p).sum()) + 1  # smallest prefix with mass >= top_p
    allowed = set(order[:n_keep].tolist())
    got = set(_sample_many(logits, SamplingParams(temperature=1.0, top_p=top_p)).tolist())
    assert got <= allowed and len(got) >= 2


def test_top_p_tiny_keeps_top_token() -> None:
    logits = _logits(1)[0]
    got = set(_sample_many(logits, SamplingParams(temperature=1.0, top_p=1e-6), n=100).tolist())
    assert got == {int(logits.argmax())}


def test_min_p_restricts_support() -> None:
    logits = _logits(1)[0]
    probs = logits.softmax(-1)
    allowed = set(torch.nonzero(probs >= 0.1 * probs.max()).flatten().tolist())
    got = set(_sample_many(logits, SamplingParams(temperature=1.0, min_p=0.1)).tolist())
    assert got <= allowed and len(got) >= 2


def test_top_k_and_top_p_mixed_batch() -> None:
    logits = _logits(1)[0]
    rows = [
        SamplingParams(temperature=1.0, top_k=2),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.0, top_p=0.5),
    ]
    top2 = set(logits.topk(2).indices.tolist())
    seen: list[set[int]] = [set(), set(), set()]
    sampler = Sampler()
    for s in range(100):
        gens = [_gen(3 * s + j) for j in range(3)]
        out = sampler(logits.expand(3, -1).contiguous(), _meta(rows, gens=gens)).token_ids
        for j, t in enumerate(out):
            seen[j].add(t)
    assert seen[0] <= top2
    assert len(seen[1]) > 4  # unrestricted row is not truncated by the others' filters


def test_temperature_one_matches_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    n = 20000
    torch.manual_seed(0)
    meta = _meta([SamplingParams(temperature=1.0)] * n)
    out = torch.tensor(Sampler()(logits.expand(n, -1).contiguous(), meta).token_ids)
    freq = torch.bincount(out, minlength=6).float() / n
    assert torch.allclose(freq, logits[0].softmax(-1), atol=0.02)


def test_low_temperature_concentrates() -> None:
    logits = _logits(1)[0]
    got = _sample_many(logits, SamplingParams(temperature=0.05), n=100)
    assert (got == int(logits.argmax())).float().mean() > 0.9


def test_penalties_hand_computed() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    params = SamplingParams(
        temperature=0.0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25
    )
    meta = _meta([params], outputs=[[0, 0, 1]], prompts=[[3, 4]])
    got = Sampler()._process_logits(logits, meta)
    expected = torch.tensor(
        [
            [
                2.0 / 2 - 0.5 * 2 - 0.25,  # in output twice: rep (positive -> divide), freq x2, presence
                -1.0 * 2 - 0.5 * 1 - 0.25,  # in output once: rep (negative -> multiply)
                0.5,  # unseen
                3.0 / 2,  # prompt only: repetition penalty only
                -2.0 * 2,
                1.0,
            ]
        ]
    )
    assert torch.allclose(got, expected)
    assert torch.equal(logits, torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]]))  # input untouched


def test_penalties_change_greedy_choice() -> None:
    logits = torch.tensor([[5.0, 4.9, 0.0, 0.0]])
    meta = _meta([SamplingParams(temperature=0.0, presence_penalty=1.0)], outputs=[[0]])
    assert Sampler()(logits, meta).token_ids == [1]


def test_penalty_rows_independent() -> None:
    logits = _logits(3)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, frequency_penalty=2.0)]
    meta = _meta(params + [params[0]], outputs=[[1, 2], [1, 2], [1, 2]], prompts=[[3], [3], [3]])
    got = Sampler()._process_logits(logits, meta)
    assert torch.equal(got[0], logits[0]) and torch.equal(got[2], logits[2])
    assert torch.allclose(got[1, [1, 2]], logits[1, [1, 2]] - 2.0)


def test_logit_bias_forces_token() -> None:
    logits = _logits(2)
    params = SamplingParams(temperature=1.0, logit_bias={7: 100.0})
    out = Sampler()(logits, _meta([params, SamplingParams(temperature=0.0, logit_bias={5: 100.0})]))
    assert out.token_ids == [7, 5]


def test_min_tokens_suppresses_eos_and_stop_ids() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 2] = 10.0  # eos
    logits[0, 9] = 9.0  # stop id
    logits[0, 4] = 8.0
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[9], ignore_eos=True)
    sampler = Sampler()
    assert sampler(logits, _meta([params], outputs=[[1]], eos=2)).token_ids == [4]
    assert sampler(logits, _meta([params], outputs=[[1, 1, 1]], eos=2)).token_ids == [2]
    # The model's eos ids are suppressed too, without ignore_eos and without stop ids.
    params2 = SamplingParams(temperature=0.0, min_tokens=3)
    assert sampler(logits, _meta([params2], eos=2)).token_ids == [9]


def test_same_seed_same_tokens_different_seeds_differ() -> None:
    logits = _logits(1, vocab=1000)[0] * 0.1  # flat-ish: many plausible tokens
    params = SamplingParams(temperature=1.0, seed=1)
    sampler = Sampler()

    def run(seed: int) -> list[int]:
        g = _gen(seed)
        return [sampler(logits[None], _meta([params], gens=[g])).token_ids[0] for _ in range(20)]

    assert run(123) == run(123)
    assert run(123) != run(456)


def test_seeded_row_batch_invariant() -> None:
    logits = _logits(1, vocab=500)[0] * 0.3
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=100)
    sampler = Sampler()

    alone_gen = _gen(7)
    alone = [sampler(logits[None], _meta([params], gens=[alone_gen])).token_ids[0] for _ in range(10)]

    batch_gen = _gen(7)
    torch.manual_seed(99)
    batched: list[int] = []
    for step in range(10):
        others = _logits(4, vocab=500, seed=100 + step)
        batch = torch.cat([others[:2], logits[None], others[2:]])
        rows = [
            SamplingParams(temperature=1.3),
            SamplingParams(temperature=0.0, presence_penalty=1.0),
            params,
            SamplingParams(temperature=0.7, min_p=0.05),
            SamplingParams(temperature=1.0, top_k=5),
        ]
        gens = [None, None, batch_gen, _gen(1000 + step), None]
        meta = _meta(rows, outputs=[[1, 2], [3], [], [4], []], gens=gens)
        batched.append(sampler(batch, meta).token_ids[2])
    assert alone == batched


def test_logprobs_are_raw() -> None:
    logits = _logits(3)
    params = [
        SamplingParams(temperature=0.7, top_k=3, logprobs=5, presence_penalty=1.5),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, logprobs=0, logit_bias={1: 50.0}),
    ]
    out = Sampler()(logits, _meta(params, outputs=[[0], [], []]))
    raw = torch.log_softmax(logits.double(), -1)
    assert out.logprobs[1] is None
    for row in (0, 2):
        lp = out.logprobs[row]
        assert lp is not None
        tok = out.token_ids[row]
        assert lp.token_id == tok
        assert abs(lp.logprob - float(raw[row, tok])) < 1e-6
        assert lp.rank == int((raw[row] > raw[row, tok]).sum()) + 1
        k = params[row].logprobs
        assert len(lp.top_token_ids) == len(lp.top_logprobs) == k
        assert lp.top_token_ids == raw[row].topk(k).indices.tolist()
        assert lp.top_logprobs == sorted(lp.top_logprobs, reverse=True)
        for t, v in zip(lp.top_token_ids, lp.top_logprobs):
            assert abs(v - float(raw[row, t])) < 1e-6
    assert out.token_ids[2] == 1 and out.logprobs[2].rank == int((raw[2] > raw[2, 1]).sum()) + 1


def test_logprobs_types_are_plain() -> None:
    out = Sampler()(_logits(1), _meta([SamplingParams(temperature=0.0, logprobs=2)]))
    lp = out.logprobs[0]
    assert type(lp.token_id) is int and type(lp.logprob) is float and type(lp.rank) is int
    assert all(type(t) is int for t in lp.top_token_ids)
    assert all(type(v) is float for v in lp.top_logprobs)
    assert lp.rank == 1 and lp.top_token_ids[0] == lp.token_id


def test_prompt_logprobs() -> None:
    logits = _logits(5)
    targets = torch.tensor([3, 0, 31, 7, 7])
    res = Sampler().prompt_logprobs(logits, targets, k=4)
    raw = torch.log_softmax(logits.double(), -1)
    assert len(res) == 5
    for t, lp in enumerate(res):
        tok = int(targets[t])
        assert lp.token_id == tok
        assert math.isclose(lp.logprob, float(raw[t, tok]), abs_tol=1e-6)
        assert lp.rank == int((raw[t] > raw[t, tok]).sum()) + 1
        assert lp.top_token_ids == raw[t].topk(4).indices.tolist()
        assert lp.top_logprobs == sorted(lp.top_logprobs, reverse=True)


@pytest.mark.parametrize("k", [0, 1])
def test_prompt_logprobs_small_k(k: int) -> None:
    res = Sampler().prompt_logprobs(_logits(2), torch.tensor([1, 2]), k=k)
    assert all(len(r.top_token_ids) == k for r in res)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_mixed_batch() -> None:
    dev = torch.device("cuda")
    vocab = 50_000
    logits = (torch.randn(6, vocab, generator=_gen(0)) * 3).to(dev, torch.bfloat16)

    def cuda_gen(seed: int) -> torch.Generator:
        g = torch.Generator(device=dev)
        g.manual_seed(seed)
        return g

    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=0.8, top_p=0.9, seed=1),
        SamplingParams(temperature=1.0, top_k=20, logprobs=0),
        SamplingParams(temperature=0.7, min_p=0.1, presence_penalty=0.5, repetition_penalty=1.2),
        SamplingParams(temperature=1.0, logit_bias={5: 100.0}),
        SamplingParams(temperature=1.2, top_k=5, top_p=0.5, seed=3, min_tokens=4),
    ]
    sampler = Sampler()

    def meta(p: list[SamplingParams], gens: list[torch.Generator | None]) -> SamplingMetadata:
        return _meta(p, outputs=[[4, 5]] * len(p), prompts=[[1, 2, 3]] * len(p), gens=gens, eos=2)

    out = sampler(logits, meta(params, [None, cuda_gen(1), None, None, None, cuda_gen(3)]))
    raw = torch.log_softmax(logits.float(), -1)
    assert out.token_ids[0] == int(logits[0].argmax())
    assert out.token_ids[4] == 5
    assert out.token_ids[2] in set(logits[2].float().topk(20).indices.tolist())
    assert abs(out.logprobs[0].logprob - float(raw[0, out.token_ids[0]])) < 1e-5
    for row, seed in ((1, 1), (5, 3)):
        alone = sampler(logits[row : row + 1], meta(params[row : row + 1], [cuda_gen(seed)]))
        assert alone.token_ids[0] == out.token_ids[row]
    greedy = sampler(logits, meta([SamplingParams(temperature=0.0)] * 6, [None] * 6))
    assert greedy.token_ids == logits.argmax(-1).tolist()
    plp = sampler.prompt_logprobs(logits, torch.tensor([1, 2, 3, 4, 5, 6], device=dev), 2)
    assert [lp.token_id for lp in plp] == [1, 2, 3, 4, 5, 6]
