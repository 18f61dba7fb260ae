"""Template segments and their encoding into ids and labels.

A chat template (:mod:`minivlm.text.templates`) renders a conversation as a list of segments:
:class:`TextSegment` (ordinary text, never special ids), :class:`SpecialSegment` (a special token
inserted by id) and :class:`MediaSegment` (where an image or video goes, expanded by the
processor). Each text and special segment carries its own ``supervised`` flag, so labels are
exact by construction rather than recovered by re-tokenising and searching for spans.

Two encodings, chosen by the tokenizer's ``joint_text_runs`` (see
:class:`~minivlm.text.tokenizer_base.TextTokenizer`):

* **segment by segment** (:func:`encode_segments`): minivlm's own templates put segment
  boundaries where tokens must break;
* **as one string** (:func:`encode_chunks` with a ``tokenizer.json`` tokenizer): the rendered
  prompt is encoded at once, special tokens split out, exactly as transformers' processors call
  ``tokenizer(prompt)``. A token is supervised when its characters overlap a supervised segment
  (a ``"▁answer"`` token carries the space of the unsupervised ``"ASSISTANT:"`` header before it).
  Should the text itself spell a special token (which transformers would turn into that id), the
  encoding falls back to encoding each text run literally, so text never injects special ids.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

IGNORE_INDEX = -100
"""Label of positions that carry no loss (PyTorch's ``cross_entropy`` default ``ignore_index``)."""


@dataclass(frozen=True)
class TextSegment:
    """Text encoded as ordinary tokens (never turned into special ids)."""

    text: str
    supervised: bool = False


@dataclass(frozen=True)
class SpecialSegment:
    """A special token, inserted by id, ``repeat`` times."""

    token: str
    supervised: bool = False
    repeat: int = 1


@dataclass(frozen=True)
class MediaSegment:
    """Where an image or video goes (``part``: an ``ImagePart`` / ``VideoPart``); the processor
    expands it with the template's image or video layout once the media is loaded."""

    part: Any


Segment = Union[TextSegment, SpecialSegment, MediaSegment]


def merge_text_segments(segments: Sequence[Segment]) -> list[Segment]:
    """Join consecutive :class:`TextSegment` with equal ``supervised`` flags; drop empty text."""
    merged: list[Segment] = []
    for segment in segments:
        if isinstance(segment, TextSegment) and not segment.text:
            continue
        previous = merged[-1] if merged else None
        if (
            isinstance(segment, TextSegment)
            and isinstance(previous, TextSegment)
            and previous.supervised == segment.supervised
        ):
            merged[-1] = TextSegment(previous.text + segment.text, segment.supervised)
        else:
            merged.append(segment)
    return merged


def segments_to_text(segments: Sequence[Segment]) -> str:
    """The rendered template string; ``tokenizer.decode`` of the segments' ids reproduces it."""
    out = []
    for segment in segments:
        if isinstance(segment, TextSegment):
            out.append(segment.text)
        elif isinstance(segment, SpecialSegment):
            out.append(segment.token * segment.repeat)
        else:
            raise ValueError("segments_to_text needs media expanded first; got a MediaSegment")
    return "".join(out)


def encode_segments(segments: Sequence[Segment], tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids and labels of text and special segments, each segment encoded on its own.

    Labels equal the ids on supervised segments and :data:`IGNORE_INDEX` elsewhere (aligned with
    the ids; the shift by one happens in the loss).
    """
    input_ids: list[int] = []
    labels: list[int] = []
    for segment in segments:
        if isinstance(segment, TextSegment):
            ids = tokenizer.encode(segment.text)
        elif isinstance(segment, SpecialSegment):
            ids = [tokenizer.token_to_id(segment.token)] * segment.repeat
        else:
            raise ValueError("encode_segments needs media expanded first; got a MediaSegment")
        input_ids += ids
        labels += ids if segment.supervised else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def encode_chunks(chunks: Sequence[Sequence[Segment]], tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """``(ids, labels)`` of each chunk of a rendered sample (text, an image's layout, a frame...).

    With a ``joint_text_runs`` tokenizer the chunks are encoded together (text touching text
    across a chunk boundary is tokenised as one string) and every token is given to the chunk
    where it starts; otherwise each chunk is encoded segment by segment.
    """
    if not getattr(tokenizer, "joint_text_runs", False):
        return [encode_segments(chunk, tokenizer) for chunk in chunks]
    flat = [(c, s) for c, chunk in enumerate(chunks) for s in chunk]
    for _, segment in flat:
        if isinstance(segment, MediaSegment):
            raise ValueError("encode_chunks needs media expanded first; got a MediaSegment")
    text = "".join(s.text if isinstance(s, TextSegment) else s.token * s.repeat for _, s in flat)
    starts, position = [], 0
    for _, segment in flat:
        starts.append(position)
        position += len(segment.text) if isinstance(segment, TextSegment) else len(segment.token) * segment.repeat
    expected_special = [tokenizer.token_to_id(s.token) for _, s in flat if isinstance(s, SpecialSegment)
                        for _ in range(s.repeat)]
    ids, offsets = tokenizer.encode_with_offsets(text)
    added = tokenizer.added_ids
    # An added token matched in the text spans its own spelling (byte-fallback pieces such as
    # <0x0A> may be added tokens too, but span the byte they stand for).
    matched = [i in added and tokenizer.id_to_token(i) in text[b:e] for i, (b, e) in zip(ids, offsets)]
    if [i for i, m in zip(ids, matched) if m] != expected_special:
        return _encode_runs_literally(chunks, tokenizer)
    special_owner = [k for k, (_, s) in enumerate(flat) if isinstance(s, SpecialSegment) for _ in range(s.repeat)]
    supervised_spans = [(starts[k], starts[k] + len(s.text)) for k, (_, s) in enumerate(flat)
                        if isinstance(s, TextSegment) and s.supervised]
    out: list[tuple[list[int], list[int]]] = [([], []) for _ in chunks]
    n_special = 0
    for token_id, (begin, end), is_special in zip(ids, offsets, matched):
        if is_special:
            owner = special_owner[n_special]
            n_special += 1
            supervised = flat[owner][1].supervised
        else:
            owner = max(bisect.bisect_right(starts, begin) - 1, 0)
            while owner > 0 and not isinstance(flat[owner][1], TextSegment):
                owner -= 1  # whitespace a special token did not absorb belongs to the text before it
            supervised = any(begin < e and s < max(end, begin + 1) for s, e in supervised_spans)
        chunk_ids, chunk_labels = out[flat[owner][0]]
        chunk_ids.append(token_id)
        chunk_labels.append(token_id if supervised else IGNORE_INDEX)
    return out


def _encode_runs_literally(chunks: Sequence[Sequence[Segment]], tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """The fallback of :func:`encode_chunks`: each text segment encoded as plain text (special
    spellings stay characters), special segments by id."""
    out: list[tuple[list[int], list[int]]] = []
    at_start = True
    for chunk in chunks:
        ids: list[int] = []
        labels: list[int] = []
        for segment in chunk:
            if isinstance(segment, TextSegment):
                piece = tokenizer.encode(segment.text, at_start=at_start)
            else:
                piece = [tokenizer.token_to_id(segment.token)] * segment.repeat
            at_start = False
            ids += piece
            labels += piece if segment.supervised else [IGNORE_INDEX] * len(piece)
        out.append((ids, labels))
    return out
