"""Batching rendered samples: padding, and packing several samples per row.

A *sample* is anything with ``input_ids`` (list of ints), ``labels`` (same length, -100 where
unsupervised) and ``pixel_values`` (``[n_views, C, H, W]`` or None): a
:class:`minivlm.text.processor.RenderedSample` or a dict with those keys.

Both collators share two conventions:

* **Labels are aligned with ``input_ids`` and shifted inside the loss** (Hugging Face
  convention): ``loss = cross_entropy(logits[:, :-1], labels[:, 1:])``, i.e. the logits at
  position ``t`` are scored against ``labels[t + 1]``. The first token of a sequence therefore
  has no prediction of its own, and its label is set to -100. In an unpadded sample this changes
  nothing (the shift drops ``labels[0]``), but after left padding or packing the position before
  it belongs to padding or to *another document*, and a label there would train the model to
  predict one document from the end of the previous one.
* **``pixel_values`` follow the placeholders.** The fusion layer splices image features into
  ``<image>`` positions in row-major order over the batch (row 0 left to right, then row 1, ...),
  so views are concatenated in exactly that order.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of positions without loss; equals ``minivlm.text.chat.IGNORE_INDEX`` (PyTorch's
``cross_entropy`` default), kept beside the collators that write it."""

PADDING_SIDES = ("right", "left")


@dataclass(frozen=True)
class _Sample:
    input_ids: list[int]
    labels: list[int]
    pixel_values: Tensor | None
    position_ids: list[int] | None = None  # set by merge_shared_prefix; default 0..n-1
    branch_ids: list[int] | None = None  # set by merge_shared_prefix; default all 0 (no branches)
    loss_weights: list[float] | None = None  # per-token loss weight; default 1 (minivlm.train.loss_weighting)

    def positions(self) -> Tensor:
        return torch.tensor(self.position_ids) if self.position_ids is not None else torch.arange(len(self))

    def __len__(self) -> int:
        return len(self.input_ids)


def _as_sample(sample: Any, index: int) -> _Sample:
    """Read a sample given as a mapping or an object with attributes, checking its fields."""
    get = sample.get if isinstance(sample, Mapping) else (lambda key, default=None: getattr(sample, key, default))
    input_ids, labels, pixel_values = get("input_ids"), get("labels"), get("pixel_values")
    if input_ids is None:
        raise ValueError(f"sample #{index} has no input_ids; expected a mapping or object with input_ids and labels")
    input_ids = input_ids.tolist() if isinstance(input_ids, Tensor) else list(input_ids)
    if not input_ids:
        raise ValueError(f"sample #{index} has no tokens")
    labels = [IGNORE_INDEX] * len(input_ids) if labels is None else (
        labels.tolist() if isinstance(labels, Tensor) else list(labels)
    )
    if len(labels) != len(input_ids):
        raise ValueError(f"sample #{index} has {len(input_ids)} input_ids but {len(labels)} labels")
    if pixel_values is not None and (not isinstance(pixel_values, Tensor) or pixel_values.dim() != 4):
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
        raise ValueError(f"sample #{index} pixel_values must be a [n_views, C, H, W] tensor or None; got {shape}")
    extra = {}
    for key in ("position_ids", "branch_ids", "loss_weights"):
        values = get(key)
        if values is not None:
            values = values.tolist() if isinstance(values, Tensor) else list(values)
            if len(values) != len(input_ids):
                raise ValueError(f"sample #{index} has {len(input_ids)} input_ids but {len(values)} {key}")
            extra[key] = values
    return _Sample(input_ids, labels, pixel_values, **extra)


#: Optional per-token fields: batch dtype and the value of samples without the field.
_OPTIONAL_FIELDS = {"branch_ids": (torch.long, 0), "loss_weights": (torch.float32, 1.0)}


def _optional_tensors(parsed: Sequence[_Sample], shape: tuple[int, int]) -> dict[str, Tensor]:
    """A zero ``[R, T]`` tensor per optional field that some sample has (filled by :func:`_fill_optional`)."""
    return {key: torch.zeros(shape, dtype=dtype) for key, (dtype, _) in _OPTIONAL_FIELDS.items()
            if any(getattr(s, key) is not None for s in parsed)}


def _fill_optional(tensors: dict[str, Tensor], row: int, columns: slice, sample: _Sample) -> None:
    for key, tensor in tensors.items():
        values = getattr(sample, key)
        tensor[row, columns] = torch.tensor(values) if values is not None else _OPTIONAL_FIELDS[key][1]


