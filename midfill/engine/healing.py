"""Token healing: a FIM prefix that ends inside a token is backed off, and the answer must grow it back.

Tokenizing real code never ends a token at the cursor of "retu|rn" or between a newline and the
indentation that follows it ("\\n" + "    return" is one "\\n   " token and one " return"), so a
prompt that ends there shows the model a boundary it never saw in training: it answers as if
the word had ended, or writes the next line at column 0. Healing (prompts.healing_cut) moves the
prefix's last token out of the prompt and into `required_prefix`: the first generated tokens
must spell it (each one a prefix of what is left of it, or extending past it), and it is
dropped from the answer.
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
