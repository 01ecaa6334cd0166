"""Token healing: a FIM prefix that ends inside a token is backed off, and the answer must grow it back.

Tokenizing real code never ends a token at the cursor of "retu|rn" or between a newline and the
indentation that follows it ("\\n" + "    return" is one "\\n   " token and one " return"), so a
prompt that ends there shows the model a boundary it never saw in training: it answers as if
the word had ended, or writes the next line at column 0. A healed request carries the same
prompt without the prefix's last token (prompts.fim_prompt_healed); if the model's first token
shows the cut is inside a token (`healing_wanted`), the sequence switches to it, and the first
generated tokens must spell the backed-off text (each one a prefix of what is left of it, or
extending past it), which is dropped from the answer.
"""

from __future__ import annotations

import bisect
import functools

import torch

from midfill.tokenizer import Tokenizer


class TokenBytes:
    """Every token's bytes, sorted, so that the tokens consistent with a required text are found fast."""

    def __init__(self, tok: Tokenizer) -> None:
        pieces = [(tok.token_bytes(i), i) for i in range(tok.vocab_size) if i not in tok.special_ids]
        self.sorted = sorted((b, i) for b, i in pieces if b)
        self.keys = [b for b, _ in self.sorted]
        self.ids_of = {}
        for b, i in self.sorted:
            self.ids_of.setdefault(b, []).append(i)

    def consistent(self, required: bytes) -> list[int]:
        """Ids of tokens that are a prefix of `required` or start with it."""
        lo = bisect.bisect_left(self.keys, required)
        hi = bisect.bisect_left(self.keys, required + b"\xff" * 8)
        ids = [i for _, i in self.sorted[lo:hi] if _.startswith(required)]
        for k in range(1, len(required)):
            ids += self.ids_of.get(required[:k], [])
        return ids


@functools.lru_cache(maxsize=4)
def token_bytes_of(tok: Tokenizer) -> TokenBytes:
    return TokenBytes(tok)


class RequiredPrefix:
    """What is left to spell of a healed request's required text; masks logits until it is spelled."""

    def __init__(self, tok: Tokenizer, text: str) -> None:
        self.tok = tok
        self.left = text.encode("utf-8")
        self.table = token_bytes_of(tok)

    @property
    def done(self) -> bool:
        return not self.left

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [1, V] with every token that cannot continue the required text set to -inf."""
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        allowed[self.table.consistent(self.left)] = True
        return logits.masked_fill(~allowed, float("-inf"))

    def advance(self, token: int) -> None:
        piece = self.tok.token_bytes(token)
        self.left = self.left[len(piece) :] if self.left.startswith(piece) else b""


def healing_wanted(tok: Tokenizer, last: int, first: int, stop_ids: frozenset[int]) -> str | None:
    """The text to heal (the prompt's last prefix token's), or None to answer the prompt as it is.

    Healing is wanted when the model's own first token would merge with the last one: tokenizing
    their text together does not give the two tokens back (the cut is not at a boundary the
    tokenizer makes), or, after a bare newline or indentation, the model would rather stop than
    write a line it never saw start like that. Otherwise the plain prompt's answer is kept, so a
    cut at a natural token boundary is answered exactly as without healing.
    """
    if first >= tok.vocab_size:
        return None  # a padding id of the model's embedding: no text to merge with
    try:
        text = tok.token_bytes(last).decode("utf-8")
        joined = (tok.token_bytes(last) + tok.token_bytes(first)).decode("utf-8")
    except UnicodeDecodeError:
        return None  # part of a character: not a boundary healing can reason about
    if first in stop_ids or first in tok.special_ids:
        return text if text.startswith("\n") and not text.strip() else None
    return text if tok.encode(joined) != [last, first] else None
