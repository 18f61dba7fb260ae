"""COCO captions (cocodataset.org) as chat samples: ``coco:captions_train2017.json?images=DIR``.

The annotation file (``{"images": [{"id", "file_name"}], "annotations": [{"image_id",
"caption"}]}``) is converted to one captioning sample per caption, in annotation order: the
image and "Describe the image." answered by the caption (the prompt of
:mod:`minivlm.data.shapes` and the shard sources). Images are read from the image folder (the
``images`` option; default: the JSON file's directory) with the same path checks, lazy decoding
and skip accounting as every data file (:mod:`minivlm.data.file_dataset`).
"""

from __future__ import annotations

import json
import os

import numpy as np

from minivlm.data.file_dataset import ChatFileDataset, Record
from minivlm.data.json_index import RecordIndex
from minivlm.data.sample import DataError, caption_messages


class CocoCaptionsDataset(ChatFileDataset):
    """COCO captions (module docstring). Args as :class:`~minivlm.data.jsonl.ChatJsonlDataset`,
    with ``image_folder`` the folder of ``file_name`` s (e.g. ``train2017/``)."""

    task = "coco_captions"

    def __init__(self, path: str | os.PathLike, *, image_folder: str | os.PathLike | None = None, **options) -> None:
        super().__init__(path, image_root=image_folder, **options)  # COCO's name for the media root

    def _index(self) -> RecordIndex:
        try:
            document = json.loads(self.path.read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"not a COCO annotation file ({error})", reason="bad_json", source=str(self.path)) from error
        if not isinstance(document, dict) or not isinstance(document.get("annotations"), list) \
                or not isinstance(document.get("images"), list):
            raise DataError("expected a COCO captions file: an object with 'images' and 'annotations' lists",
                            reason="bad_format", source=str(self.path))
        files = {image.get("id"): image.get("file_name") for image in document["images"] if isinstance(image, dict)}
        # Per annotation: the image's file name and the caption (None where the annotation is bad).
        self._files = [files.get(a.get("image_id")) if isinstance(a, dict) else None for a in document["annotations"]]
        self._captions = [a.get("caption") if isinstance(a, dict) else None for a in document["annotations"]]
        self._ids = [str(a.get("id", i)) if isinstance(a, dict) else str(i) for i, a in enumerate(document["annotations"])]
        n = len(self._captions)
        positions = np.arange(n, dtype=np.int64)
        return RecordIndex(positions, positions + 1, positions + 1)  # "line" = annotation number

    def record(self, position: int) -> Record:
        annotation = int(self.index.starts[position])
        source = f"{self.path}:annotation {annotation}"
        file_name, caption = self._files[annotation], self._captions[annotation]
        if not isinstance(caption, str) or file_name is None:
            raise DataError("an annotation needs a caption and the id of a listed image", reason="bad_format",
                            source=source)
        messages = caption_messages(file_name, caption.strip(), True, source)
        return Record(source, self.media.resolve(messages, source),
                      {"task": self.task, "id": f"coco/{self._ids[annotation]}", "caption": caption.strip()})

