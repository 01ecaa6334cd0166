"""The Refact (StarCoder) tokenizer gives the exact ids; trained tokenizers follow its conventions."""

import pytest

from midfill.errors import MidfillError
from midfill.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer


def test_every_example_encodes_to_exact_ids_and_decodes_back(refact_tokenizer, tokenizer_examples):
    assert len(tokenizer_examples) >= 9
    for example in tokenizer_examples:
        ids = refact_tokenizer.encode_with_special(example["text"])
        assert ids == example["ids"], example["text"]
        assert refact_tokenizer.decode(ids, skip_special=False) == example["text"]


def test_special_ids_are_read_from_the_tokenizer(refact_tokenizer):
    tok = refact_tokenizer
    assert (tok.eot_id, tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id, tok.fim_pad_id) == (0, 1, 2, 3, 4)
    assert tok.empty_output_id == 14
    assert tok.vocab_size == 49152
    assert [tok.token_text(i) for i in range(19)] == SPECIAL_TOKENS


def test_plain_encode_keeps_sentinel_strings_as_text(refact_tokenizer):
    text = 'x = "<fim_prefix>"'
    ids = refact_tokenizer.encode(text)
    assert refact_tokenizer.fim_prefix_id not in ids
    assert refact_tokenizer.decode(ids) == text
    assert refact_tokenizer.fim_prefix_id in refact_tokenizer.encode_with_special(text)


def test_trained_tokenizer_has_refact_specials_and_splits_digits(small_tokenizer):
    assert [small_tokenizer.token_text(i) for i in range(len(SPECIAL_TOKENS))] == SPECIAL_TOKENS
    assert small_tokenizer.empty_output_id == 14
    ids = small_tokenizer.encode("x = 1234")
    assert [small_tokenizer.decode([i]) for i in ids[-4:]] == ["1", "2", "3", "4"]
    text = "naïve café — 日本語 🙂\n\tdef f(): pass"
    assert small_tokenizer.decode(small_tokenizer.encode(text)) == text


def test_trained_tokenizer_rejects_tiny_vocab():
    with pytest.raises(MidfillError, match="too small"):
        train_tokenizer(["abc"], vocab_size=100)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(MidfillError, match="tokenizer.json is missing"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{}")
    with pytest.raises(MidfillError, match="not a valid tokenizer.json"):
        load_tokenizer(bad)


def test_tokenizer_without_fim_tokens_is_rejected(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel

    path = tmp_path / "tokenizer.json"
    HFTokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(path))
    with pytest.raises(MidfillError, match="no <\\|endoftext\\|> token"):
        load_tokenizer(path)
