"""Prompt-lookup speculation: the same greedy tokens, the same sampling distribution, drafts that pay."""

from __future__ import annotations

import copy
import math
import sysconfig
from pathlib import Path

import pytest
import torch

import midfill
from midfill.engine.request import Finished, GenerationRequest, TextDelta
from midfill.engine.sampling import SamplingParams
from midfill.engine.scheduler import Engine
from midfill.engine.speculate import PRIOR_ACCEPTANCE, AcceptancePrior, DraftPolicy, NgramIndex, PassTimes
from midfill.engine.stops import StopRules
from midfill.hub import EMBEDDED_MODEL
from midfill.model.quantize import quantize_model
from tests.helpers import tiny_model


def test_lookup_drafts_what_followed_the_longest_earlier_match():
    index = NgramIndex([7, 1, 2, 3, 9, 4, 2, 3, 8, 5, 1, 2, 3])
    assert index.draft(3) == [9, 4, 2]  # "1 2 3" seen before: its continuation, not "2 3 8" (shorter match)
    index.extend([9])
    assert index.draft(2) == [4, 2]
    assert NgramIndex([5, 6]).draft(4) == []  # the tail is never its own match
    assert index.draft(0) == []


def test_a_draft_stays_off_where_it_does_not_pay():
    policy, times = DraftPolicy(accepted=0.2), PassTimes()
    times.record(1, 1.0), times.record(2, 1.5), times.record(3, 2.0)  # rows as dear as passes: a compute-bound model
    assert policy.length(1, times, limit=7) == 0
    cheap = PassTimes()
    for rows in range(1, 9):
        cheap.record(rows, 1.0 + 0.02 * rows)  # a bandwidth-bound model: rows nearly free
    assert DraftPolicy(accepted=0.8).length(1, cheap, limit=7) >= 4
    assert DraftPolicy(accepted=0.8).length(1, cheap, limit=2) == 2  # never past the tokens still wanted


def test_probing_again_after_a_while_off():
    policy, times = DraftPolicy(accepted=0.0), PassTimes()
    times.record(1, 1.0), times.record(2, 2.0)
    lengths = [policy.length(1, times, limit=7) for _ in range(40)]
    assert 0 < sum(lengths) <= 3


def test_the_shared_prior_follows_finished_requests_by_their_evidence():
    prior = AcceptancePrior()
    prior.learn(DraftPolicy())  # drafted nothing: no say
    assert prior.rate == PRIOR_ACCEPTANCE
    short = DraftPolicy()
    short.verdict(2, 0)
    prior.learn(short)
    assert PRIOR_ACCEPTANCE - 0.05 < prior.rate < PRIOR_ACCEPTANCE  # two tokens move it a little
    for _ in range(12):
        edit = DraftPolicy()
        edit.verdict(40, 38)
        prior.learn(edit)
    assert prior.rate > 0.9


def test_a_new_request_starts_from_what_the_earlier_ones_showed():
    model = tiny_model(seed=2, n_embd=128, n_head=4, vocab_size=128, n_positions=512)
    prompt = torch.randperm(128, generator=torch.Generator().manual_seed(0)).tolist() * 2  # every token has a drafted successor
    engine = Engine(model, None, max_batch=1)
    seen = []
    for _ in range(3):
        engine.submit(GenerationRequest(prompt, 12, stop_ids=frozenset(), cache_prompt=False), lambda event: None)
        engine.drive()
        seen.append(engine.acceptance.rate)
    assert seen[0] != PRIOR_ACCEPTANCE and len(set(seen)) == 3  # each finished request moved it
    engine.submit(GenerationRequest(prompt, 4, stop_ids=frozenset()), lambda event: None)
    engine.step()  # admitted: its drafting starts at the shared rate
    assert engine.active[0].policy.accepted == seen[-1]


