"""Token text details the APIs report: a logprob's `bytes` are the token's own bytes (also for part of a
multi-byte character, docs/api.md), and the stop string that ended a sequence is named (Anthropic's
`stop_sequence`)."""

from __future__ import annotations

import pytest

from macprovider.engine.engine import token_bytes
from macprovider.engine.sequence import OutputText


@pytest.mark.parametrize(
    "piece, text, expected",
    [
        ("Hello", "Hello", b"Hello"),
        ("\u0120world", " world", b" world"),  # byte-level BPE, whole characters: the text's UTF-8
        ("\u00f0\u0141", "\ufffd", "🙂".encode()[:2]),  # byte-level BPE piece holding F0 9F
        ("<0xF0>", "\ufffd", b"\xf0"),  # SentencePiece byte fallback
        ("\u2581caf\u00e9", "café", "café".encode()),
        ("odd\u2603", "\ufffd", "\ufffd".encode()),  # unknown piece alphabet: the text's bytes
    ],
)
def test_token_bytes(piece, text, expected):
    assert token_bytes(piece, text) == expected


def test_token_bytes_of_the_demo_tokenizers_byte_tokens():
    """Every single-byte token of the demo models' byte-level BPE tokenizer reports exactly its byte."""
    from macprovider.models.demo import TinyModelSpec, train_tokenizer

    tokenizer = train_tokenizer(TinyModelSpec().vocab_size)
    for byte in (0xF0, 0x9F, 0xE2, 0x82):
        piece = _gpt2_char(byte)
        token = tokenizer.token_to_id(piece)
        assert token is not None
        assert tokenizer.decode([token]) == "\ufffd"
        assert token_bytes(piece, tokenizer.decode([token])) == bytes([byte])


def _gpt2_char(byte: int) -> str:
    from mlx_lm.tokenizer_utils import _byte_decoder

    return next(char for char, value in _byte_decoder().items() if value == byte)


class _Detokenizer:
    """mlx-lm's streaming detokenizer interface over a token → text table."""

    def __init__(self, table: dict[int, str]):
        self.table, self.last_segment = table, ""

    def add_token(self, token: int) -> None:
        self.last_segment = self.table[token]

    def finalize(self) -> None:
        self.last_segment = ""


@pytest.mark.parametrize(
    "tokens, stop, text, matched",
    [
        ([1, 2, 3], ("END", "STOP"), "ab", "STOP"),
        ([1, 4, 5], ("END", "STOP"), "a", "END"),
        ([1, 2], ("END",), "abST", None),  # no stop: everything released at length
    ],
)
def test_the_stop_string_that_ended_the_sequence_is_named(tokens, stop, text, matched):
    output = OutputText(_Detokenizer({1: "a", 2: "bST", 3: "OP and END", 4: "EN", 5: "D!"}), frozenset(), stop)
    emitted = ""
    for token in tokens:
        emitted += output.add(token)
        if output.stopped:
            break
    if not output.stopped:
        emitted += output.finish(release_held=True)
    assert emitted == text
    assert output.stop_sequence == matched
