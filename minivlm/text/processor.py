"""Conversations in, model tensors out: the one place where text and pixels are lined up.

:class:`Processor` renders a conversation with the chat template of :mod:`minivlm.text.chat`,
loads and preprocesses its images and video frames with :class:`minivlm.vision.ImageProcessor`,
and guarantees, for every sample it returns::

    count(input_ids == image_token_id) == pixel_values.shape[0] * image_seq_len

with the views of ``pixel_values`` in the order of their placeholders. ``image_seq_len`` is
what the model turns one view into: the encoder + projector output length for token splicing
(LLaVA, SmolVLM), or 1 for cross-attention fusion (Flamingo), where a single marker stands for
the image.

With ``temporal_patch_size = t > 1`` (Qwen2-VL's temporal patches), a view holds ``t``
consecutive video frames stacked on the channel axis (``[3t, H, W]``), the last group padded
with copies of the clip's last frame, and an image is the same still repeated ``t`` times; a
clip then costs ``ceil(frames / t)`` views, each placed after its first frame's timestamp.

Truncation to ``max_length`` never cuts through an image: the sample is cut before the image,
whose views are dropped too. A training sample left without any supervised token is not
returned but raises :class:`SampleSkipped`, so dataset code can count and skip it; returning it
would train on nothing, or, in LLaVA's "tokenization mismatch" case, on misaligned labels.
With ``strict=True`` nothing is truncated: an over-long sample raises
:class:`SequenceTooLongError`, as does an over-long generation prompt in any mode (cutting its
end would remove the ``<|im_start|>assistant`` cue).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from minivlm.data.collate import PADDING_SIDES, pad_collate
from minivlm.text.chat import (
    IGNORE_INDEX,
    ImagePart,
    MediaSegment,
    Message,
    Segment,
    chat_segments,
    encode_segments,
    image_segments,
    normalize_messages,
    segments_to_text,
    validate_conversation,
    video_frame_segments,
)
from minivlm.text.tokenizer import Tokenizer
from minivlm.vision import ImageProcessor, load_video

logger = logging.getLogger(__name__)

PROCESSOR_CONFIG_FILENAME = "processor_config.json"


class SampleSkipped(ValueError):
    """A training sample that must not be used; ``reason`` says why (for counting and logging)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SequenceTooLongError(ValueError):
    """A sample longer than ``max_length`` that may not be truncated: in strict mode, or a
    generation prompt (cutting its end would cut the ``<|im_start|>assistant`` cue)."""


@dataclass
class ProcessorConfig:
    """The text-side settings of a :class:`Processor` (saved in ``processor_config.json``).

    Attributes:
        image_seq_len: placeholder tokens per image view (encoder + projector output length).
        max_length: longest sample in tokens; None for no limit.
        video_max_frames: frames sampled per video.
        strict: raise :class:`SequenceTooLongError` instead of truncating an over-long sample.
        temporal_patch_size: video frames per view (the encoder's ``temporal_patch_size``).
    """

    image_seq_len: int
    max_length: int | None = None
    video_max_frames: int = 8
    strict: bool = False
    temporal_patch_size: int = 1

    def __post_init__(self) -> None:
        for name in ("image_seq_len", "video_max_frames", "temporal_patch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ProcessorConfig.{name} must be a positive int; got {value!r}")
        if self.max_length is not None and (
            isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 1
        ):
            raise ValueError(f"ProcessorConfig.max_length must be a positive int or None; got {self.max_length!r}")
        if not isinstance(self.strict, bool):
            raise ValueError(f"ProcessorConfig.strict must be a bool; got {self.strict!r}")


@dataclass
class RenderedSample:
    """One conversation as model inputs.

    Attributes:
        input_ids: token ids, ``T`` of them.
        labels: ``T`` labels aligned with ``input_ids`` (-100 where unsupervised; the loss shifts).
        pixel_values: ``[n_views, 3 * temporal_patch_size, H, W]`` float32, every image view and
            video frame (group) in placeholder order; ``n_views == 0`` for text-only samples.
        n_supervised: number of labels that are not -100.
        truncated: True when the sample was cut to ``max_length``.
        loss_weights: per-token loss weights set by the training collator
            (:mod:`minivlm.train.loss_weighting`); None: every token weighs 1.
    """

    input_ids: list[int]
    labels: list[int]
    pixel_values: Tensor
    n_supervised: int
    truncated: bool = False
    loss_weights: list[float] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


