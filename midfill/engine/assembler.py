"""Token ids in, final text deltas out: incremental detokenization plus stop rules."""

from __future__ import annotations

from midfill.engine.stops import StopRules
from midfill.tokenizer import Tokenizer

# A UTF-8 character is at most 4 bytes; byte-level BPE may spread it over up to 4 tokens.
MAX_PENDING_TOKENS = 4


class TextAssembler:
    """Feeds generated tokens one at a time and returns only text that can no longer change.

    Never emits half a UTF-8 character (tokens that decode to a trailing U+FFFD wait for the
    rest of their bytes), nor text that a stop rule may still cut off. After `done` is set,
    `text` is the final completion and `finish_reason` says why it ended.
    """

    def __init__(self, tok: Tokenizer, rules: StopRules | None = None, skip: str = "") -> None:
        self.tok = tok
        self.rules = rules or StopRules()
        self.skip = skip  # generated text that is not part of the answer (a healed prompt's tail)
        self.token_ids: list[int] = []
        self.text = ""
        self._generated = ""
        self.finish_reason: str | None = None
        self.stopping_word = ""  # the stop string that ended the text, if one did
        self._pending: list[int] = []
        self._emitted = 0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, token_id: int) -> str:
        """Add one generated token; return the newly final text (often empty)."""
        self.token_ids.append(token_id)
        self._pending.append(token_id)
        piece = self.tok.decode(self._pending)
        if piece.endswith("\ufffd") and len(self._pending) < MAX_PENDING_TOKENS:
            return ""
        self._pending.clear()
        self._generated += piece
        if len(self._generated) < len(self.skip):
            return ""
        self.text = self._generated[len(self.skip) :]
        end = self.rules.find_end(self.text)
        if end is not None:
            return self._stop_at(end)
        safe = self.rules.safe_length(self.text)
        delta = self.text[self._emitted : safe] if safe > self._emitted else ""
        self._emitted = max(self._emitted, safe)
        return delta

    def finish(self, reason: str) -> str:
        """The model stopped (end-of-text token or length limit): return the rest of the text."""
        if self._pending:
            self._generated += self.tok.decode(self._pending)
            self._pending.clear()
        self.text = self._generated[len(self.skip) :]
        end = self.rules.find_end(self.text)
        if end is not None:
            return self._stop_at(end)
        return self._close(self.text, reason)

    def _stop_at(self, end: int) -> str:
        self.stopping_word = next((s for s in self.rules.stop_strings if self.text.startswith(s, end)), "")
        return self._close(self.text[:end], "stop")

    def _close(self, text: str, reason: str) -> str:
        self.text = self.rules.finalize(text)
        self.finish_reason = reason
        delta = self.text[self._emitted :]
        self._emitted = len(self.text)
        return delta
