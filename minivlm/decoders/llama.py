"""Llama-style causal text decoder (Touvron et al. 2023; Hugging Face ``LlamaModel`` layout).

Pre-norm blocks of grouped-query attention (Ainslie et al. 2023) with rotary positions and a
SwiGLU MLP, RMSNorm, tied or untied LM head. The decoder consumes *embeddings* so that fusion
can splice image tokens in; ``embed`` and ``logits`` are separate so the loss can avoid
materialising ``[tokens, vocab]`` logits.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minivlm.config import DecoderConfig, VLMConfig, require
from minivlm.kernels.dispatch import attention
from minivlm.kernels.mask import AttentionMask
from minivlm.layers.kv_cache import StaticKVCache
from minivlm.layers.mlp import SwiGLU
from minivlm.layers.norms import RMSNorm
from minivlm.layers.packed_linear import PackedWeight, packed_linear
from minivlm.layers.rope import RotaryEmbedding, rotate

#: Called before decoder layer ``i`` as ``hidden = hook(i, hidden)``; how cross-attention fuses.
LayerHook = Callable[[int, Tensor], Tensor]


class DecoderAttention(nn.Module):
    """Grouped-query self-attention with RoPE: ``[B, T, D]`` or, as the decoder runs it, tokens
    flattened ``[B * T, D]`` (the projections are then plain 2-D matmuls) -> the same shape;
    attention runs as ``[B, H, T, Dh]``."""

    packed_linears = (("q", "k", "v"), ("o",))  # see minivlm.layers.packed_linear

    def __init__(self, cfg: DecoderConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        self.q = nn.Linear(cfg.width, self.n_heads * self.head_dim, bias=False)
        self.k = nn.Linear(cfg.width, self.n_kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(cfg.width, self.n_kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(self.n_heads * self.head_dim, cfg.width, bias=False)
        self.attention_backend: str | None = None  # None: dispatch's default (kernels.dispatch)
        self.packed: tuple[PackedWeight, PackedWeight] | None = None  # set by PackedLinears while decoding

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: AttentionMask,
                cache: StaticKVCache | None = None, residual: Tensor | None = None) -> Tensor:
        """``x [B, T, D]`` or ``[B * T, D]``; ``rope``: :func:`~minivlm.layers.rope.rope_tables` ``[B, 1, T, Dh]``;
        ``residual`` (shaped like ``x``): added to the output."""
        B, T = rope[0].shape[0], rope[0].shape[2]
        H, H_kv, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        packed = self.packed
        if packed is None or torch.is_grad_enabled():  # grad mode is per thread; packed copies carry no gradients
            packed = None
            q = rotate(self.q(x).view(B, T, H, Dh).transpose(1, 2), rope)
            k = rotate(self.k(x).view(B, T, H_kv, Dh).transpose(1, 2), rope)
            v = self.v(x).view(B, T, H_kv, Dh).transpose(1, 2)
        else:  # decoding (PackedLinears): one product, heads side by side; q and k rotate in one call
            qkv = packed_linear(x, packed[0]).view(B, T, H + 2 * H_kv, Dh).transpose(1, 2)
            qk, v = qkv.split((H + H_kv, H_kv), dim=1)
            q, k = rotate(qk, rope).split((H, H_kv), dim=1)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = attention(q, k, v, mask, backend=self.attention_backend).transpose(1, 2).reshape(*x.shape[:-1], -1)
        if packed is not None:
            return packed_linear(out, packed[1], residual)
        return self.o(out) if residual is None else residual + self.o(out)


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``; ``[B * T, D]`` in and out."""

    packed_norms = (("attn_norm", "attn"), ("mlp_norm", "mlp"))  # see minivlm.layers.packed_linear

    def __init__(self, cfg: DecoderConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.attn = DecoderAttention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.width, cfg.mlp_dim)
        self.packed: bool | None = None  # True while decoding with the norms folded (PackedLinears)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: AttentionMask,
                cache: StaticKVCache | None = None) -> Tensor:
        if self.packed is None or torch.is_grad_enabled():
            x = x + self.attn(self.attn_norm(x), rope, mask, cache)
            return x + self.mlp(self.mlp_norm(x))
        # Decoding (PackedLinears): each norm runs inside the product after it (its weight folded
        # in, its scale one batched dot product) and each residual add inside the product before it.
        x = self.attn(x, rope, mask, cache, residual=x)
        return self.mlp(x, residual=x)


