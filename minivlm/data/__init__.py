"""Datasets as chat samples: easy-VQA, procedural tasks, user files, and weighted mixtures.

Every dataset is a map-style :class:`torch.utils.data.Dataset` whose items are sample dicts in
the Hugging Face chat format (see :mod:`minivlm.data.sample`). Build one by name with
:func:`build_dataset` (``"easy_vqa:0.5,shapes:0.3,charts:0.2"``) or directly:

* :class:`EasyVQA`: the real easy-VQA images and official split (:mod:`minivlm.data.easy_vqa`);
* procedural tasks rendered on the fly, deterministic per ``(seed, split, index)``
  (:mod:`minivlm.data.synthetic`): :class:`ShapesDataset`, :class:`ChartsDataset`,
  :class:`MultiImageDataset`, :class:`VideoDataset`, :class:`RetrievalDataset`;
* user data, indexed lazily (:mod:`minivlm.data.file_dataset`): :class:`ChatJsonlDataset`
  (:mod:`minivlm.data.jsonl`), :class:`LlavaJsonDataset` (:mod:`minivlm.data.llava`);
* :class:`Mixture`: a seeded weighted mixture of any of these (:mod:`minivlm.data.mixture`).
"""

from __future__ import annotations

from minivlm.data.charts import BarChart, ChartsDataset
from minivlm.data.drawing import COLOR_NAMES, COLORS, SHAPES, Shape, ShapeScene
from minivlm.data.easy_vqa import EasyVQA, EasyVQAQuestion
from minivlm.data.jsonl import ChatJsonlDataset
from minivlm.data.llava import LlavaJsonDataset
from minivlm.data.mixture import Mixture
from minivlm.data.multi_image import MultiImageDataset
from minivlm.data.registry import (
    DatasetRequest,
    available_datasets,
    build_dataset,
    parse_spec,
    register_dataset,
)
from minivlm.data.retrieval import GridScene, RetrievalDataset
from minivlm.data.sample import DataError, vqa_sample
from minivlm.data.shapes import ShapesDataset, describe_shapes
from minivlm.data.synthetic import SyntheticDataset
from minivlm.data.video import MovingShape, VideoDataset

__all__ = [
    "COLORS",
    "COLOR_NAMES",
    "SHAPES",
    "BarChart",
    "ChartsDataset",
    "ChatJsonlDataset",
    "DataError",
    "DatasetRequest",
    "EasyVQA",
    "EasyVQAQuestion",
    "GridScene",
    "LlavaJsonDataset",
    "Mixture",
    "MovingShape",
    "MultiImageDataset",
    "RetrievalDataset",
    "Shape",
    "ShapeScene",
    "ShapesDataset",
    "SyntheticDataset",
    "VideoDataset",
    "available_datasets",
    "build_dataset",
    "describe_shapes",
    "parse_spec",
    "register_dataset",
    "vqa_sample",
]
