"""Export a minivlm decoder as a Hugging Face Llama checkpoint directory.

The result (``config.json`` + ``model.safetensors``, plus ``tokenizer.model`` when given) loads
with ``transformers.LlamaForCausalLM.from_pretrained`` and computes the same logits; the key
table is :func:`minivlm.interop.hf_llama.llama_key_pairs`, the one the importer reads with, so the
round trip is exact by construction and checked by tests/interop/test_export.py.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from minivlm.config import DecoderConfig
from minivlm.decoders.llama import LlamaDecoder
from minivlm.interop.hf_llama import llama_key_pairs

log = logging.getLogger(__name__)

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def hf_llama_config(config: DecoderConfig, dtype: torch.dtype = torch.float32, **token_ids: int | None) -> dict[str, Any]:
    """The ``config.json`` dict of a ``LlamaForCausalLM`` with this decoder's shapes.

    RoPE theta is written both as transformers v4's ``rope_theta`` and v5's ``rope_parameters``
    so either major version reads it. ``token_ids`` (``bos_token_id=1, eos_token_id=2, ...``)
    are copied in when given.
    """
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {list(_DTYPE_NAMES)}; got {dtype}")
    unknown = sorted(set(token_ids) - {"bos_token_id", "eos_token_id", "pad_token_id"})
    if unknown:
        raise ValueError(f"unknown token id field(s) {unknown}; expected bos_token_id, eos_token_id, pad_token_id")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.width,
        "intermediate_size": config.mlp_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": _DTYPE_NAMES[dtype],
        **{k: v for k, v in token_ids.items() if v is not None},
    }


def decoder_state_to_hf(state: Mapping[str, Tensor], config: DecoderConfig) -> dict[str, Tensor]:
    """Pure key mapping: minivlm decoder keys -> ``LlamaForCausalLM`` keys (tied head omitted, as HF saves it).

    Raises:
        KeyError: listing every minivlm key the layout needs but ``state`` lacks.
    """
    pairs = llama_key_pairs(config)
    lacking = [ours for _, ours in pairs if ours not in state]
    if lacking:
        raise KeyError(f"the decoder state lacks {len(lacking)} key(s) the layout needs: {', '.join(lacking)}")
    return {theirs: state[ours] for theirs, ours in pairs}


def export_hf_llama(model: nn.Module, out_dir: str | Path, *, dtype: torch.dtype | None = None,
                    tokenizer_file: str | Path | None = None, **token_ids: int | None) -> Path:
    """Write ``model``'s decoder as a Hugging Face Llama directory.

    Args:
        model: a :class:`~minivlm.model.VisionLanguageModel` (its decoder is exported) or a
            :class:`LlamaDecoder`.
        out_dir: created if needed; ``config.json`` and ``model.safetensors`` are written.
        dtype: cast the weights (default: keep the decoder's dtype).
        tokenizer_file: a ``tokenizer.model`` to copy beside the weights.
        token_ids: ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` for config.json.

    Returns:
        ``out_dir`` as a Path.
    """
    decoder = getattr(model, "decoder", model)
    if not isinstance(decoder, LlamaDecoder):
        raise TypeError(f"expected a VisionLanguageModel or LlamaDecoder; got {type(model).__name__}")
    dtype = dtype or decoder.embed.weight.dtype
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = decoder_state_to_hf(decoder.state_dict(), decoder.cfg)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = hf_llama_config(decoder.cfg, dtype, **token_ids)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, out / "tokenizer.model")
    log.info("exported a %d-layer decoder (%d tensors, %s) to %s", decoder.cfg.n_layers, len(tensors),
             _DTYPE_NAMES[dtype], out)
    return out
