"""Image processor kinds by name (registry :data:`IMAGE_PROCESSORS`), restored from a
checkpoint's ``processor_config.json``.

``minivlm`` is :class:`~minivlm.vision.transforms.ImageProcessor` (its saved dict has no
``kind``, as before the other kinds existed); ``idefics3``, ``llava`` and ``nanovlm`` reproduce
the published models' own preprocessing exactly. Every kind turns an image into a
:class:`~minivlm.vision.transforms.ProcessedImage` (``__call__``) and a video frame into one view
(``frame``), and has ``config.image_size`` (the side of a view) and ``to_dict`` / ``from_dict``.
"""

from __future__ import annotations

from typing import Any

from minivlm.registry_base import Registry
from minivlm.vision.idefics3 import Idefics3ImageProcessor
from minivlm.vision.llava import LlavaImageProcessor
from minivlm.vision.nanovlm import NanoVLMImageProcessor
from minivlm.vision.transforms import ImageProcessor

IMAGE_PROCESSORS: Registry = Registry("image processor")
IMAGE_PROCESSORS.register("minivlm")(ImageProcessor)
IMAGE_PROCESSORS.register("idefics3")(Idefics3ImageProcessor)
IMAGE_PROCESSORS.register("llava")(LlavaImageProcessor)
IMAGE_PROCESSORS.register("nanovlm")(NanoVLMImageProcessor)


def image_processor_from_dict(data: dict[str, Any]) -> Any:
    """The image processor a ``to_dict()`` describes (no ``kind``: minivlm's own)."""
    data = dict(data)
    return IMAGE_PROCESSORS.get(data.pop("kind", "minivlm")).from_dict(data)
