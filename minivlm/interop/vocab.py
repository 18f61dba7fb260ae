"""Vocabulary growth: make room in a pretrained decoder for added special tokens.

When a chat template or image placeholder adds tokens to a pretrained tokenizer, the embedding
(and an untied LM head) gain rows. New rows start at the **mean** of the existing rows, the
initialisation Hewitt (2021, "Initializing new word embeddings for pretrained language models")
recommends: a random row can dominate the softmax and spike the loss, while the mean keeps the
model's predictions nearly unchanged until the new tokens are trained. Unlike transformers'
``resize_token_embeddings`` (which samples around the mean) this is deterministic.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from minivlm.decoders.llama import LlamaDecoder

log = logging.getLogger(__name__)


def _grown(weight: Tensor, new_rows: int) -> nn.Parameter:
    """``[V, D] -> [V + new_rows, D]``: the old rows, then copies of their mean (computed in fp32)."""
    mean = weight.detach().float().mean(dim=0, keepdim=True).to(weight.dtype)
    data = torch.cat([weight.detach(), mean.expand(new_rows, -1)], dim=0)
    return nn.Parameter(data, requires_grad=weight.requires_grad)


def resize_token_embeddings(model_or_decoder: nn.Module, new_vocab_size: int) -> nn.Embedding:
    """Grow the decoder's vocabulary to ``new_vocab_size`` rows in place.

    Args:
        model_or_decoder: a :class:`~minivlm.model.VisionLanguageModel` or a :class:`LlamaDecoder`.
        new_vocab_size: at least the current vocabulary size (equal: nothing changes).

    Returns:
        The decoder's embedding. New rows of the embedding (and of an untied head) hold the mean
        of the old rows; a tied head stays the very same ``Parameter`` as the embedding;
        ``config.decoder.vocab_size`` is updated. Build the optimizer after resizing: the grown
        tensors are new ``Parameter`` objects.

    Raises:
        TypeError: for a module that is neither a VLM nor a Llama decoder.
        ValueError: for a size below the current one (shrinking would orphan token ids).
    """
    decoder = getattr(model_or_decoder, "decoder", model_or_decoder)
    if not isinstance(decoder, LlamaDecoder):
        raise TypeError(f"expected a VisionLanguageModel or LlamaDecoder; got {type(model_or_decoder).__name__}")
    old = decoder.embed.num_embeddings
    if isinstance(new_vocab_size, bool) or not isinstance(new_vocab_size, int) or new_vocab_size < old:
        raise ValueError(f"new_vocab_size must be an integer >= the current vocabulary size {old}; "
                         f"got {new_vocab_size!r}")
    if new_vocab_size == old:
        return decoder.embed
    added = new_vocab_size - old
    tied = decoder.lm_head.weight is decoder.embed.weight
    decoder.embed.weight = _grown(decoder.embed.weight, added)
    decoder.embed.num_embeddings = new_vocab_size
    decoder.lm_head.weight = decoder.embed.weight if tied else _grown(decoder.lm_head.weight, added)
    decoder.lm_head.out_features = new_vocab_size
    decoder.cfg.vocab_size = new_vocab_size
    config = getattr(model_or_decoder, "config", None)
    if config is not None:
        config.decoder.vocab_size = new_vocab_size
    log.info("grew the vocabulary from %d to %d tokens (%s head); new rows start at the mean embedding",
             old, new_vocab_size, "tied" if tied else "untied")
    return decoder.embed
