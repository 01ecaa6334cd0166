"""Prompt-lookup drafts, and how many tokens to draft: editing is mostly re-typing what the file holds.

When the last few generated tokens also appear earlier (in the prompt, the suffix, the extra files
of a FIM request, or the text generated so far), the tokens that followed them there are a good
guess for what comes next. The engine verifies such a draft in the same decode pass as every
row's next token (one more row per drafted token: on a CPU the weights are read once for all
rows, so a row costs far less than a pass), keeps the longest prefix the model agrees with and
rolls the rest back. Greedy output is the same token for token; sampled output keeps its
distribution, and a seeded request its text, whatever the draft lengths (Sequence.take).

A draft pays only when enough of it is accepted for what its rows cost, so the length adapts per
request (acceptance rate) and per machine (measured pass times by row count), down to zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_NGRAM = 4  # the longest tail looked up: longer matches are rarer but surer
MAX_DRAFT = 7  # with the row's own token, 8 rows: the native kernels' widest single pass
PROBE_EVERY = 16  # a request that stopped drafting tries one short draft this often, in case the text changed
PRIOR_ACCEPTANCE = 0.6  # before the engine has any verdicts: what edits showed (benchmarks/RESULTS.md)
PRIOR_EVIDENCE = 32  # drafted tokens that give a finished request half the say in the shared prior


class NgramIndex:
    """Where each n-gram (n = 1..MAX_NGRAM) of a token list last appeared, kept as tokens are appended.

    index[ngram] is the position right after its latest occurrence whose next token is known, so the
    tail n-gram (which has no next token yet) finds an earlier occurrence, never itself.
    """

    def __init__(self, tokens: list[int]) -> None:
        self.tokens: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            end = len(self.tokens)  # the n-grams ending at end - 1 now have a next token: `token`
            for n in range(1, min(MAX_NGRAM, end) + 1):
                self.index[tuple(self.tokens[end - n : end])] = end
            self.tokens.append(token)

    def draft(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the longest tail n-gram seen before, or [] when none was."""
        if limit <= 0:
            return []
        for n in range(min(MAX_NGRAM, len(self.tokens)), 0, -1):
            start = self.index.get(tuple(self.tokens[-n:]))
            if start is not None:
                return self.tokens[start : start + limit]
        return []


@dataclass
class PassTimes:
    """Seconds per decode pass by its number of rows (moving averages), measured as the engine runs.

    Rows the engine has not run yet are guessed from the nearest measured count as if each extra row
    cost a tenth of a pass: optimistic enough to try, and replaced by the truth once tried.
    """

    seconds: dict[int, float] = field(default_factory=dict)

    def record(self, rows: int, seconds: float) -> None:
        old = self.seconds.get(rows)
        self.seconds[rows] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def estimate(self, rows: int) -> float:
        if rows in self.seconds:
            return self.seconds[rows]
        if not self.seconds:
            return 1.0 + 0.1 * (rows - 1)
        nearest = min(self.seconds, key=lambda known: abs(known - rows))
        return self.seconds[nearest] * (1 + 0.1 * (rows - 1)) / (1 + 0.1 * (nearest - 1))


@dataclass
class DraftPolicy:
    """One request's drafting: its acceptance rate so far, and the length that pays best now."""

    accepted: float = PRIOR_ACCEPTANCE  # moving average of the fraction of drafted tokens accepted
    idle_steps: int = 0
    drafted_total: int = 0
    accepted_total: int = 0

    def length(self, rows: int, times: PassTimes, limit: int) -> int:
        """Draft length for a pass that already has `rows` rows: the k that maximises expected tokens
        per second, E[tokens] = 1 + a + ... + a^k against the pass's time with k more rows; 0 if none pays."""
        best, best_rate = 0, 1 / times.estimate(rows)
        for k in range(1, min(MAX_DRAFT, limit) + 1):
            rate = sum(self.accepted**i for i in range(k + 1)) / times.estimate(rows + k)
            if rate > best_rate * 1.02:  # a draft must pay a little more than nothing, not break even
                best, best_rate = k, rate
        if best == 0:
            self.idle_steps += 1
            if self.idle_steps >= PROBE_EVERY:
                self.idle_steps = 0
                return min(1, limit)
        return best

    def verdict(self, drafted: int, accepted: int) -> None:
        if drafted:
            self.idle_steps = 0
            self.drafted_total += drafted
            self.accepted_total += accepted
            self.accepted = 0.7 * self.accepted + 0.3 * (accepted / drafted)


@dataclass
class AcceptancePrior:
    """The acceptance rate a new request starts from: what the drafts of the requests before it showed.

    An editor's completions are short (a line is a few tokens), so a request learning its own rate
    from 0.6 ends before it knows; the server's traffic knows better. Each finished request moves the
    prior towards its own rate, with a say that grows with how much it drafted.
    """

    rate: float = PRIOR_ACCEPTANCE

    def learn(self, policy: DraftPolicy) -> None:
        if policy.drafted_total:
            say = 0.5 * policy.drafted_total / (policy.drafted_total + PRIOR_EVIDENCE)
            self.rate += say * (policy.accepted_total / policy.drafted_total - self.rate)
