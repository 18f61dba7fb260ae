"""Images and videos named by data records: checked paths inside a root, decoded on read.

A record's media items hold what the file wrote: a path string (relative to the image root, or
absolute inside it), a list of frame paths, or encoded bytes (shard formats store the files
themselves). :meth:`MediaRoot.resolve` checks the paths without opening anything outside the
root; :meth:`MediaRoot.load` decodes what the model will see. Videos take the forms
``minivlm chat --video`` takes (:func:`minivlm.vision.load_video`): a list of frame paths, a
folder of frames, an animated GIF / WebP, or an MP4 (with PyAV, the ``video`` extra).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image

from minivlm.data.sample import DataError
from minivlm.text.chat import ImagePart, Message, Part, VideoPart
from minivlm.vision import ImageLoadError, load_image, load_video
from minivlm.vision.video import VideoLoadError

#: Frames decoded to check a video file when its sample is read (first and last: a truncated
#: animation fails on its last frame); the processor samples ``data.video_frames`` of them later.
VIDEO_CHECK_FRAMES = 2


class MediaRoot:
    """Resolves and decodes the media of records whose paths are relative to ``root``.

    Args:
        root: the image folder; no path may lead outside it (``..``, absolute, symlinks). None:
            the records carry their media (shards), and a path is refused.
        max_pixels: per image (and frame) decompression-bomb limit of
            :func:`minivlm.vision.load_image`.
    """

    def __init__(self, root: str | os.PathLike | None, max_pixels: int | None) -> None:
        self.root = Path(root).resolve() if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise FileNotFoundError(f"{root}: image root is not a directory")
        self.max_pixels = max_pixels

    # ---- paths ---------------------------------------------------------------------------------
    def resolve(self, messages: list[Message], source: str) -> list[Message]:
        """``messages`` with every media path checked and resolved (bytes are kept as they are).

        Raises:
            DataError: ``bad_format`` (a path that is not a non-empty string), ``path_escape``,
                ``missing_image``.
        """
        return [Message(m.role, tuple(self._resolve_part(part, source) for part in m.parts)) for m in messages]

    def _resolve_part(self, part: Part, source: str) -> Part:
        if isinstance(part, ImagePart):
            return part if _is_encoded(part.image) or isinstance(part.image, Image.Image) else \
                ImagePart(self.resolve_path(part.image, source))
        if isinstance(part, VideoPart):
            video = part.video
            if isinstance(video, list):
                video = [frame if _is_encoded(frame) else self.resolve_path(frame, source) for frame in video]
            elif not _is_encoded(video):
                video = self.resolve_path(video, source, directory_ok=True)
            return VideoPart(video, part.fps)
        return part

    def resolve_path(self, value: Any, source: str, directory_ok: bool = False) -> Path:
        """A path inside the root (relative to it, or absolute inside it).

        The check runs on the fully resolved path, so ``..`` segments and symlinks that lead out
        of the root are refused before anything outside it is opened.
        """
        if not isinstance(value, str) or not value:
            raise DataError(f"a media path must be a non-empty string, got {value!r:.60}", reason="bad_format",
                            source=source)
        if self.root is None:
            raise DataError(f"media path {value!r}: this source's records carry their images, not paths",
                            reason="bad_format", source=source)
        candidate = Path(value)
        resolved = (candidate if candidate.is_absolute() else self.root / candidate).resolve()
        if not resolved.is_relative_to(self.root):
            raise DataError(f"image path {value!r} resolves to {resolved}, outside the dataset root {self.root}",
                            reason="path_escape", source=source)
        if not (resolved.is_file() or (directory_ok and resolved.is_dir())):
            raise DataError(f"image {value!r} not found (looked for {resolved})", reason="missing_image",
                            source=source)
        return resolved

    # ---- decoding ------------------------------------------------------------------------------
    def load(self, messages: list[Message], source: str) -> list[Message]:
        """``messages`` with images decoded to RGB ``PIL`` images and frame lists to lists of them;
        a video file or folder stays a path (the processor samples its frames) once it decodes.

        Raises:
            DataError: ``corrupt_image`` naming the file (or the record's bytes).
        """
        return [Message(m.role, tuple(self._load_part(part, source) for part in m.parts)) for m in messages]

    def _load_part(self, part: Part, source: str) -> Part:
        if isinstance(part, ImagePart):
            return ImagePart(self.decode(part.image, source))
        if isinstance(part, VideoPart):
            if isinstance(part.video, list):
                return VideoPart([self.decode(frame, source) for frame in part.video], part.fps)
            try:
                load_video(part.video, max_frames=VIDEO_CHECK_FRAMES, fps=part.fps, max_pixels=self.max_pixels)
            except (ImageLoadError, VideoLoadError) as error:
                raise DataError(str(error), reason="corrupt_image", source=source) from error
            return VideoPart(os.fspath(part.video) if isinstance(part.video, Path) else part.video, part.fps)
        return part

    def decode(self, image: Any, source: str) -> Image.Image:
        try:
            return load_image(image, max_pixels=self.max_pixels)
        except ImageLoadError as error:
            raise DataError(str(error), reason="corrupt_image", source=source) from error


def bind_media(messages: Any, images: list[Any], named: dict[str, Any] | None, source: str) -> Any:
    """Fill a raw record's media items from the media stored with it (shard formats).

    An image (video) item without a value takes the next of ``images`` (``videos`` in the same
    list, in order), as the Hugging Face ``messages`` + ``images`` column layout does; an item
    whose value is a string that names an entry of ``named`` (a webdataset sample's files, by
    extension: ``"jpg"``, ``"1.png"``) takes that entry. Anything else is left for the checks.

    Raises:
        DataError: ``image_count_mismatch`` when the items and the stored images disagree.
    """
    if not isinstance(messages, list):
        return messages
    remaining = list(images)
    used = 0
    bound = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            bound.append(message)
            continue
        items = []
        for item in content:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind in ("image", "video"):
                value = item.get(kind)
                if value is None:
                    if used == len(remaining):
                        raise DataError(f"more {kind} items than the {len(remaining)} stored images",
                                        reason="image_count_mismatch", source=source)
                    item = {**item, kind: remaining[used]}
                    used += 1
                elif named is not None and isinstance(value, str) and value in named:
                    item = {**item, kind: named[value]}
            items.append(item)
        bound.append({**message, "content": items})
    if named is None and used != len(remaining):
        raise DataError(f"{len(remaining)} stored images but {used} image items take them",
                        reason="image_count_mismatch", source=source)
    return bound


def encoded_image(cell: Any) -> Any:
    """An image as stored in a table cell: bytes, Hugging Face's ``{"bytes", "path"}`` struct
    (its bytes), or a decoded image; None stays None."""
    if isinstance(cell, dict):
        return cell.get("bytes") if cell.get("bytes") is not None else cell.get("path")
    return cell


def _is_encoded(value: Any) -> bool:
    return isinstance(value, (bytes, bytearray, memoryview))
