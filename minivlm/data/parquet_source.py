"""Parquet files and Hugging Face ``datasets`` as :class:`~minivlm.data.shards.ShardedSource` s.

**Parquet** (``parquet:/data/train-*.parquet`` or a directory): each file is a shard whose
record count comes from its footer (no data is read to count); a reader decodes one row group
at a time and walks it, so a worker reading its shards front to back decodes every row group
once. Rows become chat samples from the columns Hugging Face's VLM datasets use:

* ``messages`` (Hugging Face chat, a list or a JSON string) with ``images`` (a list) or
  ``image``: image items without a value take the row's images in order;
* ``conversations`` (LLaVA) with ``image`` / ``images``;
* ``texts`` (The Cauldron: ``[{"user", "assistant"}, ...]``) with ``images``: the images go
  before the first question;
* ``caption`` or ``text`` with ``image``: a captioning turn.

Images are bytes, Hugging Face's ``{"bytes", "path"}`` struct, or (from ``datasets``) decoded
images; a path without bytes is refused (a shard carries its images).

**Hugging Face datasets** (``hf:NAME_OR_DIR?split=train&config=NAME``): a directory written by
``Dataset.save_to_disk`` is memory-mapped (``datasets.load_from_disk``) and read in shards of
:data:`HF_SHARD_ROWS` rows; anything else is resolved by ``datasets`` (a local folder of data
files, or a hub dataset already in the local cache, offline) to its parquet files, read as above
- the files ``datasets``' own streaming mode reads, but with exact positions (streaming cannot
resume at a record). Needs the ``hf`` extra.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from minivlm.data.media import bind_media, encoded_image
from minivlm.data.sample import DataError, caption_messages, checked_llava, checked_messages
from minivlm.data.shards import Shard, ShardedSource
from minivlm.text.chat import Message

#: Rows per shard of a ``save_to_disk`` dataset (random access, so shards are only units of order).
HF_SHARD_ROWS = 1024


def row_messages(row: dict[str, Any], require_assistant: bool, source: str) -> tuple[list[Message], dict[str, Any]]:
    """One table row -> (checked messages, metadata) by the column conventions of the module docstring."""
    images = row.get("images")
    images = [encoded_image(i) for i in images] if isinstance(images, list) else (
        [encoded_image(row["image"])] if row.get("image") is not None else [])
    metadata = {"id": str(row["id"])} if row.get("id") is not None else {}
    if row.get("messages") is not None:
        messages = _maybe_json(row["messages"], source)
        return checked_messages(bind_media(messages, images, None, source), require_assistant=require_assistant,
                                source=source), metadata
    if row.get("conversations") is not None:
        return checked_llava(_maybe_json(row["conversations"], source), images, require_assistant=require_assistant,
                             source=source), metadata
    if row.get("texts") is not None:
        messages = []
        for turn in _maybe_json(row["texts"], source):
            if not isinstance(turn, dict):
                raise DataError(f"a 'texts' turn must be a {{'user', 'assistant'}} dict, got {turn!r:.60}",
                                reason="bad_format", source=source)
            messages += [{"role": "user", "content": [{"type": "text", "text": turn.get("user")}]},
                         {"role": "assistant", "content": [{"type": "text", "text": turn.get("assistant")}]}]
        if messages:
            messages[0]["content"][:0] = [{"type": "image"} for _ in images]
        return checked_messages(bind_media(messages, images, None, source), require_assistant=require_assistant,
                                source=source), metadata
    caption = row.get("caption", row.get("text"))
    if isinstance(caption, str) and len(images) == 1:
        return caption_messages(images[0], caption, require_assistant, source), {**metadata, "caption": caption}
    raise DataError(f"a row needs 'messages', 'conversations', 'texts', or an image and a 'caption'; got columns "
                    f"{sorted(row)}", reason="bad_format", source=source)


def _maybe_json(value: Any, source: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        raise DataError(f"malformed JSON cell ({error})", reason="bad_json", source=source) from error


def parquet_files(spec: str) -> list[str]:
    """Parquet paths of ``spec``: a file, a glob, or a directory (searched recursively)."""
    if os.path.isdir(spec):
        paths = sorted(str(p) for p in Path(spec).rglob("*.parquet"))
    else:
        paths = sorted(glob.glob(spec)) or ([spec] if os.path.isfile(spec) else [])
    if not paths:
        raise FileNotFoundError(f"parquet {spec!r}: no .parquet files found")
    return paths


class ParquetSource(ShardedSource):
    """Parquet files, one shard each (module docstring)."""

    task = "parquet"

    def __init__(self, spec: str | list[str], *, strict: bool = False, require_assistant: bool = True,
                 max_pixels: int | None = None) -> None:
        import pyarrow.parquet as pq

        self.paths = parquet_files(spec) if isinstance(spec, str) else list(spec)
        shards = []
        self._row_groups: dict[str, list[int]] = {}
        for path in self.paths:
            try:
                metadata = pq.ParquetFile(path).metadata
            except Exception as error:  # pyarrow raises ArrowInvalid / OSError for non-parquet files
                raise DataError(f"not a readable parquet file ({error})", reason="bad_shard", source=path) from error
            self._row_groups[path] = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
            shards.append(Shard(path, metadata.num_rows))
        super().__init__(shards, strict=strict, require_assistant=require_assistant, max_pixels=max_pixels)

    def _read_shard(self, shard: int, offset: int) -> Iterator[dict[str, Any]]:
        import pyarrow.parquet as pq

        path = self.shards[shard].name
        parquet = pq.ParquetFile(path)
        first_row = 0
        for group, rows in enumerate(self._row_groups[path]):
            if first_row + rows > offset:
                table = parquet.read_row_group(group)
                for row in range(max(0, offset - first_row), rows):
                    yield {name: column[row].as_py() for name, column in zip(table.column_names, table.columns)}
            first_row += rows

    def _messages(self, raw: dict[str, Any], source: str) -> tuple[list[Message], dict[str, Any]]:
        return row_messages(raw, self.require_assistant, source)


class ArrowDatasetSource(ShardedSource):
    """A ``datasets.Dataset`` (memory-mapped, random access) in shards of ``shard_rows`` rows."""

    task = "hf"

    def __init__(self, dataset: Any, name: str, *, shard_rows: int = HF_SHARD_ROWS, strict: bool = False,
                 require_assistant: bool = True, max_pixels: int | None = None) -> None:
        self.dataset = dataset
        n = len(dataset)
        shards = [Shard(f"{name}[{a}:{min(a + shard_rows, n)}]", min(shard_rows, n - a)) for a in range(0, n, shard_rows)]
        self.shard_rows = shard_rows
        super().__init__(shards, strict=strict, require_assistant=require_assistant, max_pixels=max_pixels)

    def _read_shard(self, shard: int, offset: int) -> Iterator[dict[str, Any]]:
        first = shard * self.shard_rows
        for row in range(first + offset, first + self.shards[shard].size):
            yield self.dataset[row]

    def _messages(self, raw: dict[str, Any], source: str) -> tuple[list[Message], dict[str, Any]]:
        return row_messages(raw, self.require_assistant, source)


def hf_source(path: str, *, split: str = "train", config: str | None = None, strict: bool = False,
              require_assistant: bool = True) -> ShardedSource:
    """The source for ``hf:PATH`` (module docstring)."""
    import datasets
    saved = any((Path(path) / marker).is_file() for marker in ("state.json", "dataset_dict.json"))
    if saved:  # written by save_to_disk
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"hf:{path} has splits {sorted(loaded)}, not {split!r}")
            loaded = loaded[split]
        return ArrowDatasetSource(loaded, f"{path}:{split}", strict=strict, require_assistant=require_assistant)
    builder = datasets.load_dataset_builder(path, config)
    files = [str(f) for f in (builder.config.data_files or {}).get(split, [])]
    if not files:
        raise FileNotFoundError(f"hf:{path}: no data files for split {split!r}")
    if not all(f.endswith(".parquet") for f in files):
        raise ValueError(f"hf:{path}: minivlm streams parquet data files with exact positions; this dataset's "
                         f"are {sorted({Path(f).suffix for f in files})} (convert it with Dataset.to_parquet or "
                         f"save_to_disk)")
    return ParquetSource(files, strict=strict, require_assistant=require_assistant)
