"""The request checks every protocol makes the same way: lengths against the context, token ids, stops.

A request that names a length gets it (a 400 if the context cannot hold it). One that leaves
it open, by leaving it out or (as llama.cpp's clients do) sending -1, gives the prompt all
but a small reserve of the context, and then generates until the context ends: with -1 as far
as that, without a length up to the server's `--max-tokens` cap.
"""

from __future__ import annotations

from midfill.errors import MidfillError

UNTIL_CONTEXT_ENDS = -1
ANSWER_RESERVE = 64  # room an open-ended request keeps for its answer when its prompt is trimmed to fit


def prompt_budget(requested: int | None, ctx: int, field: str = "max_tokens") -> int:
    """Tokens the prompt may take."""
    if requested is not None and requested >= ctx:
        raise MidfillError(f"{field} is {requested}, but the context is {ctx} tokens; ask for fewer")
    open_ended = requested is None or requested == UNTIL_CONTEXT_ENDS
    return ctx - min(ANSWER_RESERVE, ctx // 2) if open_ended else ctx - requested


def answer_length(requested: int | None, n_prompt: int, ctx: int, cap: int) -> int:
    """Tokens to generate after a prompt of `n_prompt` tokens."""
    room = max(ctx - n_prompt, 0)
    if requested is None:
        return min(cap, room)
    return room if requested == UNTIL_CONTEXT_ENDS else requested


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    """A protocol's stop field as stop strings: one string or a list; empty strings are dropped."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    return tuple(s for s in stops if s)


def check_token_ids(ids: list[int], vocab_size: int) -> list[int]:
    """A prompt given as token ids, refused when empty or when an id is outside the vocabulary."""
    if not ids:
        raise MidfillError("prompt is empty")
    if any(not 0 <= t < vocab_size for t in ids):
        raise MidfillError(f"prompt token ids must be in 0..{vocab_size - 1}")
    return ids
