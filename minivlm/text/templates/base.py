"""What a chat template is: conversation -> segments, and the prompt layout of images and videos.

A template is data: its kind (a registry key, one file per kind) and a few fields, saved in a
checkpoint's ``processor_config.json`` under ``"chat_template"``. Each kind also carries the
Jinja template transformers would use for the same format (:attr:`ChatTemplate.jinja`), which is
what an export writes and what the parity tests render with ``apply_chat_template``.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from torch import Tensor

from minivlm.registry_base import Registry
from minivlm.text.segments import Segment

TEMPLATES: Registry = Registry("chat template")


def view_order(processed: Any, global_first: bool) -> Tensor:
    """The views of a processed image with the global view first or last, as a layout wants it
    (:class:`~minivlm.vision.ProcessedImage` says where its own global view is)."""
    views = processed.pixel_values
    if processed.rows == 0 or processed.global_first == global_first:
        return views
    return views.roll(1 if global_first else -1, dims=0)


@dataclasses.dataclass
class ChatTemplate(ABC):
    """Base of the template kinds. Subclasses set ``kind``, ``jinja`` and implement the three
    layouts; their dataclass fields are the saved data."""

    kind: ClassVar[str] = ""
    jinja: ClassVar[str] = ""
    #: The placeholder one image position becomes (the tokenizer's ``image_token``).
    image_token: ClassVar[str] = "<image>"
    #: The special token that closes an assistant turn (generation stops there; None: the eos).
    end_of_turn: ClassVar[str | None] = None

    @abstractmethod
    def segments(self, messages: Sequence[Any], *, add_generation_prompt: bool = False) -> list[Segment]:
        """The conversation (normalised :class:`~minivlm.text.chat.Message` list) as segments,
        media left as :class:`~minivlm.text.segments.MediaSegment` numbered in order."""

    @abstractmethod
    def image_layout(self, processed: Any, image_seq_len: int, index: int, count: int) -> tuple[list[Segment], Tensor]:
        """Segments of image number ``index`` of ``count`` and its views in placeholder order."""

    @abstractmethod
    def video_layout(self, frames: Sequence[tuple[float, Tensor]], duration: float,
                     image_seq_len: int) -> list[tuple[list[Segment], Tensor | None]]:
        """``(segments, views)`` chunks of a video: ``frames`` are ``(timestamp, [1, C, H, W])``
        views in order; ``views`` is None for text-only chunks."""

    def required_tokens(self) -> list[str]:
        """Special tokens the tokenizer must hold for this template (tile markers aside)."""
        return [self.image_token] + ([self.end_of_turn] if self.end_of_turn else [])

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}


def template_from_dict(data: dict[str, Any] | None) -> ChatTemplate:
    """The template saved by :meth:`ChatTemplate.to_dict` (None or {}: ChatML, the default)."""
    import minivlm.text.templates  # noqa: F401  (registers the kinds)

    data = dict(data or {"kind": "chatml"})
    kind = data.pop("kind", "chatml")
    cls = TEMPLATES.get(kind)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"chat template {kind!r} has unknown field(s) {unknown}; expected some of {sorted(known)}")
    return cls(**data)
