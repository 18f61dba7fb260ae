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
from minivlm.text.chat import ImagePart, Message, normalize_messages, validate_conversation
from minivlm.text.segments import IGNORE_INDEX, MediaSegment, Segment, encode_chunks, segments_to_text
from minivlm.text.templates import ChatMLTemplate, ChatTemplate, template_from_dict
from minivlm.text.tokenizer_base import TextTokenizer, load_tokenizer
from minivlm.vision import ImageProcessor, load_video
from minivlm.vision.processors import image_processor_from_dict

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
        tokenizer: any :class:`~minivlm.text.tokenizer_base.TextTokenizer`; must hold the
            template's special tokens and, for minivlm's own image processor, the tile markers
            for its ``max_tiles`` (``Tokenizer.train(..., max_tiles=...)``).
        image_processor: turns each image into views (any kind of
            :mod:`minivlm.vision.processors`); video frames are never split.
        image_seq_len: placeholder tokens per view.
        max_length: truncate samples to this many tokens (see the module docstring).
        video_max_frames: frames sampled per video.
        strict: raise :class:`SequenceTooLongError` instead of truncating.
        temporal_patch_size: video frames per view (see the module docstring); must match the
            encoder's ``temporal_patch_size``.
        template: the chat template (default ChatML, :mod:`minivlm.text.templates`).
    """

    def __init__(
        self,
        tokenizer: TextTokenizer,
        image_processor: Any,
        image_seq_len: int,
        *,
        max_length: int | None = None,
        video_max_frames: int = 8,
        strict: bool = False,
        temporal_patch_size: int = 1,
        template: ChatTemplate | None = None,
    ) -> None:
        self.config = ProcessorConfig(image_seq_len, max_length, video_max_frames, strict, temporal_patch_size)
        self.template = template if template is not None else ChatMLTemplate()
        vision = image_processor.config
        if self.template.image_token != tokenizer.image_token:
            raise ValueError(f"the {self.template.kind!r} template writes images as {self.template.image_token!r} but "
                             f"the tokenizer's image token is {tokenizer.image_token!r}")
        missing = [t for t in self.template.required_tokens() if not tokenizer.has_token(t)]
        if missing:
            raise ValueError(f"the {self.template.kind!r} template needs the special tokens {missing}, which the "
                             f"tokenizer lacks")
        if (isinstance(image_processor, ImageProcessor) and vision.split_image
                and tokenizer.max_tiles < vision.max_tiles):
            raise ValueError(
                f"the image processor splits images into up to max_tiles={vision.max_tiles} tiles but the "
                f"tokenizer has tile markers for max_tiles={tokenizer.max_tiles}; build it with "
                f"Tokenizer.train(..., max_tiles={vision.max_tiles}) or "
                f"Tokenizer.from_file(..., max_tiles={vision.max_tiles})"
            )
        self.tokenizer = tokenizer
        self.image_processor = image_processor

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
        tokenizer = self.tokenizer
        around = ["".join(tokenizer.id_to_token(i) for i in ids) for ids in (tokenizer.prefix_ids, tokenizer.suffix_ids)]
        return around[0] + segments_to_text([segment for segments, _ in expanded for segment in segments]) + around[1]

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
        Conversations that show the same image object share its preprocessing (one
        :class:`MediaCache` per call).
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
        cache = MediaCache()  # the questions of a batch often show the same image objects
        samples = [self.render(c, add_generation_prompt=add_generation_prompt, media_cache=cache) for c in conversations]
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
        for text and special segments, and the media's ``[n, C, H, W]`` views otherwise."""
        normalized = normalize_messages(messages)
        validate_conversation(normalized, for_training=for_training, require_user=True)
        segments = self.template.segments(normalized, add_generation_prompt=add_generation_prompt)
        n_images = sum(isinstance(s, MediaSegment) and isinstance(s.part, ImagePart) for s in segments)
        expanded: list[tuple[list[Segment], Tensor | None]] = []
        image_index = 0
        for segment in segments:
            if not isinstance(segment, MediaSegment):
                expanded.append(([segment], None))
            elif isinstance(segment.part, ImagePart):
                image = segment.part.image
                processed = media_cache.get(image) if media_cache is not None else None
                if processed is None:
                    processed = self.image_processor(image)
                    if media_cache is not None:
                        media_cache.put(image, processed)
                layout, views = self.template.image_layout(processed, self.image_seq_len, image_index, n_images)
                expanded.append((layout, self.as_stills(views)))
                image_index += 1
            else:
                clip = load_video(
                    segment.part.video,
                    max_frames=self.config.video_max_frames,
                    fps=segment.part.fps,
                    max_pixels=getattr(self.image_processor.config, "max_pixels", None),
                )
                frames = [self.image_processor.frame(frame) for frame in clip.frames]
                groups = [(clip.timestamps[first], views) for first, views in self.frame_groups(frames)]
                # A frame list at a known rate lasts len / fps (transformers' VideoMetadata.duration);
                # otherwise only the last sampled frame's time is known (transformers' fallback too).
                source, fps = segment.part.video, segment.part.fps
                duration = len(source) / fps if isinstance(source, (list, tuple)) and fps else clip.timestamps[-1]
                expanded += self.template.video_layout(groups, duration, self.image_seq_len)
        return expanded

    def _blocks(
        self, messages: Sequence[Mapping[str, Any] | Message], *, add_generation_prompt: bool, for_training: bool,
        media_cache: MediaCache | None = None,
    ) -> list[_Block]:
        expanded = self._expanded_segments(messages, add_generation_prompt=add_generation_prompt,
                                           for_training=for_training, media_cache=media_cache)
        encoded = encode_chunks([segments for segments, _ in expanded], self.tokenizer)
        blocks = [_Block(ids, labels, views, atomic=views is not None)
                  for (ids, labels), (_, views) in zip(encoded, expanded)]
        prefix, suffix = self.tokenizer.prefix_ids, self.tokenizer.suffix_ids
        if prefix:  # what the tokenizer's post-processor puts around a sequence (a BOS)
            blocks.insert(0, _Block(prefix, [IGNORE_INDEX] * len(prefix), None, atomic=False))
        if suffix:
            blocks.append(_Block(suffix, [IGNORE_INDEX] * len(suffix), None, atomic=False))
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
        """Write the tokenizer's files and ``processor_config.json`` (this config plus the image
        processor's under ``"image_processor"`` and the template's under ``"chat_template"``)."""
        from minivlm.io_atomic import atomic_write_json

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        config = dataclasses.asdict(self.config) | {"image_processor": self.image_processor.to_dict(),
                                                    "chat_template": self.template.to_dict()}
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
        unknown = sorted(set(config) - known - {"image_processor", "chat_template"})
        if unknown:
            raise ValueError(f"{path} has unknown keys {unknown}; expected a subset of {sorted(known)}")
        try:
            image_processor = image_processor_from_dict(config.pop("image_processor"))
            template = template_from_dict(config.pop("chat_template", None))
            settings = ProcessorConfig(**config)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None
        return cls(
            load_tokenizer(directory),
            image_processor,
            settings.image_seq_len,
            max_length=settings.max_length,
            video_max_frames=settings.video_max_frames,
            strict=settings.strict,
            temporal_patch_size=settings.temporal_patch_size,
            template=template,
        )

    def __repr__(self) -> str:
        return f"Processor({self.config}, tokenizer={self.tokenizer!r}, image_processor={self.image_processor!r})"