def merge_shared_prefix(samples: Sequence[Any], image_token_id: int) -> dict[str, Any]:
    """One sample holding several samples that start alike: the shared prefix once, then each
    sample's remainder as a *branch* that sees the prefix but not the other branches.

    Ten questions about one image cost one image encoding and one prompt prefix instead of ten,
    and since each branch's positions continue from the prefix and its attention is limited to
    prefix + itself (``branch_ids``, see :mod:`minivlm.kernels.mask`), the loss and gradients
    equal those of the samples one by one (tested). This is prefix sharing as in tree attention
    for speculative decoding or the shared-prompt packing of RL fine-tuning, applied to training
    data with several questions per image.

    The prefix is the longest common token prefix that carries no supervised label and is followed
    by an unsupervised token in every sample (a branch's first token has no prediction from inside
    its branch). Every image must lie in the prefix, and all samples must show the same pixels.

    Returns:
        a sample dict: ``input_ids``, ``labels``, ``position_ids``, ``branch_ids`` (0 on the
        prefix, ``k`` on the ``k``-th sample's remainder) and ``pixel_values`` (the prefix's).

    Raises:
        ValueError: no samples; samples whose images differ or are not all inside the shared prefix.

    Samples with ``loss_weights`` keep them on their branch tokens (the result then has
    ``loss_weights``, 0 on the prefix, which carries no label).
    """
    if not samples:
        raise ValueError("merge_shared_prefix needs at least one sample")
    parsed = [_as_sample(s, i) for i, s in enumerate(samples)]
    first = parsed[0]
    n = min(len(s) for s in parsed) - 1  # every branch keeps at least one token
    for s in parsed[1:]:
        n = min(n, next((j for j in range(n) if s.input_ids[j] != first.input_ids[j]), n))
    first_label = min(next((j for j, label in enumerate(s.labels) if label != IGNORE_INDEX), len(s)) for s in parsed)
    n = max(0, min(n, first_label - 1))  # prefix and each branch's first token: unsupervised
    for index, s in enumerate(parsed):
        if image_token_id in s.input_ids[n:]:
            raise ValueError(
                f"sample #{index} of the group has image placeholders after the shared prefix ({n} tokens); "
                f"merge_shared_prefix expects every image in the common prefix (e.g. one image, several questions)"
            )
        same = s.pixel_values is first.pixel_values or (s.pixel_values is None) == (first.pixel_values is None) and (
            s.pixel_values is None or (s.pixel_values.shape == first.pixel_values.shape
                                       and torch.equal(s.pixel_values, first.pixel_values)))
        if not same:
            raise ValueError(f"sample #{index} of the group shows different images than sample #0; "
                             f"merge_shared_prefix expects every sample of a group to show the same images")
    input_ids, labels = list(first.input_ids[:n]), [IGNORE_INDEX] * n
    position_ids, branch_ids = list(range(n)), [0] * n
    weighted = any(s.loss_weights is not None for s in parsed)
    loss_weights = [0.0] * n
    for branch, s in enumerate(parsed, start=1):
        rest = len(s) - n
        input_ids += s.input_ids[n:]
        # With no prefix a branch starts a sequence: its first label has nothing to predict it
        # from (pad_collate and pack_collate drop it too).
        labels += ([IGNORE_INDEX] + s.labels[1:]) if n == 0 else s.labels[n:]
        position_ids += range(n, n + rest)
        branch_ids += [branch] * rest
        loss_weights += s.loss_weights[n:] if s.loss_weights is not None else [1.0] * rest
    merged = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "branch_ids": branch_ids,
              "pixel_values": first.pixel_values}
    if weighted:
        merged["loss_weights"] = loss_weights
    return merged


def _concat_views(views: Sequence[Tensor | None]) -> Tensor | None:
    """Concatenate per-sample ``[n_i, C, H, W]`` views in the given order; None when there are none."""
    present = [v for v in views if v is not None and v.shape[0] > 0]
    if not present:
        return None
    shapes = {tuple(v.shape[1:]) for v in present}
    if len(shapes) > 1:
        raise ValueError(f"all images of a batch must have the same [C, H, W] shape; got {sorted(shapes)}")
    return torch.cat(present, dim=0)


