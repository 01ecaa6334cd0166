"""How many tokens a request's prompt may take and its answer may run to, in every protocol.

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
