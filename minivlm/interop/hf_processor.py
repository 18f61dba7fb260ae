"""A minivlm :class:`~minivlm.text.processor.Processor` from a Hugging Face checkpoint's own
processor files: ``tokenizer.json`` (or ``tokenizer.model``) + ``tokenizer_config.json``, the
image processor settings (``preprocessor_config.json``, or transformers v5's
``processor_config.json`` with an ``"image_processor"`` section) and ``image_seq_len``.

The chat template is minivlm's template of the model family (:mod:`minivlm.text.templates`); the
checkpoint's own Jinja template, when present and ``jinja2`` is installed, is rendered on a few
probe conversations and compared with it, and a difference is an error naming the first probe
that differs: a silently different prompt format is the failure this guards against.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from minivlm.config import VLMConfig
from minivlm.registry import image_seq_len as model_image_seq_len
from minivlm.text.hf_tokenizer import TOKENIZER_JSON, HFTokenizer
from minivlm.text.processor import Processor
from minivlm.text.templates import ChatTemplate

log = logging.getLogger(__name__)

#: PIL resampling enum values as transformers saves them.
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def hf_processor_files(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(image processor settings, processor settings)`` of a Hugging Face checkpoint ({} if absent)."""
    processor = read_json(directory / "processor_config.json") if (directory / "processor_config.json").is_file() else {}
    image = dict(processor.pop("image_processor", {}))
    if (directory / "preprocessor_config.json").is_file():
        image = {**read_json(directory / "preprocessor_config.json"), **image}
    return image, processor


def hf_chat_template(directory: Path) -> str | None:
    """The checkpoint's Jinja chat template (``chat_template.jinja`` / ``.json`` / tokenizer config)."""
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        if (directory / name).is_file():
            template = read_json(directory / name).get("chat_template")
            if isinstance(template, str):
                return template
    return None


def resample_name(value: Any, default: str) -> str:
    if value is None:
        return default
    if isinstance(value, int):
        if value not in PIL_RESAMPLE:
            raise ValueError(f"unsupported resample {value} (PIL enum); expected one of {PIL_RESAMPLE}")
        return PIL_RESAMPLE[value]
    return str(value).lower()


def load_hf_tokenizer(directory: Path, extra_tokens: list[str], **roles: str | None) -> HFTokenizer:
    """``tokenizer.json`` with ``extra_tokens`` added as special tokens when absent."""
    if not (directory / TOKENIZER_JSON).is_file():
        raise FileNotFoundError(f"{directory} has no {TOKENIZER_JSON}; minivlm reads Hugging Face tokenizers from it")
    return HFTokenizer.from_pretrained(directory).with_special_tokens(extra_tokens, **roles)


PROBES: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "Describe"}, {"type": "image"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
     {"role": "user", "content": [{"type": "text", "text": "And its size?"}]}],
    [{"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
     {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
]


def check_template(jinja: str | None, template: ChatTemplate, source: str, special: dict[str, str]) -> None:
    """Render :data:`PROBES` with ``jinja`` and with ``template``; raise if they differ."""
    if not jinja:
        return
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:  # jinja2 is optional for minivlm itself
        log.info("jinja2 is not installed: the %s chat template is not compared with minivlm's %r", source,
                 template.kind)
        return
    from minivlm.text.chat import normalize_messages
    from minivlm.text.segments import MediaSegment, segments_to_text

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = lambda message: (_ for _ in ()).throw(ValueError(message))
    # transformers' {% generation %} marker renders its body unchanged.
    compiled = env.from_string(jinja.replace("{% generation %}", "").replace("{% endgeneration %}", ""))
    for probe in PROBES:
        try:
            theirs = compiled.render(messages=probe, add_generation_prompt=True, **special)
        except Exception as err:  # noqa: BLE001 - a template that cannot render a probe is not comparable
            log.info("the %s chat template does not render probe %s (%s); not compared", source, probe, err)
            continue
        filled = [{**m, "content": [dict(c, image="x") if c["type"] == "image" else c for c in m["content"]]}
                  for m in probe]
        segments = template.segments(normalize_messages(filled), add_generation_prompt=True)
        ours = segments_to_text([s if not isinstance(s, MediaSegment) else _placeholder(template) for s in segments])
        if ours != theirs:
            raise ValueError(f"{source}: the checkpoint's chat template renders {theirs!r} but minivlm's "
                             f"{template.kind!r} template renders {ours!r}")


def _placeholder(template: ChatTemplate):
    from minivlm.text.segments import TextSegment

    return TextSegment(template.image_token)


def build_processor(directory: Path, config: VLMConfig, tokenizer: Any, image_processor: Any,
                    template: ChatTemplate, image_seq_len: int) -> Processor:
    """A Processor, checked against the model: image token id and vocabulary size."""
    if tokenizer.image_token_id != config.image_token_id:
        raise ValueError(f"{directory}: the tokenizer's {tokenizer.image_token!r} is id {tokenizer.image_token_id} but "
                         f"the model's image_token_id is {config.image_token_id}")
    if tokenizer.vocab_size > config.decoder.vocab_size:
        raise ValueError(f"{directory}: the tokenizer has {tokenizer.vocab_size} ids but the model's embedding only "
                         f"{config.decoder.vocab_size} rows")
    if image_seq_len != model_image_seq_len(config):
        raise ValueError(f"{directory}: image_seq_len={image_seq_len} in the processor files but the model turns a view "
                         f"into {model_image_seq_len(config)} tokens")
    return Processor(tokenizer, image_processor, image_seq_len, max_length=config.decoder.max_seq_len,
                     template=template)
