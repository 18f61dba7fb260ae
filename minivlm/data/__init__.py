"""Datasets as chat samples: easy-VQA, procedural tasks, user files, and weighted mixtures.

Every dataset is a map-style :class:`torch.utils.data.Dataset` whose items are sample dicts in
the Hugging Face chat format (see :mod:`minivlm.data.sample`). Build one by name with
:func:`build_dataset` (``"easy_vqa:0.5,shapes:0.3,charts:0.2"``) or directly:

* :class:`EasyVQA`: the real easy-VQA images and official split (:mod:`minivlm.data.easy_vqa`);
* procedural tasks rendered on the fly, deterministic per ``(seed, split, index)``
  (:mod:`minivlm.data.synthetic`): :class:`ShapesDataset`, :class:`ChartsDataset`,
  :class:`MultiImageDataset`, :class:`VideoDataset`, :class:`RetrievalDataset`;
* user data, indexed lazily (:mod:`minivlm.data.file_dataset`): :class:`ChatJsonlDataset`
  (:mod:`minivlm.data.jsonl`), :class:`LlavaJsonDataset` (:mod:`minivlm.data.llava`),
  :class:`CocoCaptionsDataset` (:mod:`minivlm.data.coco`);
* pretraining-scale shards with exact positions (:mod:`minivlm.data.shards`):
  :class:`WebDatasetSource`, :class:`ParquetSource` and Hugging Face datasets
  (:mod:`minivlm.data.parquet_source`);
* :class:`Mixture`: a seeded weighted mixture of any of these (:mod:`minivlm.data.mixture`).
"""

from __future__ import annotations

from minivlm.data.charts import BarChart, ChartsDataset
from minivlm.data.coco import CocoCaptionsDataset
from minivlm.data.drawing import COLOR_NAMES, COLORS, SHAPES, Shape, ShapeScene
from minivlm.data.easy_vqa import EasyVQA, EasyVQAQuestion
from minivlm.data.jsonl import ChatJsonlDataset
from minivlm.data.llava import LlavaJsonDataset
from minivlm.data.mixture import Mixture
from minivlm.data.parquet_source import ParquetSource
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
from minivlm.data.shards import ShardedSource
from minivlm.data.synthetic import SyntheticDataset
from minivlm.data.video import MovingShape, VideoDataset
from minivlm.data.webdataset_source import WebDatasetSource

__all__ = [
    "COLORS",
    "COLOR_NAMES",
    "SHAPES",
    "BarChart",
    "ChartsDataset",
    "ChatJsonlDataset",
    "CocoCaptionsDataset",
    "DataError",
    "DatasetRequest",
    "EasyVQA",
    "EasyVQAQuestion",
    "GridScene",
    "LlavaJsonDataset",
    "Mixture",
    "MovingShape",
    "MultiImageDataset",
    "ParquetSource",
    "RetrievalDataset",
    "Shape",
    "ShapeScene",
    "ShapesDataset",
    "ShardedSource",
    "SyntheticDataset",
    "VideoDataset",
    "WebDatasetSource",
    "available_datasets",
    "build_dataset",
    "describe_shapes",
    "parse_spec",
    "register_dataset",
    "vqa_sample",
]
