"""webdataset tar shards (github.com/webdataset/webdataset) as a :class:`~minivlm.data.shards.ShardedSource`.

A shard is a plain or gzipped tar whose consecutive files sharing a key form one sample
(``000123.jpg``, ``000123.json``: key ``000123``, extensions ``jpg`` and ``json``), grouped by the
``webdataset`` library's own rules (:func:`webdataset.tariterators.group_by_keys`). A sample
becomes a chat sample from, in this order:

* ``json`` with ``"messages"`` (Hugging Face chat): an image/video item without a value takes the
  sample's images in extension order, one naming an extension (``{"type": "image", "image":
  "jpg"}``) takes that file;
* ``json`` with ``"conversations"`` (LLaVA): the ``<image>`` placeholders take the images in
  extension order (or ``"image"``: an extension or a list of them);
* a caption: ``txt`` or ``json``'s ``"caption"``, with the sample's image, as a captioning turn
  ("Describe the image." -> caption, the prompt of :mod:`minivlm.data.shapes`).

Images: ``jpg``, ``jpeg``, ``png``, ``webp``, ``bmp`` (also numbered, ``0.png``); videos: ``gif``,
``mp4``, ``webm`` (``minivlm chat --video``'s forms). Shards are named like webdataset's URLs:
``webdataset:/data/shards-{000000..000099}.tar``, a glob (``/data/*.tar``) or a directory.

Counting a shard reads its tar headers only; a plain tar is then read from any sample by seeking
to its first header (so resuming costs no re-reading), a gzipped one by skipping from the start.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from minivlm.data.media import bind_media
from minivlm.data.sample import DataError, caption_messages, checked_llava, checked_messages
from minivlm.data.shards import Shard, ShardedSource
from minivlm.text.chat import Message

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
#: Files webdataset's tar reader skips (``__key__``-style metadata): not counted as samples either.
META_FILES = r"__[^/]*__($|/)"
VIDEO_EXTENSIONS = ("gif", "mp4", "webm")


def expand_shards(spec: str) -> list[str]:
    """Shard paths of ``spec``: webdataset brace notation, a glob, or a directory of ``.tar`` files."""
    import braceexpand

    if os.path.isdir(spec):
        paths = sorted(str(p) for p in Path(spec).iterdir() if p.name.endswith((".tar", ".tar.gz", ".tgz")))
    else:
        paths = [match for pattern in braceexpand.braceexpand(spec) for match in (sorted(glob.glob(pattern)) or [pattern])]
    missing = [p for p in paths if not os.path.isfile(p)]
    if not paths or missing:
        raise FileNotFoundError(f"webdataset shards {spec!r}: no such file(s): {missing[:3] or spec}")
    return paths


def sample_kind(extension: str) -> str | None:
    """``"image"``, ``"video"`` or None for a file extension (``"0.png"`` counts as png)."""
    last = extension.rsplit(".", 1)[-1].lower()
    return "image" if last in IMAGE_EXTENSIONS else "video" if last in VIDEO_EXTENSIONS else None


class WebDatasetSource(ShardedSource):
    """Tar shards (module docstring). Args as :class:`~minivlm.data.shards.ShardedSource`, plus
    ``spec``: the shard names (brace notation, glob or directory)."""

    task = "webdataset"

    def __init__(self, spec: str, *, strict: bool = False, require_assistant: bool = True,
                 max_pixels: int | None = None) -> None:
        self.paths = expand_shards(spec)
        self._offsets: list[list[int]] = []  # per shard: byte offset of each sample's first header
        shards = []
        for path in self.paths:
            offsets = self._sample_offsets(path)
            self._offsets.append(offsets)
            shards.append(Shard(path, len(offsets)))
        super().__init__(shards, strict=strict, require_assistant=require_assistant, max_pixels=max_pixels)
        self._offsets = [o for o, s in zip(self._offsets, shards) if s.size > 0]

    @staticmethod
    def _sample_offsets(path: str) -> list[int]:
        from webdataset.tariterators import base_plus_ext

        offsets, previous = [], None
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar:
                    if not member.isreg() or re.match(META_FILES, member.name):  # as tar_file_iterator skips
                        continue
                    key, _ = base_plus_ext(member.name)
                    if key is not None and key != previous:
                        offsets.append(member.offset)
                        previous = key
        except (tarfile.TarError, EOFError, OSError) as error:
            raise DataError(f"not a readable tar shard ({error})", reason="bad_shard", source=path) from error
        return offsets

    def _read_shard(self, shard: int, offset: int) -> Iterator[dict[str, Any]]:
        from webdataset.tariterators import group_by_keys, tar_file_iterator

        path = self.shards[shard].name
        with open(path, "rb") as file:
            seekable = file.read(2) != b"\x1f\x8b"  # not gzip
            file.seek(self._offsets[shard][offset] if seekable else 0)
            files = ({**f, "__url__": path} for f in tar_file_iterator(file))
            samples = group_by_keys(files)
            for skipped, sample in enumerate(samples):
                if seekable or skipped >= offset:
                    yield sample

    def _messages(self, raw: dict[str, Any], source: str) -> tuple[list[Message], dict[str, Any]]:
        media = {ext: data for ext, data in raw.items() if not ext.startswith("__") and sample_kind(ext)}
        ordered = [media[ext] for ext in sorted(media)]
        meta = _json(raw.get("json"), source) if "json" in raw else {}
        metadata = {"id": f"{source}:{raw.get('__key__')}"}
        if isinstance(meta, dict) and "messages" in meta:
            messages = bind_media(meta["messages"], ordered, media, source)
            return checked_messages(messages, require_assistant=self.require_assistant, source=source), metadata
        if isinstance(meta, dict) and "conversations" in meta:
            named = meta.get("image")
            names = named if isinstance(named, list) else [named] if named is not None else sorted(media)
            images = [media[n] if isinstance(n, str) and n in media else n for n in names]
            return checked_llava(meta["conversations"], images, require_assistant=self.require_assistant,
                                 source=source), metadata
        caption = raw["txt"].decode("utf-8", "replace") if "txt" in raw else (
            meta.get("caption") if isinstance(meta, dict) else None)
        if not isinstance(caption, str) or not ordered:
            raise DataError(f"a sample needs json messages/conversations, or an image and a caption (txt); got "
                            f"files {sorted(k for k in raw if not k.startswith('__'))}", reason="bad_format",
                            source=source)
        return caption_messages(ordered[0], caption, self.require_assistant, source), {**metadata, "caption": caption}


def _json(data: bytes, source: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"the sample's json is malformed ({error})", reason="bad_json", source=source) from error
