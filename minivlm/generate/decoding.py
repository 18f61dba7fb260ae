"""Decoding over the static KV cache: prefill, decode steps, token streams, ``generate``.

Two phases, as in gpt-fast, both one :meth:`~minivlm.model.VisionLanguageModel.forward` with a
:class:`~minivlm.layers.kv_cache.StaticKVCache`:

* **prefill** (:func:`prefill`): the whole prompt. Images are encoded here and only here; their
  keys stay in the cache (splice and prefix fusion) or with the fusion (cross-attention).
* **decode** (:func:`decode_step`): one token per row. The cache writes at a tensor column.
  Eager, attention reads the columns written so far, unmasked unless a prompt was padded;
  compiled, it reads the cache's whole buffer under its key mask, so every step has the same
  shapes and Python state: ``torch.compile`` (and CUDA graphs) capture one graph for every step
  (``GenerationConfig(compile=True)``).

Prompts of different lengths are left-padded so every row's next token comes from the last
column; the cache counts real tokens for the rotary positions, so a padded row decodes exactly as
the same prompt alone. The arguments are checked where they enter (:func:`check_prompt`), so the
forwards run without value checks (``validate=False``) and without a host sync.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from minivlm.generate.config import GenerationConfig
from minivlm.generate.sampling import pick_tokens, process_logits
from minivlm.layers.kv_cache import StaticKVCache
from minivlm.layers.packed_linear import PackedLinears


def prefill(model, cache: StaticKVCache, input_ids: Tensor, attention_mask: Tensor | None,
            pixel_values: Tensor | None) -> Tensor:
    """Run the prompt (and encode its images, once) into an empty ``cache``.

    ``input_ids, attention_mask [B, T]`` left-padded, ``pixel_values [N, C, H, W]`` or None.
    Returns ``[B, V]`` float32 next-token logits.
    """
    hidden = model(input_ids, pixel_values=pixel_values, attention_mask=attention_mask, cache=cache,
                   return_logits=False, validate=False).hidden
    return model.decoder.logits(hidden[:, -1]).float()


def decode_step(model, cache: StaticKVCache, tokens: Tensor) -> Tensor:
    """One new token per row: ``model.forward`` with the cache.

    Args:
        model: a :class:`~minivlm.model.VisionLanguageModel`.
        cache: the cache :func:`prefill` filled; this step writes its next column.
        tokens: ``[B]`` the newest token of each row.
    Returns:
        ``[B, V]`` float32 next-token logits.
    """
    hidden = model(tokens[:, None], cache=cache, return_logits=False, validate=False).hidden
    return model.decoder.logits(hidden[:, -1]).float()


@functools.lru_cache(maxsize=None)
def compiled_decode_step(backend: str = "inductor", mode: str | None = None) -> Callable[..., Tensor]:
    """:func:`decode_step` through ``torch.compile`` (one wrapper per backend and mode)."""
    options: dict[str, Any] = {"backend": backend, "dynamic": False}
    if mode is not None:
        options["mode"] = mode
    return torch.compile(decode_step, **options)


def check_prompt(model, input_ids: Tensor, attention_mask: Tensor | None, pixel_values: Tensor | None,
                 config: GenerationConfig) -> Tensor:
    """Validate a generation prompt before any compute; return the boolean attention mask.

    Raises:
        ValueError: ids not ``[B, T]`` integers, a mask of another shape or not left-padded, a
            prompt that leaves no room for ``max_new_tokens`` in the model's context, or image
            placeholders that do not match ``pixel_values``.
    """
    if not isinstance(input_ids, Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be an integer tensor [B, T]; got {_describe(input_ids)}")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"input_ids must hold at least one token per row; got shape {list(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must match input_ids {list(input_ids.shape)}; got {_describe(attention_mask)}")
    attention_mask = attention_mask.bool()
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("generation needs left-padded prompts (padding_side='left'): the last column of "
                         "attention_mask must be 1 in every row")
    context = model.config.decoder.max_seq_len
    if T + config.max_new_tokens > context:
        raise ValueError(f"a prompt of {T} tokens plus max_new_tokens={config.max_new_tokens} exceeds the model's "
                         f"context of {context} tokens; shorten the prompt (fewer images or turns) or lower "
                         f"max_new_tokens")
    model.check_inputs(input_ids, pixel_values)  # ids inside the vocabulary, placeholders matching the images
    return attention_mask


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__


def stream_tokens(model, input_ids: Tensor, attention_mask: Tensor | None = None,
                  pixel_values: Tensor | None = None, config: GenerationConfig | None = None,
                  text_vocab: int | None = None) -> Iterator[Tensor]:
    """The next token of every row, ``[B]``, one decode step at a time.

    Arguments are checked here, before any compute (:func:`check_prompt`); the model runs as the
    iterator is consumed. Rows keep producing tokens after their end-of-turn token: callers stop
    reading them (:func:`generate`). The cache lives in the iterator, and gradients are disabled
    only while it computes (inference mode), never across a ``yield``: abandoning it at any point leaves the model
    and the caller's autograd state as they were.

    Args:
        input_ids: ``[B, T]`` left-padded prompt ids with image placeholders.
        attention_mask: ``[B, T]``, 0 on padding (None: no padding).
        pixel_values: ``[N, C, H, W]`` the views of every placeholder run, in order.
        config: decoding settings.
        text_vocab: the tokenizer's vocabulary size; ids from it up to the model's (padded)
            vocabulary are never generated: no tokenizer could decode them.
    """
    config = (config or GenerationConfig()).validate()
    attention_mask = check_prompt(model, input_ids, attention_mask, pixel_values, config)
    return _decode(model, input_ids, attention_mask, pixel_values, config, text_vocab)


def _decode(model, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None,
            config: GenerationConfig, text_vocab: int | None = None, *, hold: bool = False) -> Iterator[Tensor]:
    """The decode loop of :func:`stream_tokens` (arguments already checked).

    ``hold``: stay in inference mode with the packed weights attached from the first token to the
    last, across the yields, instead of entering both around each token (~1% of a token's time at
    the benchmark's small shapes). Only for a consumer that runs no code of its caller between tokens
    (:func:`generate`); it must close the iterator, which leaves both.
    """
    device = model.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    if pixel_values is not None:
        pixel_values = pixel_values.to(device)
    B, T = input_ids.shape
    # A compiled step needs one cache length for every prompt; eager decoding sizes it to fit.
    max_len = model.config.decoder.max_seq_len if config.compile else T + config.max_new_tokens
    step = decode_step
    generator = torch.Generator(device).manual_seed(config.seed) if config.seed is not None else None
    vocab = model.config.decoder.vocab_size
    # Eager steps run the packed projections (one product for q/k/v, one for gate/up, weights
    # stored transposed); a compiled step fuses the separate ones itself.
    packs = contextlib.nullcontext() if config.compile else PackedLinears.for_model(model)
    # inference_mode, not no_grad: no autograd bookkeeping per op (decode is op-bound at small sizes).
    mode = torch.inference_mode()  # one object, entered once per token (or once: hold)
    with contextlib.ExitStack() as held:
        if hold:
            held.enter_context(mode)
            held.enter_context(packs)
            mode = packs = contextlib.nullcontext()
        with mode:
            cache = model.decoder.new_cache(B, max_len)
            if config.compile:
                # CUDA graphs replay fixed addresses: the buffers each step writes in place must stay put
                # (inputs mutated at unmarked addresses make inductor skip CUDA graphs).
                for buffer in cache.buffers():
                    torch._dynamo.mark_static_address(buffer)
                step = compiled_decode_step(config.compile_backend, config.compile_mode)
            with packs:
                logits = prefill(model, cache, input_ids, attention_mask, pixel_values)
            seen = torch.zeros(B, vocab, dtype=torch.bool, device=device) if config.repetition_penalty != 1 else None
            # An image placeholder without an image breaks the fusion's bookkeeping: never generate one.
            suppress = torch.zeros(vocab, dtype=torch.bool, device=device)
            suppress[model.config.image_token_id] = True
            if text_vocab is not None:
                suppress[text_vocab:] = True  # rows padding a published model's vocabulary have no token
        tokens = None
        for _ in range(config.max_new_tokens):
            # One inference-mode block per token (entering one costs as much as a small op): the step
            # that consumes the previous token runs only once the caller asks for the next one.
            with mode, packs:
                if tokens is not None:
                    logits = step(model, cache, tokens)
                # The step's logits are its own fresh tensor: masking them in place saves a copy.
                tokens = pick_tokens(process_logits(logits.masked_fill_(suppress, float("-inf")), config, seen),
                                     config, generator)
                if seen is not None:
                    seen.scatter_(1, tokens[:, None], True)
            yield tokens


@dataclass
class GenerationOutput:
    """What :func:`generate` returns, one entry per row.

    tokens: the new tokens, end-of-turn excluded; a stop string's tokens included.
    texts: decoded replies cut before the first stop string (None without a tokenizer).
    finish_reasons: ``"eos"``, ``"stop_string"`` or ``"length"``.
    """

    tokens: list[list[int]]
    texts: list[str] | None
    finish_reasons: list[str]


class ReplyText:
    """The text of one reply as its tokens arrive, cut before the first stop string.

    :meth:`stable_text` is what a stream may show already: it holds back a trailing incomplete
    UTF-8 character (decoded as U+FFFD until its last byte arrives) and a trailing piece that
    could be the start of a stop string, so what has been shown is always a prefix of the
    final :meth:`text`.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.tokens: list[int] = []
        self._decoded = ""

    def add(self, token: int) -> bool:
        """Append a token; True once the text contains a stop string."""
        self.tokens.append(token)
        self._decoded = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        return any(s in self._decoded for s in self.stop_strings)

    def text(self) -> str:
        cut = min((self._decoded.find(s) for s in self.stop_strings if s in self._decoded), default=len(self._decoded))
        return self._decoded[:cut]

    def stable_text(self) -> str:
        text = self.text().rstrip("\ufffd")
        held = max((n for s in self.stop_strings for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        return text[: len(text) - held]


def generate(model, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
             config: GenerationConfig | None = None, *, eos_ids: Sequence[int] = (), tokenizer: Any = None
             ) -> GenerationOutput:
    """Decode every row until an ``eos_ids`` token, a stop string (needs ``tokenizer``) or ``max_new_tokens``.

    Args:
        input_ids, attention_mask, pixel_values, config: as :func:`stream_tokens`.
        eos_ids: tokens that end a row (not included in its output).
        tokenizer: decodes the replies (``texts``) and finds stop strings.
    """
    config = (config or GenerationConfig()).validate()
    if config.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated text")
    attention_mask = check_prompt(model, input_ids, attention_mask, pixel_values, config)
    # This loop reads the tokens and runs no caller code in between: the stream may hold inference
    # mode and the packed weights from the first token to the last (closed below, whatever happens).
    stream = _decode(model, input_ids, attention_mask, pixel_values, config,
                     len(tokenizer) if tokenizer is not None else None, hold=True)
    B = input_ids.shape[0]
    replies = [ReplyText(tokenizer, config.stop_strings) if tokenizer is not None else None for _ in range(B)]
    tokens: list[list[int]] = [[] for _ in range(B)]
    reasons: list[str | None] = [None] * B
    eos = set(eos_ids)
    with closing(stream):
        for step in stream:
            for row, token in enumerate(step.tolist()):
                if reasons[row] is not None:
                    continue
                if token in eos:
                    reasons[row] = "eos"
                    continue
                tokens[row].append(token)
                if replies[row] is not None and replies[row].add(token):
                    reasons[row] = "stop_string"
            if all(r is not None for r in reasons):
                break
    texts = [r.text() for r in replies] if tokenizer is not None else None
    return GenerationOutput(tokens, texts, [r or "length" for r in reasons])
