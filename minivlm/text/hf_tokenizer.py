"""A Hugging Face ``tokenizers`` model (``tokenizer.json``) behind minivlm's tokenizer interface.

The kind SmolLM2 / SmolVLM, nanoVLM and llava-hf checkpoints ship. Ids are the file's own: the
base vocabulary and every added token keep theirs; tokens a template needs but the file lacks
are appended after the last id (:meth:`HFTokenizer.with_special_tokens`), as transformers'
``add_special_tokens`` does.

Which token plays which role (image placeholder, end of turn, pad, bos, eos) is not in
``tokenizer.json``; it is saved beside it in ``tokenizer_config.json`` under the keys
transformers reads (``bos_token``, ``eos_token``, ``pad_token``, ``image_token``) plus
``end_of_turn_token``.

Encoding follows transformers' processors exactly where they are defined: a rendered prompt is
encoded as one string with added tokens split out (:meth:`encode_with_offsets`), so text next
to text is tokenised together as ``tokenizer(prompt)`` does. Ordinary text alone
(:meth:`encode`) goes through a copy of the model *without* its added tokens, so a user typing
``<image>`` or ``<end_of_utterance>`` gets those characters, never the special ids. A
Metaspace pre-tokenizer with ``prepend_scheme="first"`` marks only the start of the whole input;
text that follows a special token is encoded with ``"never"``, as the library does for it.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as _LibTokenizer

from minivlm.text.tokenizer_base import IM_END_TOKEN, IMAGE_TOKEN, TextTokenizer

log = logging.getLogger(__name__)

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
#: Roles saved in tokenizer_config.json; the first four are transformers' own keys.
ROLES = ("bos_token", "eos_token", "pad_token", "unk_token", "image_token", "end_of_turn_token")


def _token_content(value: Any) -> str | None:
    """transformers writes a special token as a string or as ``{"content": ...}``."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value if isinstance(value, str) else None


def _without_first_prepend(node: Any) -> Any:
    """A copy of a pre-tokenizer description with Metaspace ``prepend_scheme="first"`` -> ``"never"``."""
    if isinstance(node, dict):
        out = {k: _without_first_prepend(v) for k, v in node.items()}
        if out.get("type") == "Metaspace" and out.get("prepend_scheme") == "first":
            out["prepend_scheme"] = "never"
        return out
    if isinstance(node, list):
        return [_without_first_prepend(v) for v in node]
    return node


