"""easy-VQA (github.com/vzhou842/easy-VQA, MIT): 64x64 images of one shape, simple questions.

The PyPI package ``easy-vqa`` ships the data: 4,000 train / 1,000 test images, 38,575 train /
9,673 test questions, 13 answers (3 shapes, 8 colours, yes/no). Its files are read directly from
the installed distribution: importing the ``easy_vqa`` module is not needed, and the package also
installs a top-level ``test`` package that shadows the standard library's, which minivlm never
touches.

``question_type`` is derived from the answer, since the three answer sets are disjoint:
``"shape"`` (circle / rectangle / triangle), ``"color"`` (the 8 colour words) and ``"yes_no"``.
Per-type accuracy matters here: a model that ignores the image already scores ~0.66 from the
question alone (the yes/no and colour priors), so the overall number hides a blind model.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from minivlm.data.sample import image_item, text_item, vqa_sample

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
QUESTION_TYPES = ("shape", "color", "yes_no")
SHAPE_ANSWERS = frozenset({"circle", "rectangle", "triangle"})
YES_NO_ANSWERS = frozenset({"yes", "no"})


def question_type_of(answer: str) -> str:
    """``"shape"``, ``"yes_no"`` or ``"color"`` from an easy-VQA answer (the sets are disjoint)."""
    if answer in SHAPE_ANSWERS:
        return "shape"
    if answer in YES_NO_ANSWERS:
        return "yes_no"
    return "color"


def default_data_dir() -> Path:
    """The ``easy_vqa/data`` directory of the installed ``easy-vqa`` distribution."""
    try:
        distribution = importlib.metadata.distribution("easy-vqa")
    except importlib.metadata.PackageNotFoundError as error:
        raise ModuleNotFoundError(
            "the easy-VQA data comes from the PyPI package 'easy-vqa'; install it with "
            "`pip install easy-vqa` or pass data_dir= pointing at a copy of its data/ folder"
        ) from error
    return Path(str(distribution.locate_file("easy_vqa/data")))


@dataclass(frozen=True)
class EasyVQAQuestion:
    question: str
    answer: str
    image_id: int
    question_type: str


class EasyVQA(Dataset):
    """The official easy-VQA split as chat samples.

    Args:
        split: ``"train"`` (38,575 questions on 4,000 images) or ``"test"`` (9,673 on 1,000).
        group_by_image: if False (default), item ``i`` is question ``i`` (a sample dict). If True,
            item ``i`` is the list of samples for all questions of the ``i``-th image (sharing
            one PIL image), so a trainer can encode each image once per step
            (:func:`minivlm.data.collate.merge_shared_prefix`).
        question_types: keep only these types (``"shape"``, ``"color"``, ``"yes_no"``); None
            keeps all. ``("shape", "color")`` are the open questions, whose answers cannot be
            guessed from the question (a curriculum's first stage, see ``DataConfig``).
        data_dir: a folder laid out like the package's ``data/`` (``answers.txt``,
            ``<split>/questions.json``, ``<split>/images/<id>.png``); default: the installed
            package.

    Decoded images are cached in memory on first use (5,000 64x64 images are ~60 MB); each
    DataLoader worker keeps its own cache.
    """

    task = "easy_vqa"

    def __init__(
        self, split: str = "train", group_by_image: bool = False, data_dir: str | Path | None = None,
        question_types: tuple[str, ...] | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if question_types is not None and (not question_types or set(question_types) - set(QUESTION_TYPES)):
            raise ValueError(f"question_types must be a non-empty subset of {QUESTION_TYPES}, got {question_types!r}")
        self.split = split
        self.group_by_image = group_by_image
        self.data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        self.answers: tuple[str, ...] = tuple(
            line.strip()
            for line in (self.data_dir / "answers.txt").read_text().splitlines()
            if line.strip()
        )
        with open(self.data_dir / split / "questions.json") as file:
            raw = json.load(file)
        questions = [
            EasyVQAQuestion(question, answer, int(image_id), question_type_of(answer))
            for question, answer, image_id in raw
        ]
        # Sample ids keep the official question index, whatever the filter.
        self._official_index = [i for i, q in enumerate(questions)
                                if question_types is None or q.question_type in question_types]
        self.questions = [questions[i] for i in self._official_index]
        self._question_indices: dict[int, list[int]] = {}
        for index, record in enumerate(self.questions):
            self._question_indices.setdefault(record.image_id, []).append(index)
        self._image_ids = sorted(self._question_indices)
        self._image_cache: dict[int, Image.Image] = {}
        logger.debug(
            "easy-VQA %s: %d questions on %d images from %s",
            split,
            len(self.questions),
            len(self._image_ids),
            self.data_dir,
        )

    def __len__(self) -> int:
        return len(self._image_ids) if self.group_by_image else len(self.questions)

    def __getitem__(self, index: int) -> dict[str, Any] | list[dict[str, Any]]:
        if self.group_by_image:
            image_id = self._image_ids[index]
            return [self.sample(i) for i in self._question_indices[image_id]]
        return self.sample(range(len(self.questions))[index])

    def sample(self, question_index: int) -> dict[str, Any]:
        """The sample for question ``question_index`` (whatever ``group_by_image`` is)."""
        record = self.questions[question_index]
        return vqa_sample(
            visuals=[image_item(self.image(record.image_id))],
            question=record.question,
            answer=record.answer,
            task=self.task,
            sample_id=f"{self.task}/{self.split}/{self._official_index[question_index]}",
            question_type=record.question_type,
            image_id=record.image_id,
        )

    def image_ids(self) -> list[int]:
        """Ids of the split's images, ascending (the order of ``group_by_image`` items)."""
        return list(self._image_ids)

    def image(self, image_id: int) -> Image.Image:
        """The decoded RGB image ``image_id`` (cached). Callers must not modify it in place."""
        cached = self._image_cache.get(image_id)
        if cached is None:
            path = self.data_dir / self.split / "images" / f"{image_id}.png"
            with Image.open(path) as file:
                cached = file.convert("RGB")
            self._image_cache[image_id] = cached
        return cached

    def images(self) -> dict[int, Image.Image]:
        """All images of the split by id, decoding (and caching) any not yet loaded."""
        return {image_id: self.image(image_id) for image_id in self._image_ids}

    def question_indices(self, image_id: int) -> list[int]:
        """Indices (for :meth:`sample` / ungrouped indexing) of the questions on ``image_id``."""
        return list(self._question_indices[image_id])


