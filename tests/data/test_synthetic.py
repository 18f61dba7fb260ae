"""What every procedural task promises: determinism, disjoint splits, balanced answers, workers."""

from __future__ import annotations

import hashlib
import os
import textwrap
from collections import Counter
from functools import partial
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from scipy.stats import chisquare
from torch.utils.data import DataLoader

from minivlm.data.charts import CATEGORIES, ChartsDataset
from minivlm.data.drawing import COLOR_NAMES, SHAPES, load_font
from minivlm.data.multi_image import MultiImageDataset
from minivlm.data.retrieval import RetrievalDataset
from minivlm.data.shapes import ShapesDataset
from minivlm.data.synthetic import SyntheticDataset, stable_seed
from minivlm.data.video import DIRECTIONS, VideoDataset

TASKS = [ShapesDataset, ChartsDataset, MultiImageDataset, VideoDataset, RetrievalDataset]


def visuals(sample) -> list[Image.Image]:
    images = []
    for item in sample["messages"][0]["content"]:
        if item["type"] == "image":
            images.append(item["image"])
        elif item["type"] == "video":
            images.extend(item["video"])
    return images


def fingerprint(sample) -> str:
    digest = hashlib.sha256()
    for image in visuals(sample):
        digest.update(image.tobytes())
    return digest.hexdigest()


def make(cls, **kwargs) -> SyntheticDataset:
    # Two-frame clips render three times faster and are as good for split/seed properties.
    return cls(n_frames=2, **kwargs) if cls is VideoDataset else cls(**kwargs)


@pytest.mark.parametrize("cls", TASKS)
def test_same_seed_gives_identical_samples_in_any_access_order(cls):
    first, second = make(cls, seed=5), make(cls, seed=5)
    forward = [first[i] for i in (0, 1, 2, 999_999)]
    backward = [second[i] for i in (999_999, 2, 1, 0)][::-1]
    for a, b in zip(forward, backward):
        assert fingerprint(a) == fingerprint(b)
        assert a["messages"][0]["content"][-1] == b["messages"][0]["content"][-1]
        assert a["answer"] == b["answer"] and a["id"] == b["id"] and a["scene"] == b["scene"]
    other_seed = make(cls, seed=6)
    assert all(fingerprint(other_seed[i]) != fingerprint(forward[i]) for i in range(3))


@pytest.mark.parametrize("cls", TASKS)
def test_test_split_is_fixed_and_disjoint_from_train(cls):
    test, train = make(cls, split="test", seed=0), make(cls, split="train", seed=0)
    assert len(test) == 500 and len(train) == 1_000_000
    test_prints = {fingerprint(test[i]) for i in range(500)}
    train_prints = {fingerprint(train[i]) for i in range(1000)}
    assert len(test_prints) == 500
    assert not test_prints & train_prints


def test_length_indexing_and_arguments():
    dataset = ShapesDataset(split="test", length=10)
    assert len(dataset) == 10 and dataset[-1]["id"] == dataset[9]["id"] == "shapes/test/9"
    with pytest.raises(IndexError):
        dataset[10]
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(split="validation")
    with pytest.raises(ValueError, match="image_size"):
        ShapesDataset(image_size=32)
    with pytest.raises(ValueError, match="length"):
        ShapesDataset(length=0)


def test_stable_seed_separates_tasks_splits_and_indices():
    seeds = {
        stable_seed(task, 0, split, i)
        for task in ("shapes", "charts")
        for split in ("train", "test")
        for i in range(100)
    }
    assert len(seeds) == 400
    assert stable_seed("shapes", 0, "train", 1) == stable_seed("shapes", 0, "train", 1)


def uniformity_p_value(answers: list[str], classes) -> float:
    counts = Counter(answers)
    assert set(counts) <= set(classes), set(counts) - set(classes)
    return chisquare([counts[c] for c in classes]).pvalue