class HFTokenizer(TextTokenizer):
    """``tokenizer.json`` + named roles. Build with :meth:`from_pretrained` (a directory) or
    :meth:`from_json` (the file's text and the roles)."""

    kind = "hf"
    joint_text_runs = True

    def __init__(self, tokenizer_json: str, roles: Mapping[str, str | None]) -> None:
        self._json = tokenizer_json
        self._lib = _LibTokenizer.from_str(tokenizer_json)
        spec = json.loads(tokenizer_json)
        added = spec.get("added_tokens") or []
        self._added = {t["content"]: t["id"] for t in added}
        self._special_ids = frozenset(t["id"] for t in added if t.get("special", False))
        self._added_ids = frozenset(self._added.values())
        # Plain text goes through the model without added tokens (see the module docstring).
        plain = dict(spec, added_tokens=[], post_processor=None)
        self._plain_first = _LibTokenizer.from_str(json.dumps(plain))
        rest = dict(plain, pre_tokenizer=_without_first_prepend(plain.get("pre_tokenizer")))
        self._plain_rest = _LibTokenizer.from_str(json.dumps(rest))
        unknown = sorted(set(roles) - set(ROLES))
        if unknown:
            raise ValueError(f"unknown tokenizer role(s) {unknown}; expected some of {list(ROLES)}")
        self._roles = {k: v for k, v in roles.items() if v is not None}
        missing = [f"{role}={token!r}" for role, token in self._roles.items() if not self.has_token(token)]
        if missing:
            raise ValueError(f"tokenizer.json has no token for {', '.join(missing)}")
        if "pad_token" not in self._roles and "eos_token" not in self._roles:
            raise ValueError("the tokenizer needs a pad_token or an eos_token to pad batches with")
        probe_plain = self._lib.encode("a", add_special_tokens=False).ids
        probe_full = self._lib.encode("a", add_special_tokens=True).ids
        cut = next((i for i in range(len(probe_full)) if probe_full[i:i + len(probe_plain)] == probe_plain), 0)
        self._prefix = probe_full[:cut]
        self._suffix = probe_full[cut + len(probe_plain):]

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_json(cls, tokenizer_json: str, **roles: str | None) -> "HFTokenizer":
        return cls(tokenizer_json, roles)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **roles: str | None) -> "HFTokenizer":
        """Load ``tokenizer.json`` and the roles of ``tokenizer_config.json`` (``roles`` override them)."""
        directory = Path(directory)
        path = directory / TOKENIZER_JSON
        if not path.is_file():
            raise FileNotFoundError(f"no {TOKENIZER_JSON} in {directory}")
        config = read_tokenizer_config(directory)
        found = {role: _token_content(config.get(role)) for role in ROLES}
        return cls(path.read_text(encoding="utf-8"), {**{k: v for k, v in found.items() if v}, **roles})

    def with_special_tokens(self, tokens: Sequence[str], **roles: str | None) -> "HFTokenizer":
        """A copy with ``tokens`` added as special tokens when absent (appended after the last id,
        in order, like transformers' ``add_special_tokens``) and ``roles`` updated."""
        lib = _LibTokenizer.from_str(self._json)
        missing = [t for t in dict.fromkeys(tokens) if not self.has_token(t)]
        if missing:
            lib.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
            log.info("added %d special token(s) after id %d: %s", len(missing), self.vocab_size - 1, missing[:8])
        return HFTokenizer(lib.to_str(), {**self._roles, **roles})

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` and the roles into ``tokenizer_config.json`` (other keys kept)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / TOKENIZER_JSON).write_text(self._json, encoding="utf-8")
        config = read_tokenizer_config(directory)
        config.update({"tokenizer_class": config.get("tokenizer_class", "PreTrainedTokenizerFast"), **self._roles})
        (directory / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return directory / TOKENIZER_JSON

    def __getstate__(self) -> dict:
        return {"json": self._json, "roles": self._roles}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["json"], state["roles"])

    def __deepcopy__(self, memo: dict) -> "HFTokenizer":
        return HFTokenizer(self._json, copy.deepcopy(self._roles, memo))

    # ---- vocabulary --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._lib.get_vocab_size(with_added_tokens=True)

    @property
    def roles(self) -> dict[str, str]:
        return dict(self._roles)

    @property
    def added_ids(self) -> frozenset[int]:
        """Ids of the added tokens (special or not): the ids text is split at."""
        return self._added_ids

    def has_token(self, token: str) -> bool:
        return self._lib.token_to_id(token) is not None

    def token_to_id(self, token: str) -> int:
        token_id = self._lib.token_to_id(token)
        if token_id is None:
            raise KeyError(f"{token!r} is not in the vocabulary of {self.vocab_size} tokens")
        return token_id

    def id_to_token(self, token_id: int) -> str:
        self.check_id(token_id)
        return self._lib.id_to_token(token_id)

    def _role_id(self, role: str) -> int | None:
        token = self._roles.get(role)
        return None if token is None else self.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._role_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._role_id("eos_token")

    @property
    def pad_id(self) -> int:
        pad = self._role_id("pad_token")
        return pad if pad is not None else self._role_id("eos_token")

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special_ids

    @property
    def image_token(self) -> str:
        return self._roles.get("image_token", IMAGE_TOKEN)

    @property
    def end_of_turn_token(self) -> str:
        return self._roles.get("end_of_turn_token") or self._roles.get("eos_token") or IM_END_TOKEN

    @property
    def prefix_ids(self) -> list[int]:
        return list(self._prefix)

    @property
    def suffix_ids(self) -> list[int]:
        return list(self._suffix)

    # ---- encode / decode ---------------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False, parse_special: bool = False,
               at_start: bool = True) -> list[int]:
        """Ids of ``text``. ``at_start=False`` encodes it as text that follows a special token
        (no Metaspace ``"first"`` prefix)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str; got {type(text).__name__}")
        if parse_special:
            ids = self._lib.encode(text, add_special_tokens=False).ids
        else:
            ids = (self._plain_first if at_start else self._plain_rest).encode(text, add_special_tokens=False).ids
        for wanted, token_id, where in ((add_bos, self.bos_id, "bos"), (add_eos, self.eos_id, "eos")):
            if wanted and token_id is None:
                raise ValueError(f"add_{where}=True but this tokenizer defines no {where}_token")
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoding = self._lib.encode(text, add_special_tokens=False)
        return list(encoding.ids), [tuple(o) for o in encoding.offsets]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        for token_id in ids:
            self.check_id(token_id)
        return self._lib.decode(ids, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return (f"HFTokenizer(vocab_size={self.vocab_size}, pad_id={self.pad_id}, image_token={self.image_token!r}, "
                f"end_of_turn_token={self.end_of_turn_token!r})")


def read_tokenizer_config(directory: Path) -> dict[str, Any]:
    """``tokenizer_config.json`` of ``directory`` as a dict ({} when absent)."""
    path = Path(directory) / TOKENIZER_CONFIG
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
