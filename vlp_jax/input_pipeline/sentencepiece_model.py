"""Reads a serialised SentencePiece model (a protocol buffer) without the sentencepiece
package: its pieces, and which are its EOS and pad control symbols. Field numbers are
those of SentencePiece's sentencepiece_model.proto."""

from __future__ import annotations

from collections.abc import Iterable


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    byte = data[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    shift += 7
    if byte < 0x80:
      return value, pos


def _proto_fields(data: bytes) -> Iterable[tuple[int, int | bytes]]:
  """(field number, value) of a serialised protocol buffer message, in order."""
  pos = 0
  while pos < len(data):
    key, pos = _read_varint(data, pos)
    field, wire_type = key >> 3, key & 7
    if wire_type == 0:
      value, pos = _read_varint(data, pos)
    elif wire_type == 2:
      size, pos = _read_varint(data, pos)
      value, pos = data[pos : pos + size], pos + size
    elif wire_type in (1, 5):
      size = 8 if wire_type == 1 else 4
      value, pos = data[pos : pos + size], pos + size
    else:
      raise ValueError(f"unsupported protocol buffer wire type {wire_type}")
    yield field, value


# Field numbers and enum values of sentencepiece_model.proto.
_MODEL_PIECES, _MODEL_TRAINER_SPEC = 1, 2
_PIECE_TEXT, _PIECE_TYPE = 1, 3
_PIECE_NORMAL, _PIECE_CONTROL = 1, 3
_SPEC_EOS_PIECE, _SPEC_PAD_PIECE = 47, 48
WORD_START = "▁"  # SentencePiece's meta symbol for the white space that starts a word.


def read_sentencepiece_model(model: bytes) -> tuple[list[str], int | None, int | None]:
  """The pieces of a serialised SentencePiece model and its EOS and pad ids (None if it
  has none). As in SentencePiece, a special id is the id of the trainer's EOS/pad piece
  name ("</s>", "<pad>" unless renamed) when that piece is a control symbol."""
  pieces, types = [], []
  names = {_SPEC_EOS_PIECE: "</s>", _SPEC_PAD_PIECE: "<pad>"}
  for field, value in _proto_fields(model):
    if field == _MODEL_PIECES:
      fields = dict(_proto_fields(value))
      pieces.append(fields.get(_PIECE_TEXT, b"").decode("utf-8"))
      types.append(fields.get(_PIECE_TYPE, _PIECE_NORMAL))
    elif field == _MODEL_TRAINER_SPEC:
      for spec_field, spec_value in _proto_fields(value):
        if spec_field in names:
          names[spec_field] = spec_value.decode("utf-8")
  if not pieces:
    raise ValueError("not a SentencePiece model: it has no pieces")
  ids = {piece: i for i, piece in enumerate(pieces)}

  def control_id(name: str) -> int | None:
    i = ids.get(name)
    return i if i is not None and types[i] == _PIECE_CONTROL else None

  return pieces, control_id(names[_SPEC_EOS_PIECE]), control_id(names[_SPEC_PAD_PIECE])
