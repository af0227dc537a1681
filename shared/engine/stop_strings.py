"""Stop-string detection over incrementally growing output text."""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stop: list[str], include_stop_str_in_output: bool) -> None:
        self._stop = [s for s in stop if s]
        self._include = include_stop_str_in_output
        self._max_len = max((len(s) for s in self._stop), default=0)

    @property
    def holdback(self) -> int:
        """Trailing chars a streamer holds back: they may be the start of a stop string."""
        return max(self._max_len - 1, 0)

    def check(self, text: str, num_new_chars: int) -> tuple[str, int] | None:
        """Search matches that end inside the last `num_new_chars` chars of `text`.

        Returns (stop, truncate_to): keep text[:truncate_to]. The match that completes first wins
        (ties: the one starting first), so the result doesn't depend on how text was chunked.
        """
        if not self._stop or num_new_chars <= 0:
            return None
        n = len(text)
        new_start = n - num_new_chars
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for s in self._stop:
            # Earlier matches (ending before the new chars) were reported by earlier calls.
            idx = text.find(s, max(new_start - len(s) + 1, 0))
            if idx < 0:
                continue
            cand = (idx + len(s), idx, s)
            if best is None or cand[:2] < best[:2]:
                best = cand
        if best is None:
            return None
        end, start, s = best
        return s, end if self._include else start
