"""FIM transforms: examples decode back to the document, orders at their rates, markers never targets."""

import random

import pytest

from midfill.data.fim import FimConfig, fim_example, split_line, split_lines, split_rest_of_line, transform

DOC = '''import os


class Config:
    """Settings read from the environment."""

    def __init__(self):
        self.debug = os.environ.get("DEBUG") == "1"
        self.port = int(os.environ.get("PORT", "8080"))

    def url(self, host="localhost"):
        return f"http://{host}:{self.port}/"
'''


def reassemble(tok, ids: list[int]) -> tuple[str, str]:
    """The original document from a FIM example, and its order (psm, spm or plain)."""
    assert ids[-1] == tok.eot_id
    body = ids[:-1]
    if tok.fim_middle_id not in body:
        return tok.decode(body), "plain"
    mid = body.index(tok.fim_middle_id)
    head, middle = body[:mid], tok.decode(body[mid + 1 :])
    if head[0] == tok.fim_prefix_id:
        cut = head.index(tok.fim_suffix_id)
        return tok.decode(head[1:cut]) + middle + tok.decode(head[cut + 1 :]), "psm"
    assert head[:2] == [tok.eot_id, tok.fim_suffix_id]
    cut = head.index(tok.fim_prefix_id)
    return tok.decode(head[cut + 1 :]) + middle + tok.decode(head[2:cut]), "spm"


@pytest.mark.parametrize("splitter", ["char", "line", "rest_of_line", "lines"])
def test_every_example_decodes_back_to_the_document(small_tokenizer, splitter):
    config = FimConfig(fim_rate=1.0, splitters={splitter: 1.0})
    rng = random.Random(0)
    for _ in range(200):
        ids, _ = transform(small_tokenizer, DOC, rng, config)
        text, order = reassemble(small_tokenizer, ids)
        assert text == DOC and order in ("psm", "spm")


def test_orders_and_fim_rate_within_statistical_bounds(small_tokenizer):
    config = FimConfig(fim_rate=0.5, spm_rate=0.3)
    rng = random.Random(1)
    n = 2000
    orders = [reassemble(small_tokenizer, transform(small_tokenizer, DOC, rng, config)[0])[1] for _ in range(n)]
    fim = n - orders.count("plain")
    # binomial bounds at about 4 standard deviations
    assert abs(fim / n - 0.5) < 4 * (0.25 / n) ** 0.5
    assert abs(orders.count("spm") / fim - 0.3) < 4 * (0.21 / fim) ** 0.5


def test_loss_mask_excludes_the_prompt_markers_only(small_tokenizer):
    tok = small_tokenizer
    for spm in (False, True):
        ids, mask = fim_example(tok, "def f(x):\n    return ", "x + 1", "\n", spm=spm)
        sentinels = {tok.fim_prefix_id, tok.fim_suffix_id, tok.fim_middle_id}
        leading_eot = [spm] + [False] * (len(ids) - 1)  # SPM's <|endoftext|> is part of the prompt
        assert [t in sentinels or lead for t, lead in zip(ids, leading_eot)] == [not m for m in mask]
        assert ids[-1] == tok.eot_id and mask[-1]  # learning to stop is part of the loss


def test_spm_layout_matches_the_inference_prompt(small_tokenizer):
    from midfill.prompts import fim_prompt_psm, fim_prompt_spm

    tok = small_tokenizer
    ids, _ = fim_example(tok, "a = 1\n", "b = 2\n", "c = 3\n", spm=True)
    prompt = fim_prompt_spm(tok, "a = 1\n", "c = 3\n")
    assert ids[: len(prompt)] == prompt and prompt[0] == tok.eot_id  # Refact's client puts <|endoftext|> first
    ids, _ = fim_example(tok, "a = 1\n", "b = 2\n", "c = 3\n", spm=False)
    assert ids[: len(fim_prompt_psm(tok, "a = 1\n", "c = 3\n"))] == fim_prompt_psm(tok, "a = 1\n", "c = 3\n")


def test_line_splitters_cut_where_they_claim():
    rng = random.Random(3)
    for _ in range(100):
        a, b = split_line(DOC, rng)
        assert (a == 0 or DOC[a - 1] == "\n") and DOC[a:b].count("\n") == 1 and DOC[b - 1] == "\n"
        a, b = split_rest_of_line(DOC, rng)
        assert DOC[a:b].count("\n") <= 1 and (b == len(DOC) or DOC[b - 1] == "\n")
        a, b = split_lines(DOC, rng, max_lines=4)
        assert (a == 0 or DOC[a - 1] == "\n") and 1 <= DOC[a:b].count("\n") <= 4


def test_no_fim_keeps_the_document_whole(small_tokenizer):
    ids, mask = transform(small_tokenizer, DOC, random.Random(0), FimConfig(fim_rate=0.0))
    assert ids == small_tokenizer.encode(DOC) + [small_tokenizer.eot_id] and all(mask)
