"""Text generation: decoding over the static KV cache, streaming, the chat API, likelihood scoring.

One idea per module:

* :mod:`~minivlm.generate.config`: :class:`GenerationConfig`, the decoding settings;
* :mod:`~minivlm.generate.sampling`: logits to tokens (repetition penalty, temperature, top-k, top-p);
* :mod:`~minivlm.generate.decoding`: prefill and decode steps (each one ``model.forward`` with a
  :class:`~minivlm.layers.kv_cache.StaticKVCache`), token streams, :func:`generate`;
* :mod:`~minivlm.generate.chat`: conversations in the Hugging Face message format (:func:`chat`,
  :func:`chat_batch`, :func:`chat_stream`, :class:`ChatSession`);
* :mod:`~minivlm.generate.scoring`: log-probabilities of given answers (:func:`continuation_logprobs`,
  :func:`logprob_fn`), for multiple-choice evaluation (:mod:`minivlm.eval.choice`).
"""

from minivlm.generate.chat import ChatSession, Messages, chat, chat_batch, chat_stream, processor_of
from minivlm.generate.config import GENERATION_OPTIONS, GenerationConfig, generation_config
from minivlm.generate.decoding import (
    GenerationOutput,
    ReplyText,
    check_prompt,
    compiled_decode_step,
    decode_step,
    generate,
    prefill,
    stream_tokens,
)
from minivlm.generate.sampling import pick_tokens, process_logits
from minivlm.generate.scoring import continuation_logprobs, logprob_fn

__all__ = [
    "GENERATION_OPTIONS",
    "ChatSession",
    "GenerationConfig",
    "GenerationOutput",
    "Messages",
    "ReplyText",
    "chat",
    "chat_batch",
    "chat_stream",
    "check_prompt",
    "compiled_decode_step",
    "continuation_logprobs",
    "decode_step",
    "generate",
    "generation_config",
    "logprob_fn",
    "pick_tokens",
    "prefill",
    "process_logits",
    "processor_of",
    "stream_tokens",
]