class MediaCache:
    """Preprocessed images by object identity, for renders that share image objects.

    Keyed by ``id(image)`` while holding a reference to the image, so an id cannot be recycled
    by another object during the cache's life. Entries are only valid for one processor.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[Any, Any]] = {}

    def get(self, image: Any) -> Any:
        entry = self._entries.get(id(image))
        return entry[1] if entry is not None and entry[0] is image else None

    def put(self, image: Any, value: Any) -> None:
        self._entries[id(image)] = (image, value)


@dataclass
class _Block:
    """A run of the rendered sample; ``atomic`` blocks (an image, a video frame) are never split."""

    input_ids: list[int]
    labels: list[int]
    views: Tensor | None
    atomic: bool


class Processor:
    """Tokenizer + image processor + chat template.

    Args:
        tokenizer: must hold the tile markers for ``image_processor.config.max_tiles`` when the
            image processor splits images (``Tokenizer.train(..., max_tiles=...)``).
        image_processor: turns each image into views; video frames are never split.
        image_seq_len: placeholder tokens per view.
        max_length: truncate samples to this many tokens (see the module docstring).
        video_max_frames: frames sampled per video.
        strict: raise :class:`SequenceTooLongError` instead of truncating.
        temporal_patch_size: video frames per view (see the module docstring); must match the
            encoder's ``temporal_patch_size``.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_processor: ImageProcessor,
        image_seq_len: int,
        *,
        max_length: int | None = None,
        video_max_frames: int = 8,
        strict: bool = False,
        temporal_patch_size: int = 1,
    ) -> None:
        self.config = ProcessorConfig(image_seq_len, max_length, video_max_frames, strict, temporal_patch_size)
        vision = image_processor.config
        if vision.split_image and tokenizer.max_tiles < vision.max_tiles:
            raise ValueError(
                f"the image processor splits images into up to max_tiles={vision.max_tiles} tiles but the "
                f"tokenizer has tile markers for max_tiles={tokenizer.max_tiles}; build it with "
                f"Tokenizer.train(..., max_tiles={vision.max_tiles}) or "
                f"Tokenizer.from_file(..., max_tiles={vision.max_tiles})"
            )
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self._frame_processor = ImageProcessor(dataclasses.replace(vision, split_image=False))

    @property
    def image_seq_len(self) -> int:
        return self.config.image_seq_len

    @property
    def max_length(self) -> int | None:
        return self.config.max_length

    @property
    def pixel_channels(self) -> int:
        """Channels of one view: 3 per frame times ``temporal_patch_size``."""
        return 3 * self.config.temporal_patch_size

    def as_stills(self, views: Tensor) -> Tensor:
        """Image views ``[n, 3, H, W]`` as still clips ``[n, 3t, H, W]`` (each repeated ``t`` times)."""
        t = self.config.temporal_patch_size
        return views if t == 1 else views.repeat(1, t, 1, 1)  # no copy per image in the common case

    def frame_groups(self, frames: Sequence[Tensor]) -> list[tuple[int, Tensor]]:
        """Video frame views (each ``[1, 3, H, W]``) as ``(first frame index, [1, 3t, H, W])``
        groups of ``t`` consecutive frames; the last group is padded with copies of the last
        frame (as Qwen2-VL pads a clip to a multiple of its temporal patch)."""
        t = self.config.temporal_patch_size
        groups = []
        for start in range(0, len(frames), t):
            group = list(frames[start : start + t])
            group += [group[-1]] * (t - len(group))
            groups.append((start, group[0] if t == 1 else torch.cat(group, dim=1)))
        return groups

    # ---- rendering ------------------------------------------------------------------------
    def render(
        self,
        messages: Sequence[Mapping[str, Any] | Message],
        *,
        add_generation_prompt: bool = False,
        for_training: bool | None = None,
        media_cache: MediaCache | None = None,
    ) -> RenderedSample:
        """Render one conversation (HF chat format or :class:`~minivlm.text.chat.Message` list).

        ``for_training`` defaults to ``not add_generation_prompt``; a training sample needs an
        assistant turn and may be truncated, a generation prompt may not. ``media_cache``: share
        one across the renders of conversations that show the same image objects (a grouped
        dataset item: ten questions about one image), so each image is preprocessed once.

        Raises:
            ChatFormatError: malformed conversation (see :mod:`minivlm.text.chat`).
            SampleSkipped: truncation removed every supervised token.
            SequenceTooLongError: over ``max_length`` in strict mode, or a generation prompt.
            ImageLoadError / VideoLoadError: unreadable media.
        """
        if for_training is None:
            for_training = not add_generation_prompt
        blocks = self._blocks(messages, add_generation_prompt=add_generation_prompt, for_training=for_training,
                              media_cache=media_cache)
        length = sum(len(b.input_ids) for b in blocks)
        limit = self.config.max_length
        truncated = limit is not None and length > limit
        if truncated:
            if self.config.strict or not for_training:
                what = "generation prompt" if add_generation_prompt else "sample"
                why = "strict mode does not truncate" if self.config.strict else "only training samples are truncated"
                raise SequenceTooLongError(f"{what} of {length} tokens exceeds max_length={limit} ({why})")
            blocks = self._truncate(blocks, limit)
        input_ids = [i for b in blocks for i in b.input_ids]
        labels = [label for b in blocks for label in b.labels]
        n_supervised = sum(label != IGNORE_INDEX for label in labels)
        if for_training and n_supervised == 0:
            raise SampleSkipped(
                f"no supervised token left after truncating {length} tokens to max_length={limit}"
            )
        views = [b.views for b in blocks if b.views is not None]
        size = self.image_processor.config.image_size
        pixel_values = torch.cat(views) if views else torch.empty(0, self.pixel_channels, size, size)
        return RenderedSample(input_ids, labels, pixel_values, n_supervised, truncated)

    def render_text(
        self, messages: Sequence[Mapping[str, Any] | Message], *, add_generation_prompt: bool = False
    ) -> str:
        """The rendered template string (images expanded to their tokens), untruncated.

        ``tokenizer.decode(render(...).input_ids)`` equals it for untruncated samples.
        """
        expanded = self._expanded_segments(messages, add_generation_prompt=add_generation_prompt, for_training=False)
        return segments_to_text([segment for segments, _ in expanded for segment in segments])

    def __call__(
        self,
        conversations: Sequence[Sequence[Mapping[str, Any] | Message]],
        *,
        add_generation_prompt: bool = False,
        padding_side: str = "right",
        return_tensors: bool = True,
    ) -> dict[str, Any]:
        """Render a batch of conversations.

        Returns :func:`minivlm.data.collate.pad_collate`'s dict (``input_ids``, ``labels``,
        ``attention_mask``, ``position_ids`` ``[B, T]``, ``pixel_values`` ``[N, C, H, W]`` or
        None), or with ``return_tensors=False`` unpadded lists: ``input_ids`` and ``labels``
        (lists of id lists) and ``pixel_values`` (one ``[n_views, C, H, W]`` tensor per sample).
        Use ``padding_side="left"`` with ``add_generation_prompt=True`` for batched generation.
        """
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {PADDING_SIDES}; got {padding_side!r}")
        if not isinstance(conversations, Sequence) or not conversations:
            raise ValueError("Processor(...) expects a non-empty list of conversations")
        if isinstance(conversations[0], (Mapping, Message)):
            raise ValueError(
                "Processor(...) expects a batch: a list of conversations, each a list of messages; "
                "got a single conversation (wrap it in a list, or use Processor.render)"
            )
        samples = [self.render(c, add_generation_prompt=add_generation_prompt) for c in conversations]
        if not return_tensors:
            return {
                "input_ids": [s.input_ids for s in samples],
                "labels": [s.labels for s in samples],
                "pixel_values": [s.pixel_values for s in samples],
            }
        return pad_collate(samples, self.tokenizer.pad_id, padding_side)

    def _expanded_segments(
        self, messages: Sequence[Mapping[str, Any] | Message], *, add_generation_prompt: bool, for_training: bool,
        media_cache: MediaCache | None = None,
    ) -> list[tuple[list[Segment], Tensor | None]]:
        """Template segments with media expanded: ``(segments, views)`` pairs; views is None
        for text and special segments, and the media's ``[n, 3, H, W]`` views otherwise."""
        normalized = normalize_messages(messages)
        validate_conversation(normalized, for_training=for_training, require_user=True)
        expanded: list[tuple[list[Segment], Tensor | None]] = []
        for segment in chat_segments(normalized, add_generation_prompt=add_generation_prompt):
            if not isinstance(segment, MediaSegment):
                expanded.append(([segment], None))
            elif isinstance(segment.part, ImagePart):
                image = segment.part.image
                cached = media_cache.get(image) if media_cache is not None else None
                if cached is None:
                    cached = self._image_views(image)
                    if media_cache is not None:
                        media_cache.put(image, cached)
                expanded.append(cached)
            else:
                vision = self.image_processor.config
                clip = load_video(
                    segment.part.video,
                    max_frames=self.config.video_max_frames,
                    fps=segment.part.fps,
                    max_pixels=vision.max_pixels,
                )
                frames = [self._frame_processor(frame).pixel_values for frame in clip.frames]
                for first, views in self.frame_groups(frames):
                    expanded.append((video_frame_segments(clip.timestamps[first], self.image_seq_len), views))
        return expanded

    def _image_views(self, image: Any) -> tuple[list[Segment], Tensor]:
        """One image's placeholder layout and its ``[n_views, C, H, W]`` views."""
        processed = self.image_processor(image)
        expected_views = processed.rows * processed.cols + 1 if processed.rows else 1
        if processed.n_views != expected_views:
            raise ValueError(
                f"image processor returned {processed.n_views} views for a {processed.rows}x{processed.cols} "
                f"grid; expected {expected_views} (tiles then the global view)"
            )
        layout = image_segments(self.image_seq_len, processed.rows, processed.cols)
        return layout, self.as_stills(processed.pixel_values)

    def _blocks(
        self, messages: Sequence[Mapping[str, Any] | Message], *, add_generation_prompt: bool, for_training: bool,
        media_cache: MediaCache | None = None,
    ) -> list[_Block]:
        blocks = []
        for segments, views in self._expanded_segments(
            messages, add_generation_prompt=add_generation_prompt, for_training=for_training, media_cache=media_cache
        ):
            input_ids, labels = encode_segments(segments, self.tokenizer)
            blocks.append(_Block(input_ids, labels, views, atomic=views is not None))
        return blocks

    @staticmethod
    def _truncate(blocks: list[_Block], limit: int) -> list[_Block]:
        """Keep the first ``limit`` tokens, cutting text anywhere but stopping before an image."""
        kept: list[_Block] = []
        room = limit
        for block in blocks:
            n = len(block.input_ids)
            if n <= room:
                kept.append(block)
                room -= n
                continue
            if not block.atomic and room > 0:
                kept.append(_Block(block.input_ids[:room], block.labels[:room], None, atomic=False))
            break
        return kept

    # ---- persistence ----------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer.model`` and ``processor_config.json`` (this config plus the image
        processor's under ``"image_processor"``) into ``directory``."""
        from minivlm.io_atomic import atomic_write_json

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        config = dataclasses.asdict(self.config) | {"image_processor": self.image_processor.to_dict()}
        atomic_write_json(directory / PROCESSOR_CONFIG_FILENAME, config)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "Processor":
        """Load what :meth:`save_pretrained` wrote; unknown config keys are an error.

        Raises:
            FileNotFoundError: no ``processor_config.json``.
            ValueError: it is not JSON, or a value is missing or of the wrong type (the message
                names the file).
        """
        directory = Path(directory)
        path = directory / PROCESSOR_CONFIG_FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"no {PROCESSOR_CONFIG_FILENAME} in {directory}")
        try:
            config = json.loads(path.read_bytes().decode())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(config, dict) or not isinstance(config.get("image_processor"), dict):
            raise ValueError(f"{path} has no 'image_processor' section")
        known = {f.name for f in dataclasses.fields(ProcessorConfig)}
        unknown = sorted(set(config) - known - {"image_processor"})
        if unknown:
            raise ValueError(f"{path} has unknown keys {unknown}; expected a subset of {sorted(known)}")
        try:
            image_processor = ImageProcessor.from_dict(config.pop("image_processor"))
            settings = ProcessorConfig(**config)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None
        return cls(
            Tokenizer.from_pretrained(directory),
            image_processor,
            settings.image_seq_len,
            max_length=settings.max_length,
            video_max_frames=settings.video_max_frames,
            strict=settings.strict,
            temporal_patch_size=settings.temporal_patch_size,
        )

    def __repr__(self) -> str:
        return f"Processor({self.config}, tokenizer={self.tokenizer!r}, image_processor={self.image_processor!r})"
