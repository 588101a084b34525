"""A protobuf-free reader of SentencePiece ``.model`` files (the few ``ModelProto`` fields the conversion uses).

transformers' ``SentencePieceExtractor`` needs ``protobuf``, which this project does not depend on;
``tokenizer.py`` cross-checks this reader against ``sentencepiece`` itself.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import ConversionError

__all__ = ["SentencePieceModel", "read_sentencepiece_model"]

# SentencePiece ModelProto field numbers (sentencepiece_model.proto, proto2; absent = default).
_PIECE_NORMAL, _PIECE_UNKNOWN, _PIECE_CONTROL, _PIECE_USER_DEFINED, _PIECE_UNUSED, _PIECE_BYTE = 1, 2, 3, 4, 5, 6
_MODEL_TYPES = {1: "UNIGRAM", 2: "BPE", 3: "WORD", 4: "CHAR"}


@dataclass(frozen=True)
class SentencePiecePiece:
    piece: str
    score: float = 0.0
    type: int = _PIECE_NORMAL


@dataclass(frozen=True)
class SentencePieceTrainerSpec:
    model_type: int = 1
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    unk_piece: str = "<unk>"


@dataclass(frozen=True)
class SentencePieceNormalizerSpec:
    name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


@dataclass(frozen=True)
class SentencePieceModel:
    """The parts of a SentencePiece ``ModelProto`` the conversion uses (duck-types the protobuf object)."""

    pieces: tuple[SentencePiecePiece, ...]
    trainer_spec: SentencePieceTrainerSpec = field(default_factory=SentencePieceTrainerSpec)
    normalizer_spec: SentencePieceNormalizerSpec = field(default_factory=SentencePieceNormalizerSpec)

    def piece_to_id(self) -> dict[str, int]:
        return {p.piece: i for i, p in enumerate(self.pieces)}


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _read_field(buf: bytes, pos: int, end: int) -> tuple[int, int | bytes, int]:
    """Read one protobuf field at ``pos``: ``(number, value, next_pos)``; varints as int, the rest as bytes."""
    key, pos = _varint(buf, pos)
    number, wire_type = key >> 3, key & 7
    if number == 0:
        raise ValueError("field number 0")
    if wire_type == 0:
        value, pos = _varint(buf, pos)
        return number, value, pos
    if wire_type == 2:
        size, pos = _varint(buf, pos)
    elif wire_type in (1, 5):
        size = 8 if wire_type == 1 else 4
    else:
        raise ValueError(f"unsupported wire type {wire_type}")
    if pos + size > end:
        raise ValueError("truncated field")
    return number, buf[pos : pos + size], pos + size


def _proto_fields(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int | bytes]]:
    """Yield ``(field_number, value)`` for the message stored in ``buf[start:end]``."""
    pos = start
    while pos < end:
        number, value, pos = _read_field(buf, pos, end)
        yield number, value


def _parse_piece(buf: bytes, pos: int, end: int) -> SentencePiecePiece:
    """One ``SentencePiece`` message (piece=1 string, score=2 float, type=3 enum); fast path, ~135k calls."""
    text: str | None = None
    score, kind = 0.0, _PIECE_NORMAL
    while pos < end:
        key = buf[pos]
        if key == 0x0A:  # field 1, length-delimited
            size = buf[pos + 1] if pos + 1 < end else 0x80
            if size < 0x80:  # one-byte length: nearly every piece
                pos += 2
            else:
                size, pos = _varint(buf, pos + 1)
            if pos + size > end:
                raise ValueError("truncated piece")
            text = buf[pos : pos + size].decode("utf-8")
            pos += size
        elif key == 0x15:  # field 2, fixed32
            if pos + 5 > end:
                raise ValueError("truncated score")
            score = struct.unpack_from("<f", buf, pos + 1)[0]
            pos += 5
        elif key == 0x18:  # field 3, varint
            kind, pos = _varint(buf, pos + 1)
        else:  # a field this reader does not use
            _, _, pos = _read_field(buf, pos, end)
    if text is None:
        raise ValueError("a piece has no text")
    return SentencePiecePiece(text, score, kind)


def _int32(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def read_sentencepiece_model(path: str | os.PathLike) -> SentencePieceModel:
    """Parse the fields of a SentencePiece ``.model`` file that the conversion needs (no protobuf needed).

    Raises :class:`ConversionError` if the file cannot be read as a SentencePiece model.
    """
    path = Path(path)
    data = _read_bytes(path)
    pieces: list[SentencePiecePiece] = []
    trainer: dict[str, Any] = {}
    normalizer: dict[str, Any] = {}
    seen: set[int] = set()
    trainer_fields = {
        3: "model_type",
        24: "treat_whitespace_as_suffix",
        35: "byte_fallback",
        40: "unk_id",
        41: "bos_id",
        42: "eos_id",
        43: "pad_id",
        45: "unk_piece",
    }
    normalizer_fields = {
        1: "name",
        2: "precompiled_charsmap",
        3: "add_dummy_prefix",
        4: "remove_extra_whitespaces",
        5: "escape_whitespaces",
    }
    try:
        pos, end = 0, len(data)
        while pos < end:
            key, pos = _varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type != 2:  # every ModelProto field is a message
                raise ValueError(f"field {number} has wire type {wire_type}, not a message")
            size, pos = _varint(data, pos)
            if pos + size > end:
                raise ValueError("truncated message")
            seen.add(number)
            if number == 1:
                pieces.append(_parse_piece(data, pos, pos + size))
            elif number in (2, 3):
                names, target = (trainer_fields, trainer) if number == 2 else (normalizer_fields, normalizer)
                for n, value in _proto_fields(data, pos, pos + size):
                    if n in names:
                        target[names[n]] = value
            pos += size
        for key in ("unk_id", "bos_id", "eos_id", "pad_id"):
            if key in trainer:
                trainer[key] = _int32(trainer[key])
        for flag in ("byte_fallback", "treat_whitespace_as_suffix"):
            if flag in trainer:
                trainer[flag] = bool(trainer[flag])
        for flag in ("add_dummy_prefix", "remove_extra_whitespaces", "escape_whitespaces"):
            if flag in normalizer:
                normalizer[flag] = bool(normalizer[flag])
        for spec, key in ((trainer, "unk_piece"), (normalizer, "name")):
            if key in spec:
                spec[key] = bytes(spec[key]).decode("utf-8")
        if "precompiled_charsmap" in normalizer:
            normalizer["precompiled_charsmap"] = bytes(normalizer["precompiled_charsmap"])
        missing = [
            name
            for number, name in ((1, "vocabulary"), (2, "trainer_spec"), (3, "normalizer_spec"))
            if number not in seen
        ]
        if missing:  # the specs are stored after the vocabulary: a truncated file lacks them
            raise ValueError(f"{' and '.join(missing)} missing")
        model = SentencePieceModel(
            tuple(pieces), SentencePieceTrainerSpec(**trainer), SentencePieceNormalizerSpec(**normalizer)
        )
    except (ValueError, TypeError, UnicodeDecodeError, struct.error) as err:
        raise ConversionError(
            f"{path} is not a readable SentencePiece model ({err}); expected IEIT's tokenizer.model "
            "(a truncated download or a Git LFS pointer file fails this way: re-download it)"
        ) from None
    return model


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ConversionError(f"cannot read {path}: {err.strerror or err}") from None
