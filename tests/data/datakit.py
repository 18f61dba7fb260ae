"""Helpers of the data-file and shard tests: an image folder, warnings logged, and small shard
files (webdataset tars of captioned images; each caption names its shard and record, so tests
can see what was read)."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

from PIL import Image

COLORS = ("red", "blue", "green", "yellow")


def image_folder(tmp_path: Path) -> Path:
    """A dataset folder with two small images (imgs/red.png, imgs/blue.png), and one image
    outside it (tmp_path/outside.png)."""
    folder = tmp_path / "dataset"
    (folder / "imgs").mkdir(parents=True)
    Image.new("RGB", (8, 6), (255, 0, 0)).save(folder / "imgs" / "red.png")
    Image.new("RGB", (8, 6), (0, 0, 255)).save(folder / "imgs" / "blue.png")
    Image.new("RGB", (8, 6), (0, 255, 0)).save(tmp_path / "outside.png")
    return folder


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def png(color: str = "red", size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, "PNG")
    return buffer.getvalue()


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_caption_shards(folder: Path, sizes: list[int], mode: str = "w") -> str:
    """Tar shards ``shard-000.tar`` ... of captioned images; record ``i`` of shard ``s`` is
    captioned ``"s{s} r{i}"``. Returns the brace spec naming them all."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".tar.gz" if mode == "w:gz" else ".tar"
    for s, size in enumerate(sizes):
        with tarfile.open(folder / f"shard-{s:03d}{suffix}", mode) as tar:
            for i in range(size):
                add_file(tar, f"{s:03d}{i:04d}.png", png(COLORS[(s + i) % len(COLORS)]))
                add_file(tar, f"{s:03d}{i:04d}.txt", f"s{s} r{i}".encode())
    return str(folder / f"shard-{{000..{len(sizes) - 1:03d}}}{suffix}")


def write_tar(path: Path, samples: list[dict[str, bytes | dict]]) -> Path:
    """One shard of the given samples: ``{"__key__": key, ext: bytes or JSON-able}``."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext != "__key__":
                    add_file(tar, f"{sample['__key__']}.{ext}", data if isinstance(data, bytes) else json.dumps(data).encode())
    return path
