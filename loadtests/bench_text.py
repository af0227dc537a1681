"""Prompt text of an exact token count, in the server's own tokenization.

Where the token counts come from (the choice): by default the server's `/tokenize` and
`/detokenize` endpoints (tandem serve and vLLM both have them), so counts match what the server
will see without any local model files; `--tokenizer PATH` uses a local HF tokenizer instead (an HF
folder or a .gguf file), for servers without those endpoints.

How a prompt of N tokens is made: a seeded pseudo-English corpus (words from a fixed list, with
punctuation) is tokenized once; a prompt is a window of N token ids of that corpus (from a random
start, wrapping around), decoded to text and re-tokenized; where the round trip changes the count
(a word split at the window's edge), the window is trimmed or extended and tried again. Counts are
without special tokens; the server's usage (which includes any BOS and the chat template) is what the
benchmark reports.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import httpx
import numpy as np

# Common English words; the corpus is a seeded random sequence of them (not meant to mean anything).
WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this be had not "
    "or have one their first new after who they has two its all she time been more year other into over "
    "also about can some many when city world only most would school people made where between part team "
    "during under state history river north south east west family water music since small large early "
    "later known three while number house century name these such each same life area several public "
    "government system because called place season both long country through road used until light work "
    "around played left group company march against film second series book high before following form "
    "village line including local center station night power held field open island language "
    "building party began near town another became general short built common human summer winter "
    "garden market mountain bridge library letter window morning evening story paper table simple energy "
    "question answer friend travel student teacher doctor engine ocean forest animal flower stone"
).split()


class PromptTokenizer(Protocol):
    """Text <-> token ids, without special tokens."""

    async def encode(self, text: str) -> list[int]: ...

    async def decode(self, ids: list[int]) -> str: ...


class ServerTokenizer:
    """The server's `/tokenize` and `/detokenize` (vLLM's shapes)."""

    def __init__(self, client: httpx.AsyncClient, base_url: str, model: str | None,
                 headers: dict[str, str] | None = None) -> None:
        self._client, self._base, self._model, self._headers = client, base_url.rstrip("/"), model, headers

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = await self._client.post(f"{self._base}{path}", json={"model": self._model, **body},
                                    headers=self._headers)
        if r.status_code != 200:
            raise RuntimeError(f"{self._base}{path} answered {r.status_code}: {r.text[:300]} "
                               "(a server without /tokenize needs --tokenizer PATH)")
        return r.json()

    async def encode(self, text: str) -> list[int]:
        return list((await self._post("/tokenize", {"prompt": text, "add_special_tokens": False}))["tokens"])

    async def decode(self, ids: list[int]) -> str:
        return str((await self._post("/detokenize", {"tokens": ids}))["prompt"])


class LocalTokenizer:
    """A local HF tokenizer (the same files the server loads)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer

    @classmethod
    def load(cls, path: str) -> LocalTokenizer:
        from tandem.shared.models.hf_folder import load_tokenizer, resolve_model

        return cls(load_tokenizer(resolve_model(path)))

    async def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False).input_ids)

    async def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids))


def corpus_text(num_words: int, seed: int) -> str:
    """Seeded pseudo-English: sentences of 6-18 words."""
    rng = np.random.default_rng(seed)
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), size=num_words)]
    out: list[str] = []
    sentence_left = 0
    for w in words:
        if sentence_left == 0:
            sentence_left = int(rng.integers(6, 19))
            w = w.capitalize()
        sentence_left -= 1
        out.append(w + ("." if sentence_left == 0 else ""))
    return " ".join(out)


class TextMaker:
    """Makes prompt texts of a given token count from one tokenized corpus."""

    MAX_TRIES = 6

    def __init__(self, tokenizer: PromptTokenizer, corpus_ids: list[int]) -> None:
        if len(corpus_ids) < 64:
            raise ValueError(f"the corpus tokenized to only {len(corpus_ids)} tokens")
        self.tokenizer = tokenizer
        self.corpus_ids = corpus_ids

    @classmethod
    async def build(cls, tokenizer: PromptTokenizer, seed: int, num_words: int = 6000) -> TextMaker:
        return cls(tokenizer, await tokenizer.encode(corpus_text(num_words, seed)))

    def _window(self, start: int, length: int) -> list[int]:
        n = len(self.corpus_ids)
        return [self.corpus_ids[(start + i) % n] for i in range(length)]

    async def make(self, num_tokens: int, start: int) -> tuple[str, int]:
        """(text, its token count) with the count `num_tokens` when the round trip allows, else the
        closest found. `start` picks the corpus window (callers draw it from their seeded rng)."""
        if num_tokens < 1:
            raise ValueError(f"a prompt needs at least 1 token, asked for {num_tokens}")
        length = num_tokens
        best: tuple[str, int] | None = None
        for _ in range(self.MAX_TRIES):
            text = await self.tokenizer.decode(self._window(start, length))
            count = len(await self.tokenizer.encode(text))
            if best is None or abs(count - num_tokens) < abs(best[1] - num_tokens):
                best = (text, count)
            if count == num_tokens:
                break
            length = max(1, length + num_tokens - count)
        assert best is not None
        return best

    async def make_many(self, lengths: list[int], starts: list[int], concurrency: int = 16) -> list[tuple[str, int]]:
        gate = asyncio.Semaphore(concurrency)

        async def one(n: int, s: int) -> tuple[str, int]:
            async with gate:
                return await self.make(n, s)

        return list(await asyncio.gather(*(one(n, s) for n, s in zip(lengths, starts, strict=True))))