def chi_square_limit(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at p = 0.001 (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    expected = probs * counts.sum()
    keep = expected >= 5
    pooled_counts = torch.cat([counts[keep], counts[~keep].sum(0, keepdim=True)])
    pooled_expected = torch.cat([expected[keep], expected[~keep].sum(0, keepdim=True)])
    pooled = pooled_expected > 0
    stat = ((pooled_counts[pooled] - pooled_expected[pooled]) ** 2 / pooled_expected[pooled]).sum()
    return float(stat), int(pooled.sum()) - 1


def test_sampled_tokens_through_the_engine_keep_their_distribution():
    """On a small model: the second token's frequencies over many seeds, drafts verified by the
    acceptance rule, against its exact distribution sum_t1 p(t1) p(t2 | t1)."""
    model = tiny_model(seed=3, vocab_size=16, n_embd=64, n_head=2)  # head size 32
    prompt = list(range(16)) * 2  # every token occurs: each first token has a drafted successor
    with torch.no_grad():
        first = model(torch.tensor([prompt]))[0, -1].softmax(-1)
        second = model(torch.tensor([prompt + [t] for t in range(16)]))[:, -1].softmax(-1)
    exact = first @ second
    engine = Engine(model, None, max_batch=16, max_queue=4096, speculate=True)
    engine.acceptance = AcceptancePrior(rate=1.0)
    engine.acceptance.learn = lambda policy: None  # held: every request drafts from its first token, whatever this model accepts
    results = []
    for seed in range(800):
        request = GenerationRequest(prompt, 2, SamplingParams(temperature=1.0, seed=seed), stop_ids=frozenset(), cache_prompt=False)
        engine.submit(request, lambda event: results.append(event.result) if isinstance(event, Finished) else None)
    engine.drive()
    assert sum(r.drafted_tokens for r in results) > 500  # the rule ran: most second tokens came through a draft
    counts = torch.bincount(torch.tensor([r.token_ids[1] for r in results]), minlength=16).float()
    stat, df = chi_square(counts, exact)
    assert stat < chi_square_limit(df), (counts, exact * counts.sum())


@pytest.fixture(scope="module")
def embedded():
    """The embedded model as it serves (bf16 packed: the fused native block) and a file that repeats itself."""
    model, tok = midfill.load_model(EMBEDDED_MODEL), midfill.load_tokenizer(EMBEDDED_MODEL)
    source = (Path(sysconfig.get_paths()["stdlib"]) / "json" / "encoder.py").read_text()
    return model, tok, source


def run(model, tok, requests: list[GenerationRequest], speculate: bool, max_batch: int = 4, cancel_after: int | None = None,
        pass_times: PassTimes | None = None):
    engine = Engine(model, tok, max_batch=max_batch, speculate=speculate)
    engine.pass_times = pass_times or engine.pass_times
    results: dict[int, object] = {}
    for i, request in enumerate(requests):
        deltas = []

        def sink(event, i=i, request=request, deltas=deltas):
            if isinstance(event, TextDelta):
                deltas.append(event.text)
                if cancel_after is not None and i == 0 and len(deltas) == cancel_after:
                    request.cancel()
            elif isinstance(event, Finished):
                results[i] = event.result

        engine.submit(request, sink)
    engine.drive()
    return [results[i] for i in range(len(requests))]


def edit_prompts(tok, source: str, n: int) -> list[list[int]]:
    """Prompts cut before lines whose text appears earlier in the file (the edit workload's kind)."""
    lines, prompts = source.splitlines(keepends=True), []
    for i in range(40, len(lines)):
        if lines[i].strip() and lines[i] in lines[:i] and len(prompts) < n:
            prompts.append(tok.encode("".join(lines[:i])[-1200:]))
    return prompts


def test_greedy_tokens_are_identical_with_and_without_across_batch_sizes(embedded):
    model, tok, source = embedded
    prompts = edit_prompts(tok, source, 4)
    requests = lambda: [GenerationRequest(p, 20, stop_ids=frozenset(), cache_prompt=False) for p in prompts]  # noqa: E731
    plain = run(model, tok, requests(), speculate=False)
    for max_batch in (1, 3):
        speculated = run(model, tok, requests(), speculate=True, max_batch=max_batch)
        assert [r.token_ids for r in speculated] == [r.token_ids for r in plain]
    assert sum(r.accepted_tokens for r in speculated) > 0 and all(r.drafted_tokens == 0 for r in plain)


def test_a_seeded_sampled_request_gives_the_same_text_whatever_the_drafts(embedded):
    """Draft lengths follow measured pass times, which differ run to run: a seed must fix the text anyway."""
    model, tok, source = embedded
    prompts = edit_prompts(tok, source, 3)
    sampling = [SamplingParams(temperature=0.8, top_p=0.95, seed=seed) for seed in range(len(prompts))]
    requests = lambda: [GenerationRequest(p, 24, s, stop_ids=frozenset(), cache_prompt=False) for p, s in zip(prompts, sampling)]  # noqa: E731
    plain = run(model, tok, requests(), speculate=False)
    cheap, dear = PassTimes(), PassTimes()
    for rows in range(1, 33):
        cheap.record(rows, 1.0 + 0.01 * rows)  # rows nearly free: long drafts
        dear.record(rows, 1.0 + 0.5 * (rows > 4))  # short drafts only
    for times in (cheap, dear, None):
        speculated = run(model, tok, requests(), speculate=True, pass_times=times)
        assert [r.token_ids for r in speculated] == [r.token_ids for r in plain]
        assert sum(r.drafted_tokens for r in speculated) > 0


def test_the_prefix_cache_and_a_request_opting_out(embedded):
    model, tok, source = embedded
    prompt = edit_prompts(tok, source, 1)[0]
    requests = [GenerationRequest(prompt, 20, stop_ids=frozenset()), GenerationRequest(prompt + [tok.eot_id], 20, stop_ids=frozenset()),
                GenerationRequest(prompt, 20, stop_ids=frozenset(), speculate=False)]  # fmt: skip
    plain = run(model, tok, [GenerationRequest(r.prompt_ids, 20, stop_ids=frozenset(), cache_prompt=False) for r in requests], False)
    speculated = run(model, tok, requests, speculate=True, max_batch=1)  # one at a time: each finds the last one's KV
    assert [r.token_ids for r in speculated] == [r.token_ids for r in plain]
    assert speculated[1].cached_tokens >= len(prompt) - 1 and speculated[2].drafted_tokens == 0


def test_a_stop_string_inside_an_accepted_draft_stops_there(embedded):
    model, tok, source = embedded
    prompts = edit_prompts(tok, source, 3)
    plain = run(model, tok, [GenerationRequest(p, 24, stop_ids=frozenset()) for p in prompts], speculate=False)
    stops = [r.text[len(r.text) // 2 :][:3] for r in plain]  # a stop string in the middle of what comes
    build = lambda: [GenerationRequest(p, 24, rules=StopRules(stop_strings=(s,)), stop_ids=frozenset())  # noqa: E731
                     for p, s in zip(prompts, stops)]  # fmt: skip
    expected = run(model, tok, build(), speculate=False)
    got = run(model, tok, build(), speculate=True)
    assert [(r.text, r.finish_reason) for r in got] == [(r.text, r.finish_reason) for r in expected]
    assert any(r.finish_reason == "stop" for r in got) and sum(r.accepted_tokens for r in got) > 0


def test_cancelling_mid_draft_leaves_the_others_exact(embedded):
    model, tok, source = embedded
    prompts = edit_prompts(tok, source, 3)
    plain = run(model, tok, [GenerationRequest(p, 20, stop_ids=frozenset()) for p in prompts], speculate=False)
    got = run(model, tok, [GenerationRequest(p, 20, stop_ids=frozenset()) for p in prompts], speculate=True, cancel_after=2)
    assert got[0].finish_reason == "cancelled" and plain[0].text.startswith(got[0].text)
    assert [r.token_ids for r in got[1:]] == [r.token_ids for r in plain[1:]]


def test_float32_and_int8_models_take_the_same_path():
    """Speculation is in the one generation path: every weight format decodes the same with and without."""
    base = tiny_model(seed=2, n_embd=128, n_head=4, vocab_size=128, n_positions=512)
    orders = [torch.randperm(128, generator=torch.Generator().manual_seed(seed)).tolist() for seed in (0, 1)]
    prompts = [order * 2 for order in orders]  # every token occurs: whatever comes next has a drafted successor
    for model in (base, quantize_model(copy.deepcopy(base), "int8")):
        requests = lambda: [GenerationRequest(p, 16, stop_ids=frozenset(), cache_prompt=False) for p in prompts]  # noqa: E731
        speculated, plain = run(model, None, requests(), True), run(model, None, requests(), False)
        assert [r.token_ids for r in speculated] == [r.token_ids for r in plain]
        assert sum(r.drafted_tokens for r in speculated) > 0
