"""Prompt building: fill-in-the-middle (SPM and PSM orders) and Refact's chat format, within a budget.

Prompts are built as token ids, piece by piece: the sentinels are ids and the user's text is
encoded as plain text, so code that contains "<fim_prefix>" cannot break the prompt. The result
equals encoding the whole prompt string, because special tokens split the text before BPE.

Over-budget prompts are trimmed at line boundaries. FIM split: the suffix may take up to
`suffix_share` (default 25%) of the budget, or more if the prefix leaves room; the prefix takes
the rest. The prefix loses whole lines from its start, the suffix whole lines from its end, so
the text next to the cursor is kept. Only if the cursor's own line is too long is it cut inside.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from midfill.errors import MidfillError
from midfill.tokenizer import Tokenizer

FimOrder = Literal["spm", "psm"]
FIM_ORDERS = ("spm", "psm")
SUFFIX_SHARE = 0.25
MAX_CHARS_PER_TOKEN = 16  # no BPE token of code is longer on average: text beyond this never fits
CHAT_ROLES = {"system": "SYSTEM", "user": "USER", "assistant": "ASSISTANT"}


def fim_layout(tok: Tokenizer, order: str, prefix_ids: Sequence[int], suffix_ids: Sequence[int]) -> list[int]:
    """A FIM prompt through <fim_middle> from ids already fitted: the one place the sentinel order is written.

    Training examples are this followed by the middle's ids and <|endoftext|> (data/fim.py,
    data/fim_synth.py), so the model is trained on exactly the layout it is asked in.
    """
    if order == "spm":
        return [tok.eot_id, tok.fim_suffix_id, *suffix_ids, tok.fim_prefix_id, *prefix_ids, tok.fim_middle_id]
    if order == "psm":
        return [tok.fim_prefix_id, *prefix_ids, tok.fim_suffix_id, *suffix_ids, tok.fim_middle_id]
    raise MidfillError(f"unknown FIM order {order!r}; use 'spm' or 'psm'")


def fim_prompt_spm(tok: Tokenizer, prefix: str, suffix: str, budget: int | None = None) -> list[int]:
    """Refact's IDE order: `<|endoftext|><fim_suffix>{suffix}<fim_prefix>{prefix}<fim_middle>`.

    Everything up to the cursor comes last, so while the user types only the tail changes and a
    prefix KV cache stays valid.
    """
    return fim_prompt(tok, prefix, suffix, "spm", budget)


def fim_prompt_psm(tok: Tokenizer, prefix: str, suffix: str, budget: int | None = None) -> list[int]:
    """The model card's order: `<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>`."""
    return fim_prompt(tok, prefix, suffix, "psm", budget)


def fim_prompt(tok: Tokenizer, prefix: str, suffix: str, order: str = "spm", budget: int | None = None) -> list[int]:
    """Ids of the FIM prompt in `order` ("spm" or "psm"), trimmed to `budget` tokens if one is given."""
    n_sentinels = len(fim_layout(tok, order, [], []))  # fim_layout also checks the order
    prefix_ids, suffix_ids = fit_prefix_suffix(tok, prefix, suffix, budget, n_sentinels)
    return fim_layout(tok, order, prefix_ids, suffix_ids)


def indent_of(line: str) -> int:
    """Number of spaces and tabs that start `line`."""
    return len(line) - len(line.lstrip(" \t"))


def cursor_indent(prefix: str) -> int:
    """Indentation of the line the cursor is on (the text after the prefix's last newline)."""
    return indent_of(prefix.rsplit("\n", 1)[-1])


# The prefix's last token may merge with what follows: it is a word (or part of one), or the
# whitespace that starts a line (a bare newline before indentation, or part of the indentation).
MERGEABLE_TAIL = re.compile(r"(?:\w|\n[ \t]*)\Z")


def fim_prompt_healed(
    tok: Tokenizer, prefix: str, suffix: str, order: str = "spm", budget: int | None = None, heal: bool = True
) -> tuple[list[int], list[int] | None]:
    """A FIM prompt, and the same prompt without the prefix's last token where that token may merge
    with what follows (None elsewhere): token healing, which the engine applies only if the model's
    first token shows the cut is inside a token (engine/healing.py)."""
    n_sentinels = len(fim_layout(tok, order, [], []))
    prefix_ids, suffix_ids = fit_prefix_suffix(tok, prefix, suffix, budget, n_sentinels)
    ids = fim_layout(tok, order, prefix_ids, suffix_ids)
    if not heal or len(prefix_ids) < 2 or not MERGEABLE_TAIL.search(prefix):
        return ids, None
    return ids, fim_layout(tok, order, prefix_ids[:-1], suffix_ids)


