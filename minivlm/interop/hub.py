"""Where an import reads from: a local path, or a model already in the Hugging Face cache.

``minivlm import KIND SRC``: SRC is a directory or file, else a hub id (``org/name``, or
``hf-hub:org/name``) looked up in the local cache with ``huggingface_hub`` and
``local_files_only=True``; minivlm never downloads. For ``timm``, a bare model name such as
``vit_tiny_patch16_224.augreg_in21k`` is timm's hub repository ``timm/<name>``. Weights that are
not cached are an error that says so: building the architecture with random weights would not be
an import.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class SourceNotFoundError(FileNotFoundError):
    """SRC is neither a local path nor a model in the local Hugging Face cache."""


def cache_dir() -> str | None:
    """The hub cache ``huggingface_hub`` reads (``HF_HUB_CACHE``, else ``HF_HOME/hub``), read at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def hub_id_for(kind: str, src: str) -> str | None:
    """The hub repository SRC names for an importer of ``kind``, or None if it names none."""
    name = src.removeprefix("hf-hub:")
    if _HUB_ID.match(name):
        return name
    if kind == "timm" and re.match(r"^[\w.-]+$", name):
        return f"timm/{name}"
    return None


def resolve_source(kind: str, src: str | os.PathLike) -> Path:
    """A local path for SRC (see the module docstring).

    Raises:
        SourceNotFoundError: one line naming what was looked for and where.
    """
    path = Path(src)
    if path.exists():
        return path
    repo = hub_id_for(kind, str(src))
    if repo is None:
        raise SourceNotFoundError(f"import source {src} does not exist (expected a directory, a weights file or a "
                                  f"Hugging Face hub id such as org/name)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as err:  # pragma: no cover - huggingface_hub is a dependency
        raise SourceNotFoundError(f"{src} is not a local path, and huggingface_hub is not installed to look it up "
                                  f"in the Hugging Face cache") from err
    where = cache_dir() or "the default Hugging Face cache (~/.cache/huggingface/hub)"
    try:
        return Path(snapshot_download(repo, cache_dir=cache_dir(), local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as err:
        raise SourceNotFoundError(
            f"the weights of {repo} are not in {where} and minivlm does not download them; fetch them where the "
            f"hub is reachable (`huggingface-cli download {repo}`) or pass a local directory") from err
