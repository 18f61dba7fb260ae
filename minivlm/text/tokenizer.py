"""SentencePiece tokenizer with the special tokens a VLM chat needs.

One :class:`Tokenizer` serves both kinds of vocabulary minivlm meets:

* a **trained** model (:meth:`Tokenizer.train`, a BPE model learnt in memory in well under a
  second on a small corpus): the special tokens are reserved right after ``<unk>=0, <s>=1,
  </s>=2, <pad>=3``;
* an **existing** model such as the 32k Llama/Mistral ``tokenizer.model``
  (:meth:`Tokenizer.from_file`): missing special tokens are *appended* after the base
  vocabulary, so every base id keeps its meaning and its embedding row.

Design decisions (each one guards against a silent failure):

**Special tokens are sentencepiece control symbols, embedded in ``tokenizer.model``.**
``user_defined_symbols`` would be matched *inside ordinary text* by sentencepiece itself, so a
user typing ``<image>`` or ``<|im_end|>`` could inject placeholder or end-of-turn ids (prompt
injection, and images that no longer line up with their placeholders). Control symbols reserve
an id but :meth:`encode` never produces them from text; templates insert them by id. Because the
added pieces are written into the model file itself (no sidecar), ``tokenizer.model`` alone
restores the full vocabulary, as the checkpoint layout in DESIGN.md expects.
``encode(text, parse_special=True)`` is the explicit opt-in for trusted strings that spell
special tokens.

**Encoding is exact and concatenable.** The model's normaliser is set to
``add_dummy_prefix=False, remove_extra_whitespaces=False``. With the usual dummy prefix
sentencepiece encodes ``"42"`` as ``"▁42"``, so a chat template built from separately encoded
segments would decode with stray spaces after every special token (the leading-"▁" pitfall that
Hugging Face's ``legacy=False`` Llama tokenizer works around). Without it each segment is
encoded as it would be in the middle of a document, and for identity-normalised models
(Llama, Mistral, and every model :meth:`train` makes) ``decode(encode(a) + encode(b)) == a + b``.

Sentencepiece's Python package cannot edit a model without ``protobuf`` (not a minivlm
dependency), so the few edits are done on the protobuf wire format directly; see
:mod:`minivlm.text.spm_proto`. The interface shared with the ``tokenizer.json`` kind is
:class:`minivlm.text.tokenizer_base.TextTokenizer`.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from minivlm.text.spm_proto import edit_model_proto
from minivlm.text.tokenizer_base import (  # noqa: F401  (re-exported: the names predate the split)
    GLOBAL_IMAGE_TOKEN,
    IM_END_TOKEN,
    IM_START_TOKEN,
    IMAGE_TOKEN,
    PAD_TOKEN,
    VIDEO_TOKEN,
    TextTokenizer,
    tile_token,
    tile_tokens,
)

logger = logging.getLogger(__name__)

#: Tokens every minivlm tokenizer has (besides bos/eos/pad), in the id order they are reserved.
CHAT_SPECIAL_TOKENS: tuple[str, ...] = (IMAGE_TOKEN, VIDEO_TOKEN, IM_START_TOKEN, IM_END_TOKEN)

TOKENIZER_FILENAME = "tokenizer.model"


class Tokenizer(TextTokenizer):
    """A sentencepiece model plus minivlm's special tokens (the ``tokenizer.model`` kind).

    Build one with :meth:`train`, :meth:`from_file`, :meth:`from_bytes` or
    :meth:`from_pretrained`; the constructor takes a sentencepiece model whose special tokens are
    already in place.

    Example::

        tok = Tokenizer.train(corpus, vocab_size=1024)
        ids = tok.encode("What is the highest value?")
        assert tok.decode(ids) == "What is the highest value?"
    """

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes) -> None:
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._special_ids = frozenset(i for i in range(self._sp.get_piece_size()) if self._sp.is_control(i))
        self._special_by_token = {self._sp.id_to_piece(i): i for i in self._special_ids}
        longest_first = sorted(self._special_by_token, key=len, reverse=True)
        self._special_pattern = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")
        required = list(CHAT_SPECIAL_TOKENS) + ([] if self._sp.pad_id() >= 0 else [PAD_TOKEN])
        missing = [token for token in required if token not in self._special_by_token]
        if missing:
            raise ValueError(
                f"sentencepiece model lacks the control symbols {missing}; build the Tokenizer with "
                f"Tokenizer.from_bytes / from_file, which add them"
            )

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 1024,
        *,
        model_type: str = "bpe",
        byte_fallback: bool = True,
        max_tiles: int = 0,
        **trainer_options,
    ) -> "Tokenizer":
        """Train a sentencepiece model in memory (no files written).

        Args:
            texts: training sentences; newlines inside a text are kept as characters.
            vocab_size: target size including the special tokens and, with ``byte_fallback``,
                the 256 byte pieces. ``hard_vocab_limit=False`` is the default, so a corpus too
                small for the target yields a smaller vocabulary instead of an error.
            model_type: ``"bpe"`` or ``"unigram"`` (sentencepiece's ``model_type``).
            byte_fallback: encode unseen characters as UTF-8 byte pieces instead of ``<unk>``,
                so every string round-trips.
            max_tiles: also reserve the tile markers of :func:`tile_tokens` for image splitting.
            trainer_options: any other ``SentencePieceTrainer`` option, overriding the defaults.

        Ids: ``<unk>=0, <s>=1, </s>=2, <pad>=3``, then ``<image>, <video>, <|im_start|>,
        <|im_end|>`` and the tile markers, then the learnt pieces.
        """
        control_symbols = list(CHAT_SPECIAL_TOKENS) + tile_tokens(max_tiles)
        options = dict(
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            pad_piece=PAD_TOKEN,
            control_symbols=control_symbols,
            # Exact, concatenable encoding (see the module docstring).
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            # Every character of a small corpus gets a piece; the rest falls back to bytes.
            character_coverage=1.0,
            split_digits=True,
            hard_vocab_limit=False,
            minloglevel=2,
        )
        options.update(trainer_options)
        counted = _CountingIterator(texts)
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(sentence_iterator=counted, model_writer=model, **options)
        except RuntimeError as err:
            if counted.error is not None:  # sentencepiece reports the iterator's error as its own
                raise counted.error from None
            raise ValueError(f"sentencepiece training on {counted.count} texts failed: {err}") from err
        logger.info("trained a %s tokenizer on %d texts", model_type, counted.count)
        return cls(model.getvalue())

    @classmethod
    def from_bytes(cls, model_proto: bytes, *, max_tiles: int = 0, placed: dict[int, str] | None = None) -> "Tokenizer":
        """Load a serialised sentencepiece model, adding missing special tokens at the end.

        Base ids never move: ``<pad>`` (unless the model defines a pad piece), ``<image>``,
        ``<video>``, ``<|im_start|>``, ``<|im_end|>`` and, with ``max_tiles``, the tile markers
        get ids ``>= `` the base vocabulary size. Loading a model saved by :meth:`save` adds
        nothing. ``placed`` (id -> token, e.g. a Hugging Face ``added_tokens_decoder`` with
        ``<image>`` = 32000) puts those tokens at exactly those ids first; they must follow the
        base vocabulary without gaps.
        """
        if not isinstance(model_proto, (bytes, bytearray)):
            raise TypeError(f"expected the bytes of a sentencepiece model; got {type(model_proto).__name__}")
        if not model_proto:
            raise ValueError("expected the bytes of a sentencepiece model; got empty bytes")
        try:
            base = spm.SentencePieceProcessor(model_proto=bytes(model_proto))
        except RuntimeError as err:
            raise ValueError(f"not a sentencepiece model ({len(model_proto)} bytes): {err}") from err
        existing = {base.id_to_piece(i): i for i in range(base.get_piece_size())}
        first = [token for token_id, token in sorted((placed or {}).items()) if token_id >= base.get_piece_size()]
        ids = sorted(i for i in (placed or {}) if i >= base.get_piece_size())
        if ids != list(range(base.get_piece_size(), base.get_piece_size() + len(ids))):
            raise ValueError(f"added tokens must follow the base vocabulary of {base.get_piece_size()} without gaps; "
                             f"got ids {ids}")
        for token_id, token in (placed or {}).items():
            if token_id < base.get_piece_size() and base.id_to_piece(token_id) != token:
                raise ValueError(f"id {token_id} is {base.id_to_piece(token_id)!r} in the model, not {token!r}")
        wanted = first + [t for t in list(CHAT_SPECIAL_TOKENS) + tile_tokens(max_tiles) if t not in first]
        if base.pad_id() < 0 and PAD_TOKEN not in first:
            wanted.insert(len(first), PAD_TOKEN)
        to_add = []
        for token in wanted:
            if token not in existing:
                to_add.append(token)
            elif not base.is_control(existing[token]):
                raise ValueError(
                    f"the base vocabulary has {token!r} (id {existing[token]}) as an ordinary piece; "
                    f"minivlm needs it to be a control symbol so that text can never produce it"
                )
        if to_add:
            logger.info(
                "adding %d special tokens after the base vocabulary of %d: %s",
                len(to_add),
                base.get_piece_size(),
                to_add,
            )
        return cls(edit_model_proto(bytes(model_proto), to_add))

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, max_tiles: int = 0) -> "Tokenizer":
        """Load a ``.model`` file (any sentencepiece model); see :meth:`from_bytes`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no sentencepiece model at {path}")
        return cls.from_bytes(path.read_bytes(), max_tiles=max_tiles)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "Tokenizer":
        """Load ``directory/tokenizer.model`` written by :meth:`save_pretrained`."""
        return cls.from_file(Path(directory) / TOKENIZER_FILENAME)

    def to_bytes(self) -> bytes:
        """The serialised sentencepiece model, special tokens included."""
        return self._sp.serialized_model_proto()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model (a standard sentencepiece ``.model`` file) to ``path``."""
        path = Path(path)
        path.write_bytes(self.to_bytes())
        return path

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/tokenizer.model`` (the only file: special tokens are embedded)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        return self.save(directory / TOKENIZER_FILENAME)

    # Sentencepiece processors are not guaranteed to pickle; DataLoader workers need that.
    def __getstate__(self) -> dict:
        return {"model_proto": self.to_bytes()}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_proto"])

    # ---- vocabulary -----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, base vocabulary plus added special tokens."""
        return self._sp.get_piece_size()

    def has_token(self, token: str) -> bool:
        """True when ``token`` is one piece of the vocabulary."""
        token_id = self._sp.piece_to_id(token)
        return self._sp.id_to_piece(token_id) == token

    def token_to_id(self, token: str) -> int:
        """Id of the piece ``token``; raises ``KeyError`` naming it when absent."""
        if token in self._special_by_token:  # the template's hot path
            return self._special_by_token[token]
        if not self.has_token(token):
            raise KeyError(f"{token!r} is not in the vocabulary of {self.vocab_size} pieces")
        return self._sp.piece_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        """The piece string of ``token_id``."""
        self.check_id(token_id)
        return self._sp.id_to_piece(token_id)

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or None when the model defines none."""
        return self._sp.bos_id() if self._sp.bos_id() >= 0 else None

    @property
    def eos_id(self) -> int | None:
        """End-of-sequence id, or None when the model defines none."""
        return self._sp.eos_id() if self._sp.eos_id() >= 0 else None

    @property
    def pad_id(self) -> int:
        """The model's own pad piece when it defines one, else the added ``<pad>``."""
        return self._sp.pad_id() if self._sp.pad_id() >= 0 else self._special_by_token[PAD_TOKEN]

    @property
    def image_token_id(self) -> int:
        return self._special_by_token[IMAGE_TOKEN]

    @property
    def end_of_turn_id(self) -> int:
        return self._special_by_token[IM_END_TOKEN]

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of every control symbol: bos/eos/pad, minivlm's tokens, the base model's own."""
        return self._special_ids

    # ---- encode / decode ------------------------------------------------------------------
    def encode(
        self, text: str, *, add_bos: bool = False, add_eos: bool = False, parse_special: bool = False
    ) -> list[int]:
        """Token ids of ``text``.

        Special-token strings inside ``text`` (``"<image>"``, ``"<|im_end|>"``...) are encoded
        as ordinary text unless ``parse_special=True``: user-written text can never produce a
        placeholder or end-of-turn id. No dummy-prefix space is added (module docstring).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str; got {type(text).__name__}")
        if parse_special:
            ids = []
            for i, chunk in enumerate(self._special_pattern.split(text)):
                # re.split with one capture group alternates text, special, text, ...
                if i % 2:
                    ids.append(self._special_by_token[chunk])
                elif chunk:
                    ids.extend(self._sp.encode(chunk))
        else:
            ids = self._sp.encode(text)
        if add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos=True but this sentencepiece model defines no bos token")
            ids.insert(0, self.bos_id)
        if add_eos:
            if self.eos_id is None:
                raise ValueError("add_eos=True but this sentencepiece model defines no eos token")
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list, or a 1-d tensor/array); special tokens appear as their strings.

        Ordinary ids are decoded in runs by sentencepiece (byte pieces of one character must be
        decoded together); control symbols, which sentencepiece would drop, are written out by
        name unless ``skip_special_tokens``.
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        pieces: list[str] = []
        run: list[int] = []
        for token_id in ids:
            token_id = int(token_id)
            self.check_id(token_id)
            if token_id in self._special_ids:
                if run:
                    pieces.append(self._sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    pieces.append(self._sp.id_to_piece(token_id))
            else:
                run.append(token_id)
        if run:
            pieces.append(self._sp.decode(run))
        return "".join(pieces)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, pad_id={self.pad_id}, image_token_id={self.image_token_id}, "
            f"im_start_id={self.im_start_id}, im_end_id={self.im_end_id}, max_tiles={self.max_tiles})"
        )


class _CountingIterator(Iterator[str]):
    """Feeds texts to the trainer, checking their type and counting them for error messages."""

    def __init__(self, texts: Iterable[str]) -> None:
        if isinstance(texts, str):
            raise TypeError("Tokenizer.train expects an iterable of texts, not a single str")
        self._texts = iter(texts)
        self.count = 0
        self.error: TypeError | None = None

    def __next__(self) -> str:
        text = next(self._texts)
        if not isinstance(text, str):
            self.error = TypeError(f"training text #{self.count} is a {type(text).__name__}, expected str")
            raise self.error
        self.count += 1
        return text
