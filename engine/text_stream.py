"""Incremental, UTF-8-safe text for one request, with stop strings matched across chunks.

mlx_lm's streaming detokenizer only releases complete characters/words. On top of it we hold back
any tail of the text that could still become a stop string, so a stop string split across tokens
(or across stream chunks) is caught, and neither it nor anything after it is ever returned.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, detokenizer, stop: list[str]):
        self._detok = detokenizer
        self._stop = stop
        self._pending = ""  # decoded, not yet released
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text, once one did

    def add(self, token: int) -> str:
        """Feed one generated token; return the text that is now safe to release."""
        if self.stopped:
            return ""
        self._detok.add_token(token)
        self._pending += self._detok.last_segment
        return self._release(final=False)

    def finish(self) -> str:
        """Flush everything left (the request ended)."""
        if self.stopped:
            return ""
        self._detok.finalize()
        self._pending += self._detok.last_segment
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if not self._stop:
            out, self._pending = self._pending, ""
            return out
        hits = [(i, n, s) for n, s in enumerate(self._stop) if (i := self._pending.find(s)) >= 0]
        if hits:
            hit, _, self.matched = min(hits)  # the earliest; at one place, the first listed
            self.stopped = True
            out, self._pending = self._pending[:hit], ""
            return out
        keep = 0 if final else _partial_stop_len(self._pending, self._stop)
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out


def _partial_stop_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
