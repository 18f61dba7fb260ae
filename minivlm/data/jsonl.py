"""Chat JSONL files: one sample per line, in the sample format (:mod:`minivlm.data.sample`)
with media *paths* relative to the image root (default: the JSONL file's directory)::

    {"messages": [{"role": "user", "content": [{"type": "image", "image": "imgs/cat.jpg"},
                                               {"type": "text", "text": "What animal is this?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]}],
     "id": "optional", "task": "optional", "question_type": "optional"}

String contents are accepted (``"content": "hi"``). A video is what ``minivlm chat --video``
takes: a list of frame paths (``{"type": "video", "video": ["f0.png", "f1.png"], "fps": 2}``),
a folder of frames, an animated GIF / WebP or an MP4 (``{"type": "video", "video": "clip.gif"}``).
Records are indexed lazily and checked when read (:mod:`minivlm.data.file_dataset`).
"""

from __future__ import annotations


from minivlm.data.file_dataset import JsonRecordDataset, Record, decode_json
from minivlm.data.json_index import RecordIndex, index_jsonl
from minivlm.data.sample import DataError, checked_messages


class ChatJsonlDataset(JsonRecordDataset):
    """Chat-format JSONL (see the module docstring).

    Args:
        path: the ``.jsonl`` file.
        image_root: directory media paths are relative to, and may not leave; default: the
            JSONL file's directory.
        strict: raise :class:`DataError` on the first bad record instead of skipping it.
        require_assistant: a record needs an assistant turn (True for training data; False for
            prompts to generate from).
        max_pixels: passed to :func:`minivlm.vision.load_image` (decompression-bomb limit).
        verify: check every record while indexing (``len`` then counts usable records only).
        verify_images: ``verify`` and decode every image, so corrupt files are found (and
            skipped or raised) up front rather than during training.
    """

    task = "jsonl"

    def _index(self) -> RecordIndex:
        return index_jsonl(self.path)

    def _parse(self, raw: bytes, line: int) -> Record:
        source = self._where(line)
        record = decode_json(raw, source)
        if not isinstance(record, dict) or "messages" not in record:
            raise DataError(f"expected an object with a 'messages' list, got {type(record).__name__}",
                            reason="bad_format", source=source)
        messages = checked_messages(record["messages"], require_assistant=self.require_assistant, source=source)
        metadata = {"task": str(record.get("task", self.task)),
                    "id": str(record.get("id", f"{self.path.stem}/{line}"))}
        if "question_type" in record:
            metadata["question_type"] = str(record["question_type"])
        return Record(source, self.media.resolve(messages, source), metadata)