class EasyVQADialogues(Dataset):
    """One conversation per easy-VQA image: the image, then all its questions as turns.

    Item ``i`` shows image ``i`` once and asks its ~10 questions one after another (order
    shuffled by ``(seed, i)``), so one sequence carries ~10 supervised answers instead of one.
    For training this is the same data as :class:`EasyVQA` at a tenth of the image and prompt
    cost per answer; evaluation stays single-turn (:class:`EasyVQA`).
    """

    task = "easy_vqa"

    def __init__(self, split: str = "train", seed: int = 0, data_dir: str | Path | None = None) -> None:
        self.base = EasyVQA(split, data_dir=data_dir)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base.image_ids())

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.base.image_ids()[range(len(self))[index]]
        order = self.base.question_indices(image_id)
        random.Random(f"{self.seed}/{image_id}").shuffle(order)
        records = [self.base.questions[i] for i in order]
        messages: list[dict[str, Any]] = []
        for turn, record in enumerate(records):
            content = ([image_item(self.base.image(image_id))] if turn == 0 else []) + [text_item(record.question)]
            messages.append({"role": "user", "content": content})
            messages.append({"role": "assistant", "content": [text_item(record.answer)]})
        return {"messages": messages, "task": self.task, "answer": records[-1].answer,
                "question_type": records[-1].question_type, "id": f"{self.task}_dialogue/{self.base.split}/{image_id}"}