def pad_collate(samples: Sequence[Any], pad_id: int, padding_side: str = "right") -> dict[str, Tensor | None]:
    """Pad samples to the longest one.

    Left padding is for batched generation: every prompt then ends at the last column, where
    the first new token is appended. Real tokens get positions ``0 .. n-1`` on either side, so a
    prompt is embedded identically whatever its padding.

    Returns:
        ``input_ids`` ``[B, T]`` long (``pad_id`` on padding), ``labels`` ``[B, T]`` long (-100
        on padding and on each first token), ``attention_mask`` ``[B, T]`` bool (True = real
        token), ``position_ids`` ``[B, T]`` long (0 on padding), ``pixel_values``
        ``[N, C, H, W]`` (all views in batch order) or None. Plus ``branch_ids`` ``[B, T]`` long
        and ``loss_weights`` ``[B, T]`` float when some sample has them.
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}; got {padding_side!r}")
    if not samples:
        raise ValueError("pad_collate needs at least one sample")
    parsed = [_as_sample(s, i) for i, s in enumerate(samples)]
    batch, width = len(parsed), max(len(s) for s in parsed)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.bool)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    optional = _optional_tensors(parsed, (batch, width))
    for row, sample in enumerate(parsed):
        n = len(sample)
        start = 0 if padding_side == "right" else width - n
        columns = slice(start, start + n)
        input_ids[row, columns] = torch.tensor(sample.input_ids, dtype=torch.long)
        labels[row, columns] = torch.tensor(sample.labels, dtype=torch.long)
        labels[row, start] = IGNORE_INDEX  # nothing before it in this sample predicts it
        attention_mask[row, columns] = True
        position_ids[row, columns] = sample.positions()
        _fill_optional(optional, row, columns, sample)
    batch_dict = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "pixel_values": _concat_views([s.pixel_values for s in parsed]),
    }
    return {**batch_dict, **optional}


def plan_packing(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Assign sample indices to rows of ``max_length`` tokens by first-fit decreasing.

    Samples are taken longest first (ties in input order) and each goes into the first row with
    room, opening a new row when none has. First-fit decreasing uses at most ``11/9 OPT + 6/9``
    rows (Dosa 2007), is deterministic, and needs no tuning; the long samples that are hardest to
    place go first, and short ones fill the gaps. Within a row, documents keep placement order.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1; got {max_length}")
    too_long = [(i, n) for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        raise ValueError(
            f"samples (index, length) {too_long[:5]} are longer than max_length={max_length}; "
            f"truncate them first (Processor(max_length=...))"
        )
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[index]
        for row, free in enumerate(room):
            if n <= free:
                rows[row].append(index)
                room[row] -= n
                break
        else:
            rows.append([index])
            room.append(max_length - n)
    return rows


def pack_collate(samples: Sequence[Any], max_length: int, pad_id: int) -> dict[str, Tensor | float | None]:
    """Pack samples into rows of exactly ``max_length`` tokens (:func:`plan_packing`).

    Attention must not cross documents: the model passes ``document_ids`` to
    :class:`minivlm.kernels.mask.AttentionMask`. Positions restart at 0 for each document,
    so a packed document is embedded exactly as it would be alone. The label of each
    document's first token is -100 (module docstring: its prediction would come from the
    previous document's last token); every other label is unchanged. The fixed row width keeps
    shapes static for ``torch.compile``.

    Returns:
        ``input_ids``, ``labels``, ``position_ids`` ``[R, max_length]`` long; ``attention_mask``
        ``[R, max_length]`` bool; ``document_ids`` ``[R, max_length]`` long (0, 1, 2... per row,
        -1 on padding); ``pixel_values`` ``[N, C, H, W]`` in packed placeholder order, or None;
        ``packing_efficiency``: fraction of the ``R * max_length`` slots holding real tokens.
        Plus ``branch_ids`` and ``loss_weights`` (float) ``[R, max_length]`` when some sample has them.
    """
    if not samples:
        raise ValueError("pack_collate needs at least one sample")
    parsed = [_as_sample(s, i) for i, s in enumerate(samples)]
    plan = plan_packing([len(s) for s in parsed], max_length)
    shape = (len(plan), max_length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    document_ids = torch.full(shape, -1, dtype=torch.long)
    optional = _optional_tensors(parsed, shape)
    views = []
    for row, members in enumerate(plan):
        start = 0
        for document, index in enumerate(members):
            sample = parsed[index]
            n = len(sample)
            columns = slice(start, start + n)
            input_ids[row, columns] = torch.tensor(sample.input_ids, dtype=torch.long)
            labels[row, columns] = torch.tensor(sample.labels, dtype=torch.long)
            labels[row, start] = IGNORE_INDEX
            position_ids[row, columns] = sample.positions()
            document_ids[row, columns] = document
            _fill_optional(optional, row, columns, sample)
            views.append(sample.pixel_values)
            start += n
    n_real = sum(len(s) for s in parsed)
    efficiency = n_real / (shape[0] * shape[1])
    logger.debug(
        "packed %d samples into %d rows of %d (efficiency %.3f)", len(parsed), shape[0], max_length, efficiency
    )
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": document_ids >= 0,
        "position_ids": position_ids,
        "document_ids": document_ids,
        "pixel_values": _concat_views(views),
        "packing_efficiency": efficiency,
    }
    return {**batch, **optional}


@dataclass(frozen=True)
class Packer:
    """``pack_collate`` with its settings bound: a picklable ``collate_fn`` for a DataLoader.

    Example::

        loader = DataLoader(dataset, batch_size=32, collate_fn=Packer(max_length=2048, pad_id=tok.pad_id))
    """

    max_length: int
    pad_id: int

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise ValueError(f"Packer.max_length must be >= 1; got {self.max_length}")

    def __call__(self, samples: Sequence[Any]) -> dict[str, Tensor | float | None]:
        return pack_collate(samples, self.max_length, self.pad_id)