class LlamaDecoder(nn.Module):
    """``forward(embeds [B, T, D], mask, position_ids [B, T]) -> hidden [B, T, D]`` (final-normed)."""

    packed_linears = (("lm_head",),)  # see minivlm.layers.packed_linear

    def __init__(self, config: VLMConfig | DecoderConfig):
        super().__init__()
        cfg = config.decoder if isinstance(config, VLMConfig) else config
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.width)
        # std 1/sqrt(D): with a tied head and an RMS-normed final state, initial logits have unit
        # scale; nn.Embedding's default N(0, 1) would start the loss far above log(vocab).
        nn.init.normal_(self.embed.weight, std=cfg.width**-0.5)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rope = RotaryEmbedding(cfg.resolved_head_dim, cfg.rope_theta)
        self.gradient_checkpointing = False
        self.packed: tuple[PackedWeight] | None = None  # set by PackedLinears while decoding

    @classmethod
    def check_config(cls, config: VLMConfig) -> None:
        """Raise :class:`~minivlm.config.ConfigError` naming the first invalid ``decoder.*`` field."""
        d = config.decoder
        require(d.n_heads % d.n_kv_heads == 0, "decoder.n_kv_heads",
                f"decoder.n_heads={d.n_heads} is not a multiple of n_kv_heads={d.n_kv_heads}")
        require(d.head_dim is not None or d.width % d.n_heads == 0, "decoder.width",
                f"{d.width} is not divisible by decoder.n_heads={d.n_heads}; set decoder.head_dim")
        require(d.resolved_head_dim % 2 == 0, "decoder.head_dim", f"RoPE needs an even head dim, got {d.resolved_head_dim}")

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> StaticKVCache:
        w = self.embed.weight
        return StaticKVCache(self.cfg.n_layers, batch, self.cfg.n_kv_heads, max_len, self.cfg.resolved_head_dim,
                             dtype=dtype or w.dtype, device=device or w.device)

    def forward(self, embeds: Tensor, mask: AttentionMask, position_ids: Tensor,
                cache: StaticKVCache | None = None, layer_hook: LayerHook | None = None,
                position_limit: int | None = None) -> Tensor:
        """``position_limit``: an upper bound (exclusive) on ``position_ids`` known on the host, as
        when a KV cache counted them (its length); the rotary tables are then looked up
        (:meth:`~minivlm.layers.rope.RotaryEmbedding.tables`)."""
        B, T, D = embeds.shape
        rope = self.rope.tables(position_ids, embeds.dtype, position_limit)  # once for every layer
        h = embeds.reshape(B * T, D)  # the residual stream, tokens flattened
        for i, layer in enumerate(self.layers):
            if layer_hook is not None:
                h = layer_hook(i, h.view(B, T, D)).reshape(B * T, D)
            if self.gradient_checkpointing and self.training and cache is None:
                h = torch.utils.checkpoint.checkpoint(layer, h, rope, mask, use_reentrant=False)
            else:
                h = layer(h, rope, mask, cache)
        if cache is not None:
            cache.advance(T)
        return self.norm(h).view(B, T, D)

    def logits(self, hidden: Tensor) -> Tensor:
        """``[B, T, D] -> [B, T, V]`` (or ``[B, D] -> [B, V]``)."""
        packed = self.packed
        if packed is None or torch.is_grad_enabled():
            return self.lm_head(hidden)
        return packed_linear(hidden, packed[0])  # decoding (PackedLinears): the head stored transposed
