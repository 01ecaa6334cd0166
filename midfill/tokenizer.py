"""The tokenizer: StarCoder-style byte-level BPE with Refact's special tokens at ids 0..18."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from midfill.errors import MidfillError
from midfill.files import write_text_atomic
from midfill.hub import resolve_model_dir

# Refact's (StarCoder's) special tokens, in id order: index == id.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<filename>",
    "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>",
    "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<empty_output>", "<commit_before>",
    "<commit_msg>", "<commit_after>", "<reponame>",
]  # fmt: skip


class Tokenizer:
    """An HF `tokenizers` tokenizer plus the special-token ids that prompts and stop rules need.

    The ids are looked up in the tokenizer itself, so a tokenizer that numbers them differently
    still builds correct prompts.
    """

    def __init__(self, tok: tokenizers.Tokenizer, source: str = "tokenizer") -> None:
        self.source = source
        self._special_aware = tok
        # A second copy treats "<fim_prefix>" in user text as plain text, so a file that happens to
        # contain a sentinel string cannot change the structure of the prompt.
        self._plain = tokenizers.Tokenizer.from_str(tok.to_str())
        self._plain.encode_special_tokens = True
        self.eot_id = self._require("<|endoftext|>")
        self.fim_prefix_id = self._require("<fim_prefix>")
        self.fim_middle_id = self._require("<fim_middle>")
        self.fim_suffix_id = self._require("<fim_suffix>")
        self.fim_pad_id = self._require("<fim_pad>")
        self.empty_output_id = self._require("<empty_output>")
        self.special_ids = frozenset(
            i for i in (self._special_aware.token_to_id(t) for t in SPECIAL_TOKENS) if i is not None
        )

    def _require(self, token: str) -> int:
        token_id = self._special_aware.token_to_id(token)
        if token_id is None:
            raise MidfillError(f"{self.source}: the tokenizer has no {token} token, which Refact prompts need")
        return token_id

    @functools.cached_property
    def max_token_chars(self) -> int:
        """No token covers more characters than this, so a text has at least len(text) / this many tokens."""
        return max(len(token) for token in self._special_aware.get_vocab(with_added_tokens=True))

    @functools.cached_property
    def _bytes_of_tokens(self) -> list[bytes]:
        byte_of = {char: byte for byte, char in enumerate(byte_level_alphabet())}
        table = [b""] * self.vocab_size
        for token, token_id in self._special_aware.get_vocab(with_added_tokens=True).items():
            level = token_id not in self.special_ids and all(char in byte_of for char in token)
            table[token_id] = bytes(byte_of[c] for c in token) if level else token.encode("utf-8")
        return table

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (a byte-level token may hold part of a UTF-8 character); none
        for an id past the tokenizer's, a padding row of a model's embedding (Refact pads to 49,216)."""
        table = self._bytes_of_tokens
        return table[token_id] if token_id < len(table) else b""

    @property
    def vocab_size(self) -> int:
        return self._special_aware.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Ids of plain text: special-token strings inside it are encoded as ordinary text."""
        return encode_text(self._plain, text, add_special_tokens=False)

    def encode_with_special(self, text: str) -> list[int]:
        """Ids of a raw prompt in which special-token strings ("<fim_prefix>", ...) become their ids."""
        return encode_text(self._special_aware, text, add_special_tokens=True)

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self._special_aware.decode(list(ids), skip_special_tokens=skip_special)

    def token_text(self, token_id: int) -> str | None:
        return self._special_aware.id_to_token(token_id)

    def to_json(self) -> str:
        return self._special_aware.to_str(pretty=True)

    def save(self, path: str | os.PathLike) -> None:
        write_text_atomic(path, self.to_json())


def byte_level_alphabet() -> list[str]:
    """The character byte-level BPE writes for each byte 0..255 (GPT-2's table): printable bytes
    stand for themselves, the others for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def encode_text(tok: tokenizers.Tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids of `text`; a MidfillError for text that is not valid Unicode (lone surrogates).

    `encode_batch` releases the GIL while the Rust side works (`encode` holds it), so a server
    tokenizing a huge prompt in a worker thread keeps answering other requests meanwhile.
    """
    try:
        return tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
    except TypeError:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise MidfillError(f"the text is not valid Unicode: {exc.reason} at character {exc.start}") from None
        raise


def load_tokenizer(path_or_id: str | os.PathLike) -> Tokenizer:
    """Load tokenizer.json from a file, a model folder, or a hub id (downloaded when there is network)."""
    path = Path(path_or_id).expanduser()
    if not path.is_file():
        path = resolve_model_dir(path_or_id) / "tokenizer.json"
        if not path.is_file():
            raise MidfillError(f"{path}: tokenizer.json is missing; pass --tokenizer with a tokenizer.json file or folder")
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises a plain Exception for any parse failure
        raise MidfillError(f"{path}: not a valid tokenizer.json ({str(exc).splitlines()[0]})") from None
    return Tokenizer(tok, source=str(path))


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE like StarCoder's: digits split one by one, specials at ids 0..18."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise MidfillError(f"vocab_size {vocab_size} is too small: it needs at least {len(SPECIAL_TOKENS) + 256}")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok, source="trained tokenizer")
