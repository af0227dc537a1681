from __future__ import annotations

import pytest

from tandem.shared.engine.stop_strings import StopStringMatcher


def _stream(matcher: StopStringMatcher, chunks: list[str]) -> tuple[str, tuple[str, int] | None]:
    text = ""
    for chunk in chunks:
        text += chunk
        hit = matcher.check(text, len(chunk))
        if hit is not None:
            return text, hit
    return text, None


def test_stop_across_token_boundaries() -> None:
    m = StopStringMatcher(["STOP"], include_stop_str_in_output=False)
    text, hit = _stream(m, ["Hello S", "T", "OP and more"])
    assert hit == ("STOP", 6)
    assert text[: hit[1]] == "Hello "


def test_include_stop_str() -> None:
    m = StopStringMatcher(["STOP"], include_stop_str_in_output=True)
    text, hit = _stream(m, ["Hello ST", "OP and more"])
    assert hit is not None and text[: hit[1]] == "Hello STOP"


def test_exclude_stop_str_at_end() -> None:
    m = StopStringMatcher(["\n\n"], include_stop_str_in_output=False)
    text, hit = _stream(m, ["a\n", "\n"])
    assert hit == ("\n\n", 1)


def test_earliest_of_several() -> None:
    m = StopStringMatcher(["world", "lo w", "xyz"], include_stop_str_in_output=False)
    assert m.check("hello world", 11) == ("lo w", 3)
    m2 = StopStringMatcher(["o", "hello"], include_stop_str_in_output=True)
    assert m2.check("hello world", 11) == ("hello", 5)  # "hello" completes at the same char as "o"


def test_result_independent_of_chunking() -> None:
    stops = ["abcd", "c", "bc"]
    text = "xxabcdyy"
    for include in (False, True):
        m = StopStringMatcher(stops, include)
        whole = m.check(text, len(text))
        by_char = _stream(m, list(text))[1]
        assert whole == by_char == ("bc", 5 if include else 3)


def test_no_false_match() -> None:
    m = StopStringMatcher(["STOP", "</s>"], include_stop_str_in_output=False)
    _, hit = _stream(m, ["ST", "O", "p", "S", "T0P", "stop", "</", "S>", " <", "/ s>"])
    assert hit is None


def test_only_new_region_searched() -> None:
    m = StopStringMatcher(["ab"], include_stop_str_in_output=False)
    # "ab" lies entirely before the new chars: an earlier call already reported it.
    assert m.check("ab cd", 2) is None
    assert m.check("xa" + "b", 1) == ("ab", 1)


@pytest.mark.parametrize(("stops", "expected"), [([], 0), (["a"], 0), (["abc", "de"], 2)])
def test_holdback(stops: list[str], expected: int) -> None:
    assert StopStringMatcher(stops, False).holdback == expected


def test_no_stops() -> None:
    assert StopStringMatcher([], True).check("anything", 8) is None
