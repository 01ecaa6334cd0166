"""Greedy and sampling choices, seeds, and parameter validation."""

import pytest
import torch

from midfill.engine.sampling import Sampler, SamplingParams
from midfill.errors import MidfillError

LOGITS = torch.tensor([[1.0, 3.0, 2.9, -1.0, 0.5], [0.2, 0.1, 0.0, 4.0, 3.9]])


def draws(params: SamplingParams, n: int = 200) -> torch.Tensor:
    sampler = Sampler(params)
    return torch.stack([sampler(LOGITS) for _ in range(n)])


def test_greedy_is_argmax():
    assert Sampler(SamplingParams())(LOGITS).tolist() == [1, 3]


def test_top_k_one_is_greedy():
    assert (draws(SamplingParams(temperature=1.0, top_k=1)) == torch.tensor([1, 3])).all()


def test_top_k_limits_choices():
    chosen = set(draws(SamplingParams(temperature=5.0, top_k=2))[:, 0].tolist())
    assert chosen == {1, 2}


def test_top_p_keeps_the_nucleus():
    # row 0: p(1) ~ 0.47, p(2) ~ 0.43 -> top_p 0.5 needs both; the rest never appear
    chosen = set(draws(SamplingParams(temperature=1.0, top_p=0.5))[:, 0].tolist())
    assert chosen == {1, 2}
    assert set(draws(SamplingParams(temperature=1.0, top_p=1e-6))[:, 0].tolist()) == {1}


def test_seed_reproduces_and_differs():
    a = draws(SamplingParams(temperature=1.0, seed=1))
    b = draws(SamplingParams(temperature=1.0, seed=1))
    c = draws(SamplingParams(temperature=1.0, seed=2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_repetition_penalty_moves_away_from_seen_tokens():
    seen = torch.zeros_like(LOGITS, dtype=torch.bool)
    seen[0, 1] = True
    seen[1, 3] = True
    sampler = Sampler(SamplingParams(repetition_penalty=1.5))
    assert sampler(LOGITS, seen).tolist() == [2, 4]
    assert Sampler(SamplingParams())(LOGITS, seen).tolist() == [1, 3]  # no penalty: unchanged


@pytest.mark.parametrize(
    "kwargs", [dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5), dict(repetition_penalty=0.0)]
)
def test_bad_parameters_are_user_errors(kwargs):
    with pytest.raises(MidfillError):
        SamplingParams(**kwargs)
