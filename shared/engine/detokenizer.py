"""Incremental detokenization: per-token text deltas in O(window) (vLLM's prefix/read offsets).

Each step decodes two short id windows, ids[prefix:read] (text already emitted) and ids[prefix:],
and emits the difference. Decoding a window that starts a few tokens back keeps context-dependent
pieces right (sentencepiece's leading "▁", byte-level BPE chars split over tokens). Decoding ids
(not token strings) lets the tokenizer handle special/added tokens exactly as its full decode does.
"""

from __future__ import annotations

from typing import Any

# Prompt tokens decoded as left context for the first output token (vLLM uses 5).
_PROMPT_CONTEXT = 5
# A UTF-8 char spans at most 4 byte tokens; past this many pending tokens the trailing "\ufffd"
# is garbage from the model, not an unfinished char, so it is emitted instead of held forever.
_MAX_PENDING = 8
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._spaces_between_special = spaces_between_special_tokens
        # Only the prompt's tail is kept: ids = prompt tail + all output ids.
        self._ids: list[int] = list(prompt_token_ids[max(len(prompt_token_ids) - _PROMPT_CONTEXT, 0) :])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._num_output = 0
        self._text_parts: list[str] = []
        self._text_cache: str | None = ""

    @property
    def output_text(self) -> str:
        if self._text_cache is None:
            self._text_cache = "".join(self._text_parts)
            self._text_parts = [self._text_cache]
        return self._text_cache

    @property
    def num_tokens(self) -> int:
        return self._num_output

    def push(self, token_ids: list[int]) -> str:
        """Append output tokens; return the newly completed text (may be "")."""
        delta = "".join(self._push_one(int(t)) for t in token_ids)
        if delta:
            self._text_parts.append(delta)
            self._text_cache = None
        return delta

    def decode_token(self, token_id: int) -> str:
        """One token's text, for logprobs display (vLLM decodes the single id)."""
        return self._tokenizer.decode([token_id])

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(
            ids,
            skip_special_tokens=self._skip_special,
            spaces_between_special_tokens=self._spaces_between_special,
            clean_up_tokenization_spaces=False,
        )

    def _push_one(self, token_id: int) -> str:
        self._ids.append(token_id)
        self._num_output += 1
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        pending = len(self._ids) - self._read_offset
        if len(new_text) <= len(prefix_text) or (new_text.endswith(_REPLACEMENT) and pending < _MAX_PENDING):
            # Unfinished UTF-8 char (byte tokens), or nothing visible yet: wait for more tokens.
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return delta
