"""The one interface every minivlm tokenizer offers, and the special tokens minivlm names.

Two kinds implement :class:`TextTokenizer`:

* :class:`minivlm.text.tokenizer.Tokenizer`: a sentencepiece model (``tokenizer.model``), the
  kind minivlm trains for its own models and the kind of Llama/Mistral checkpoints;
* :class:`minivlm.text.hf_tokenizer.HFTokenizer`: a Hugging Face ``tokenizers`` model
  (``tokenizer.json``), the kind SmolLM2 / SmolVLM / nanoVLM / llava-hf checkpoints ship.

Templates, the :class:`~minivlm.text.processor.Processor` and generation use only what is
declared here; :func:`load_tokenizer` picks the kind from the files of a directory.

Every tokenizer keeps two promises: ordinary text never produces a special id (``encode`` with
``parse_special=False``: a user typing ``<image>`` gets the characters, not a placeholder), and
every special / added token keeps its id exactly (a checkpoint's embedding rows stay meaningful).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

PAD_TOKEN = "<pad>"
IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
GLOBAL_IMAGE_TOKEN = "<global-img>"


def tile_token(row: int, col: int) -> str:
    """The marker that precedes the tile at ``row``, ``col`` (1-based) of a split image (SmolVLM)."""
    if row < 1 or col < 1:
        raise ValueError(f"tile rows and columns are 1-based; got row={row}, col={col}")
    return f"<row_{row}_col_{col}>"


def tile_tokens(max_tiles: int) -> list[str]:
    """All tile markers a grid of at most ``max_tiles`` tiles can use, plus ``<global-img>``.

    A ``rows x cols`` grid with ``rows * cols <= max_tiles`` contains tile ``(r, c)`` only if
    ``r <= rows`` and ``c <= cols``, hence ``r * c <= max_tiles``: that set is exactly the markers
    needed (SmolVLM instead reserves a fixed 6x6 square).
    """
    if max_tiles < 0:
        raise ValueError(f"max_tiles must be >= 0; got {max_tiles}")
    if max_tiles == 0:
        return []
    markers = [tile_token(r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles // r + 1)]
    return markers + [GLOBAL_IMAGE_TOKEN]


class TextTokenizer(ABC):
    """Text <-> ids, with named special tokens. Subclasses: one per file format.

    Attributes:
        kind: the format's name (``"sentencepiece"`` | ``"hf"``).
        joint_text_runs: how a template's adjacent text segments are encoded. False: each segment
            on its own (minivlm's own templates, whose segments are designed as token boundaries).
            True: the whole rendered prompt as one string, special tokens split out, as
            transformers' processors tokenise it; labels then follow character offsets
            (:func:`minivlm.text.segments.encode_chunks`). Needs :meth:`encode_with_offsets`.
    """

    kind: ClassVar[str]
    joint_text_runs: ClassVar[bool] = False

    # ---- vocabulary ------------------------------------------------------------------------
    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""

    def __len__(self) -> int:
        return self.vocab_size

    @abstractmethod
    def has_token(self, token: str) -> bool:
        """True when ``token`` is one entry of the vocabulary."""

    @abstractmethod
    def token_to_id(self, token: str) -> int:
        """Id of ``token``; ``KeyError`` naming it when absent."""

    @abstractmethod
    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of ``token_id``."""

    @property
    @abstractmethod
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or None."""

    @property
    @abstractmethod
    def eos_id(self) -> int | None:
        """End-of-sequence id, or None."""

    @property
    @abstractmethod
    def pad_id(self) -> int:
        """Id that pads batches (never attended to)."""

    @property
    @abstractmethod
    def special_ids(self) -> frozenset[int]:
        """Ids that text never produces and that ``decode(skip_special_tokens=True)`` drops."""

    @property
    def image_token(self) -> str:
        """The placeholder token one image position becomes."""
        return IMAGE_TOKEN

    @property
    def end_of_turn_token(self) -> str:
        """The token that closes an assistant turn (generation stops at it)."""
        return IM_END_TOKEN

    @property
    def image_token_id(self) -> int:
        return self.token_to_id(self.image_token)

    @property
    def video_token_id(self) -> int:
        return self.token_to_id(VIDEO_TOKEN)

    @property
    def end_of_turn_id(self) -> int:
        return self.token_to_id(self.end_of_turn_token)

    @property
    def im_end_id(self) -> int:
        """The end-of-turn id (``<|im_end|>`` in ChatML; the name predates other templates)."""
        return self.end_of_turn_id

    @property
    def im_start_id(self) -> int | None:
        return self.token_to_id(IM_START_TOKEN) if self.has_token(IM_START_TOKEN) else None

    @property
    def max_tiles(self) -> int:
        """Largest tile count whose markers are all in the vocabulary (0: no image splitting)."""
        if not self.has_token(GLOBAL_IMAGE_TOKEN):
            return 0
        n = 0
        while n < 64 and all(self.has_token(t) for t in tile_tokens(n + 1)):
            n += 1
        return n

    @property
    def prefix_ids(self) -> list[int]:
        """Ids put before every whole sequence (a BOS the tokenizer's post-processor adds)."""
        return []

    @property
    def suffix_ids(self) -> list[int]:
        """Ids put after every whole sequence by the post-processor."""
        return []

    # ---- encode / decode ---------------------------------------------------------------------
    @abstractmethod
    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False,
               parse_special: bool = False) -> list[int]:
        """Ids of ``text``; special-token spellings stay text unless ``parse_special``."""

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of ``text`` with special tokens parsed, and each id's ``(start, end)`` characters.

        Only tokenizers with ``joint_text_runs`` need it.
        """
        raise NotImplementedError(f"{type(self).__name__} encodes template segments one by one")

    @abstractmethod
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list or a 1-d tensor)."""

    def check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")

    # ---- persistence -------------------------------------------------------------------------
    @abstractmethod
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the tokenizer's files into ``directory``; returns the main file."""


def load_tokenizer(directory: str | os.PathLike) -> TextTokenizer:
    """The tokenizer saved in ``directory``: ``tokenizer.json`` (Hugging Face ``tokenizers``)
    or ``tokenizer.model`` (sentencepiece).

    Raises:
        FileNotFoundError: naming both files when the directory holds neither.
    """
    from minivlm.text.hf_tokenizer import TOKENIZER_JSON, HFTokenizer
    from minivlm.text.tokenizer import TOKENIZER_FILENAME, Tokenizer

    directory = Path(directory)
    if (directory / TOKENIZER_JSON).is_file():
        return HFTokenizer.from_pretrained(directory)
    if (directory / TOKENIZER_FILENAME).is_file():
        return Tokenizer.from_pretrained(directory)
    raise FileNotFoundError(f"{directory} holds no tokenizer: expected {TOKENIZER_JSON} (Hugging Face tokenizers) "
                            f"or {TOKENIZER_FILENAME} (sentencepiece)")
