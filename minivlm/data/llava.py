"""LLaVA JSON files (the LLaVA-1.5 instruction and LLaVA-Pretrain format, github.com/haotian-liu/LLaVA).

A JSON array of ``{"id", "image", "conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}``
with images relative to an image folder, which LLaVA keeps apart from the JSON
(``llava:chat.json?images=/data/images`` in a data spec). Each ``<image>`` placeholder becomes an
image item at its position, by the conversation layer (:func:`minivlm.text.chat.from_llava`: the
newline that conventionally separates a placeholder from the text is dropped). ``"image"`` may be
a list (LLaVA-OneVision multi-image); a record with one image and no placeholder gets the image
before the first human turn, as LLaVA's own preprocessing does. ``"video"`` is one video for the
``<video>`` placeholder (LLaVA-Video style), in the forms of :mod:`minivlm.data.jsonl`: a file
or frame folder path, or a list of frame paths.

Records are indexed lazily and checked when read (:mod:`minivlm.data.file_dataset`); a document
whose structure is broken (:mod:`minivlm.data.json_index`) always raises, naming the line.
Warnings and errors name the line on which a record starts.
"""

from __future__ import annotations

import os

from minivlm.data.file_dataset import JsonRecordDataset, Record, decode_json
from minivlm.data.json_index import RecordIndex, index_json_array
from minivlm.data.sample import DataError, checked_llava


class LlavaJsonDataset(JsonRecordDataset):
    """LLaVA-format JSON (see the module docstring).

    Args:
        path: the ``.json`` file (a JSON array of records).
        image_folder: directory the records' ``"image"`` paths are relative to, and may not
            leave; default: the JSON file's directory.
        strict, require_assistant, max_pixels, verify, verify_images: as
            :class:`~minivlm.data.jsonl.ChatJsonlDataset`.
    """

    task = "llava"

    def __init__(self, path: str | os.PathLike, *, image_folder: str | os.PathLike | None = None, **options) -> None:
        super().__init__(path, image_root=image_folder, **options)  # LLaVA's name for the media root

    def _index(self) -> RecordIndex:
        return index_json_array(self.path)

    def _parse(self, raw: bytes, line: int) -> Record:
        source = self._where(line)
        record = decode_json(raw, source)
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise DataError("expected an object with a 'conversations' list", reason="bad_format", source=source)
        images, video = record.get("image"), record.get("video")
        messages = checked_llava(record["conversations"], images if isinstance(images, list) else
                                 [] if images is None else [images], [] if video is None else [video],
                                 require_assistant=self.require_assistant, source=source)
        metadata = {"task": self.task, "id": str(record.get("id", f"{self.path.stem}/{line}"))}
        return Record(source, self.media.resolve(messages, source), metadata)