def value_bin(answer: str, low: int, high: int, n_bins: int = 5) -> str:
    """Numeric answers have up to 90 values: test their uniformity over 5 equal bins."""
    return str((int(answer) - low) * n_bins // (high - low + 1))


BINS = [str(b) for b in range(5)]
# (task, question type, answer classes, answer -> class or None for the identity)
BALANCED = [
    (ShapesDataset, "count", [str(n) for n in range(5)], None),
    (ShapesDataset, "color", COLOR_NAMES, None),
    (ShapesDataset, "shape", SHAPES, None),
    (ShapesDataset, "position", ["yes", "no"], None),
    (ChartsDataset, "tallest", CATEGORIES, None),
    (ChartsDataset, "shortest", CATEGORIES, None),
    (ChartsDataset, "max_value", BINS, partial(value_bin, low=10, high=99)),
    (ChartsDataset, "min_value", BINS, partial(value_bin, low=1, high=90)),
    (ChartsDataset, "bar_value", BINS, partial(value_bin, low=1, high=99)),
    (MultiImageDataset, "more", ["the first image", "the second image", "the third image"], None),
    (MultiImageDataset, "same_color", ["yes", "no"], None),
    (VideoDataset, "direction", DIRECTIONS, None),
]


@pytest.mark.parametrize(
    ("cls", "question_type", "classes", "to_class"),
    BALANCED,
    ids=[f"{c.task}-{q}" for c, q, *_ in BALANCED],
)
def test_answers_are_balanced(cls, question_type, classes, to_class):
    dataset = make(cls, split="test", question_types=(question_type,))
    answers = [dataset[i]["answer"] for i in range(500)]
    if to_class is not None:
        answers = [to_class(answer) for answer in answers]
    # A fixed seed makes this deterministic; p > 0.001 means "no detectable imbalance".
    assert uniformity_p_value(answers, classes) > 1e-3, Counter(answers)


@pytest.mark.parametrize("cls", [ShapesDataset, ChartsDataset, MultiImageDataset])
def test_question_types_are_balanced(cls):
    dataset = cls(split="test")
    types = [dataset[i]["question_type"] for i in range(500)]
    assert uniformity_p_value(types, cls.QUESTION_TYPES) > 1e-3


def _keep_batch(batch):
    return batch


def test_dataloader_with_two_workers_yields_the_same_samples_as_one_process():
    dataset = VideoDataset(split="test", length=24, n_frames=3)
    single = [
        s for batch in DataLoader(dataset, batch_size=4, collate_fn=_keep_batch) for s in batch
    ]
    parallel = [
        s
        for batch in DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=_keep_batch)
        for s in batch
    ]
    assert [s["id"] for s in parallel] == [s["id"] for s in single]
    assert [fingerprint(s) for s in parallel] == [fingerprint(s) for s in single]


def contact_sheet(samples, image_size: int) -> Image.Image:
    """One row per sample: its images (or video frames), then its question and answer."""
    text_width = 420
    rows = [visuals(s) for s in samples]
    width = max(len(r) for r in rows) * (image_size + 4) + text_width
    sheet = Image.new("RGB", (width, len(rows) * (image_size + 4)), (70, 70, 70))
    draw = ImageDraw.Draw(sheet)
    font = load_font(13)
    for row, (sample, images) in enumerate(zip(samples, rows)):
        y = row * (image_size + 4)
        for column, image in enumerate(images):
            sheet.paste(image, (column * (image_size + 4), y))
        question = sample["messages"][0]["content"][-1]["text"]
        answer = "\n".join(textwrap.wrap("-> " + sample["answer"], 55))
        x = width - text_width + 6
        draw.text((x, y + 4), question, fill=(255, 255, 255), font=font)
        draw.multiline_text((x, y + 24), answer, fill=(255, 255, 120), font=font)
    return sheet


def test_preview_sheets_for_people_to_look_at(tmp_path):
    """Writes one contact sheet per task (64 and 224 px). Set MINIVLM_PREVIEW_DIR to keep them."""
    out = Path(os.environ.get("MINIVLM_PREVIEW_DIR", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    for cls in TASKS:
        for image_size in (64, 224):
            dataset = cls(split="test", seed=0, image_size=image_size)
            samples = [dataset[i] for i in range(6 if image_size == 64 else 3)]
            path = out / f"{cls.task}_{image_size}.png"
            contact_sheet(samples, image_size).save(path)
            with Image.open(path) as written:
                assert written.height == len(samples) * (image_size + 4)