def fit_prefix_suffix(
    tok: Tokenizer, prefix: str, suffix: str, budget: int | None, n_sentinels: int, suffix_share: float = SUFFIX_SHARE
) -> tuple[list[int], list[int]]:
    """Token ids of prefix and suffix, trimmed so that they and the sentinels fit in `budget`."""
    if budget is not None:  # a huge file: first cut to what could possibly fit, at line boundaries
        prefix, suffix = cut_chars(prefix, suffix, budget * MAX_CHARS_PER_TOKEN)
    prefix_ids, suffix_ids = tok.encode(prefix), tok.encode(suffix)
    if budget is None:
        return prefix_ids, suffix_ids
    room = budget - n_sentinels
    if room < 1:
        raise MidfillError(f"prompt budget of {budget} tokens is too small for a FIM prompt; raise the context size")
    if len(prefix_ids) + len(suffix_ids) <= room:
        return prefix_ids, suffix_ids
    suffix_cap = max(int(room * suffix_share), room - len(prefix_ids))
    suffix_room = min(len(suffix_ids), suffix_cap)
    prefix_room = room - suffix_room
    if len(prefix_ids) > prefix_room:
        prefix_ids = keep_last_lines(tok, prefix, prefix_room)
    if len(suffix_ids) > suffix_room:
        suffix_ids = keep_first_lines(tok, suffix, suffix_room)
    return prefix_ids, suffix_ids


def cut_chars(prefix: str, suffix: str, limit: int) -> tuple[str, str]:
    """At most `limit` characters of each side, nearest the cursor, in whole lines (but the cursor's)."""
    if len(prefix) > limit:
        prefix = prefix[-limit:]
        prefix = prefix[prefix.find("\n") + 1 :] if "\n" in prefix[:-1] else prefix
    if len(suffix) > limit:
        suffix = suffix[:limit]
        suffix = suffix[: suffix.rfind("\n") + 1] if "\n" in suffix[1:] else suffix
    return prefix, suffix


def keep_last_lines(tok: Tokenizer, text: str, max_tokens: int) -> list[int]:
    """Ids of the longest tail of whole lines of `text` that fits in max_tokens."""
    lines = text.splitlines(keepends=True)
    lo, hi = 0, len(lines) - 1  # find the smallest start line whose tail fits
    if len(tok.encode(lines[-1])) > max_tokens:
        return tok.encode(lines[-1])[-max_tokens:] if max_tokens > 0 else []
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tok.encode("".join(lines[mid:]))) <= max_tokens:
            hi = mid
        else:
            lo = mid + 1
    return tok.encode("".join(lines[lo:]))


def keep_first_lines(tok: Tokenizer, text: str, max_tokens: int) -> list[int]:
    """Ids of the longest head of whole lines of `text` that fits in max_tokens."""
    lines = text.splitlines(keepends=True)
    if len(tok.encode(lines[0])) > max_tokens:
        return tok.encode(lines[0])[:max_tokens]
    lo, hi = 1, len(lines)  # find the largest number of leading lines that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tok.encode("".join(lines[:mid]))) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return tok.encode("".join(lines[:lo]))


@dataclass
class ChatMessage:
    role: str  # "system", "user" or "assistant"
    content: str


def chat_turn_ids(tok: Tokenizer, message: ChatMessage) -> list[int]:
    role = CHAT_ROLES.get(message.role)
    if role is None:
        raise MidfillError(f"unknown chat role {message.role!r}; use one of {', '.join(CHAT_ROLES)}")
    return [tok.empty_output_id, *tok.encode(f"{role} {message.content}\n")]


def chat_prompt(tok: Tokenizer, messages: Sequence[ChatMessage], budget: int | None = None) -> list[int]:
    """`<empty_output>SYSTEM {system}\\n<empty_output>USER {query}\\n...<empty_output>ASSISTANT`.

    Over budget, the oldest user/assistant turns are dropped first; system messages and the
    last user message are always kept.
    """
    if not messages or messages[-1].role != "user":
        raise MidfillError("a chat prompt must end with a user message")
    # a message longer than this cannot fit whatever it tokenizes to: drop it (or refuse) unencoded
    too_long = [budget is not None and len(m.content) > budget * tok.max_token_chars for m in messages]
    if too_long[-1] or any(t and m.role == "system" for t, m in zip(too_long, messages)):
        raise MidfillError(f"a chat message is longer than the budget of {budget} tokens could hold; shorten it")
    turns = [[] if t else chat_turn_ids(tok, m) for t, m in zip(too_long, messages)]
    reply = [tok.empty_output_id, *tok.encode("ASSISTANT")]
    keep = [not t for t in too_long]
    if budget is not None:
        total = sum(map(len, turns)) + len(reply)
        droppable = [i for i, m in enumerate(messages[:-1]) if m.role != "system"]
        for i in droppable:
            if total <= budget:
                break
            keep[i] = False
            total -= len(turns[i])
        if total > budget:
            raise MidfillError(
                f"the chat prompt needs {total} tokens even with old turns dropped, over the budget of {budget}; "
                "shorten the message or raise the context size"
            )
    return [t for turn, kept in zip(turns, keep) if kept for t in turn] + reply
