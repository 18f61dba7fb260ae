"""Edits of a serialised sentencepiece model on the protobuf wire format.

Sentencepiece's Python package cannot edit a model without ``protobuf`` (not a minivlm
dependency), so the two edits :class:`~minivlm.text.tokenizer.Tokenizer` needs (append control
pieces, switch the normaliser to exact encoding) are done on the wire format directly.
Reference: sentencepiece ``src/sentencepiece_model.proto``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence

# Piece types of sentencepiece's ModelProto.SentencePiece.Type enum.
_PIECE_TYPE_CONTROL = 3

# ---- protobuf wire format (sentencepiece_model.proto) ------------------------------------------
# ModelProto: 1 = repeated SentencePiece pieces, 2 = TrainerSpec, 3 = NormalizerSpec,
# 4 = SelfTestData, 5 = denormalizer NormalizerSpec.
# SentencePiece: 1 = piece (string), 2 = score (float), 3 = type (enum).
# NormalizerSpec: 3 = add_dummy_prefix (bool), 4 = remove_extra_whitespaces (bool).
_MODEL_PIECES, _MODEL_NORMALIZER, _MODEL_SELF_TEST = 1, 3, 4
_NORMALIZER_ADD_DUMMY_PREFIX, _NORMALIZER_REMOVE_EXTRA_WHITESPACES = 3, 4
_WIRE_VARINT, _WIRE_FIXED64, _WIRE_LENGTH_DELIMITED, _WIRE_FIXED32 = 0, 1, 2, 5


def edit_model_proto(model_proto: bytes, control_pieces: Sequence[str]) -> bytes:
    """Append ``control_pieces`` and switch the normaliser to exact encoding.

    The pieces are appended after the existing ones, so base ids are unchanged. Self-test data
    (sample encodings sentencepiece re-checks at load time) is dropped because it was recorded
    with the dummy prefix on.
    """
    fields = []
    for number, wire_type, raw, payload in _iter_fields(model_proto):
        if number == _MODEL_SELF_TEST:
            continue
        if number == _MODEL_NORMALIZER and wire_type == _WIRE_LENGTH_DELIMITED:
            kept = b"".join(
                r
                for n, _, r, _ in _iter_fields(payload)
                if n not in (_NORMALIZER_ADD_DUMMY_PREFIX, _NORMALIZER_REMOVE_EXTRA_WHITESPACES)
            )
            exact = _tag(_NORMALIZER_ADD_DUMMY_PREFIX, _WIRE_VARINT) + _varint(0)
            exact += _tag(_NORMALIZER_REMOVE_EXTRA_WHITESPACES, _WIRE_VARINT) + _varint(0)
            raw = _length_delimited(_MODEL_NORMALIZER, kept + exact)
        fields.append((number, raw))
    # Repeated fields keep their order of appearance: new pieces go after the last base piece.
    pieces = [raw for number, raw in fields if number == _MODEL_PIECES]
    others = [raw for number, raw in fields if number != _MODEL_PIECES]
    for piece in control_pieces:
        message = _length_delimited(1, piece.encode("utf-8"))
        message += _tag(2, _WIRE_FIXED32) + struct.pack("<f", 0.0)
        message += _tag(3, _WIRE_VARINT) + _varint(_PIECE_TYPE_CONTROL)
        pieces.append(_length_delimited(_MODEL_PIECES, message))
    return b"".join(pieces + others)


def _iter_fields(data: bytes) -> Iterator[tuple[int, int, bytes, bytes]]:
    """Top-level fields of a protobuf message: (number, wire type, raw bytes, payload)."""
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == _WIRE_VARINT:
            _, pos = _read_varint(data, pos)
            payload = data[start:pos]
        elif wire_type == _WIRE_FIXED64:
            pos += 8
            payload = data[pos - 8 : pos]
        elif wire_type == _WIRE_FIXED32:
            pos += 4
            payload = data[pos - 4 : pos]
        elif wire_type == _WIRE_LENGTH_DELIMITED:
            length, pos = _read_varint(data, pos)
            payload = data[pos : pos + length]
            pos += length
        else:
            raise ValueError(f"not a sentencepiece model: unsupported protobuf wire type {wire_type} at byte {start}")
        if pos > len(data):
            raise ValueError("not a sentencepiece model: truncated protobuf message")
        yield number, wire_type, data[start:pos], payload


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data):
            raise ValueError("not a sentencepiece model: truncated protobuf varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _tag(number, _WIRE_LENGTH_DELIMITED) + _varint(len(payload)) + payload
