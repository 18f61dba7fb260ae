"""Vision Transformer image encoder covering the ViT, CLIP and SigLIP layouts.

References: ViT (Dosovitskiy et al. 2021; timm ``VisionTransformer``), CLIP (Radford et al. 2021;
open_clip ``VisionTransformer``: bias-free patch conv, ``ln_pre``, QuickGELU, ``ln_post`` +
projection), SigLIP (Zhai et al. 2023; timm ``AttentionPoolLatent`` "MAP" head, tanh GELU).
One module, switched by :class:`~minivlm.config.EncoderConfig` flags, so an ablation that swaps
encoders changes data, not code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minivlm.config import EncoderConfig, VLMConfig, require
from minivlm.kernels.dispatch import attention
from minivlm.kernels.mask import AttentionMask
from minivlm.layers.mlp import MLP
from minivlm.layers.norms import LayerNorm

_BIDIRECTIONAL = AttentionMask.bidirectional()


class EncoderAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (timm / open_clip layout).

    ``[N, L, D] -> [N, L, D]``; bidirectional (every patch sees every patch).
    """

    def __init__(self, dim: int, n_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attention_backend: str | None = None  # None: dispatch's default (kernels.dispatch)

    def forward(self, x: Tensor) -> Tensor:
        N, L, D = x.shape
        q, k, v = self.qkv(x).view(N, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, _BIDIRECTIONAL, backend=self.attention_backend)
        return self.proj(out.transpose(1, 2).reshape(N, L, D))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.norm1 = LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = EncoderAttention(cfg.width, cfg.n_heads, cfg.qkv_bias)
        self.norm2 = LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = MLP(cfg.width, cfg.mlp_dim, act=cfg.activation)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class AttentionPoolHead(nn.Module):
    """Multihead attention pooling (MAP; Lee et al. 2019 "Set Transformer", SigLIP's head).

    A learned latent query attends to all tokens, then a residual MLP; layout of timm's
    ``AttentionPoolLatent``. ``[N, L, D] -> [N, D]``.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        D = cfg.width
        self.n_heads = cfg.n_heads
        self.latent = nn.Parameter(torch.randn(1, 1, D) * D**-0.5)
        self.q = nn.Linear(D, D, bias=cfg.qkv_bias)
        self.kv = nn.Linear(D, 2 * D, bias=cfg.qkv_bias)
        self.proj = nn.Linear(D, D)
        self.norm = LayerNorm(D, eps=cfg.norm_eps)
        self.mlp = MLP(D, cfg.mlp_dim, act=cfg.activation)
        self.attention_backend: str | None = None

    def forward(self, x: Tensor) -> Tensor:
        N, L, D = x.shape
        h, dh = self.n_heads, D // self.n_heads
        q = self.q(self.latent.expand(N, -1, -1)).view(N, 1, h, dh).transpose(1, 2)
        k, v = self.kv(x).view(N, L, 2, h, dh).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, _BIDIRECTIONAL, backend=self.attention_backend).transpose(1, 2).reshape(N, 1, D)
        out = self.proj(out)
        out = out + self.mlp(self.norm(out))
        return out[:, 0]


class ConvStem(nn.Module):
    """Convolutional patch embedding (Xiao et al. 2021, "Early Convolutions Help Transformers See
    Better"): log2(patch) 3x3 stride-2 convolutions with GELU, then a 1x1 projection to the width.

    Same output grid as the strided patch conv, but with a locality prior that small from-scratch
    encoders otherwise need far more data to learn (e.g. telling a triangle from a circle).
    ``linear_path=True`` is the ``hybrid`` stem: the plain linear patch projection of ViT runs
    beside the stack and is added, so the GELU stack learns edges and shapes while the linear path
    keeps colour (on easy-VQA the stack alone learned shape questions but lagged the plain patch
    embedding on colour; ``benchmarks/ablations/encoder.yaml`` compares the three stems).
    ``[N, C, H, W] -> [N, D, H / patch, W / patch]``.
    """

    def __init__(self, in_channels: int, width: int, patch_size: int, linear_path: bool = True):
        super().__init__()
        n = patch_size.bit_length() - 1
        chans = [in_channels] + [max(16, width >> (n - i)) for i in range(n)]
        layers: list[nn.Module] = []
        for i in range(n):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1), nn.GELU()]
        layers.append(nn.Conv2d(chans[-1], width, 1))
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Conv2d(in_channels, width, patch_size, stride=patch_size) if linear_path else None
        # He initialisation keeps unit activation scale through the GELU stack; PyTorch's default
        # shrinks it ~2x per layer, leaving patch features below the position embeddings.
        for conv in self.layers[:-1:2]:
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.layers[-1].weight, std=chans[-1] ** -0.5)
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(x)
        return out + self.linear(x) if self.linear is not None else out


def mean_and_differences(pixels: Tensor, frames: int) -> Tensor:
    """Stacked frames ``[N, frames * C, H, W]`` as their mean then the ``frames - 1`` differences
    of consecutive frames (same shape).

    An invertible change of basis for temporal patches: a still (every frame equal) has zero
    differences, so it reaches the patch kernel only through the mean slice and trains exactly
    like one frame. With the frames stacked as they are, each time slice of the kernel gets the
    same gradient from a still, which under Adam moves the kernel ``frames`` times as far per step.
    """
    N, stacked, H, W = pixels.shape
    x = pixels.view(N, frames, stacked // frames, H, W)
    return torch.cat([x.mean(1, keepdim=True), x.diff(dim=1)], dim=1).view(N, stacked, H, W)


def sincos_2d_pos_embed(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed 2-D sine-cosine position embeddings: ``[h*w, dim]``, row-major like the patches.

    A quarter of the channels each for ``sin(x)``, ``cos(x)``, ``sin(y)``, ``cos(y)`` at
    geometrically spaced frequencies (big_vision ``posemb_sincos_2d``; Beyer et al. 2022, "Better
    plain ViT baselines for ImageNet-1k"). Entries have RMS ~0.7, the scale of unit-variance patch
    features, so position is a strong signal from the first step, where a learned table initialised
    at std 0.02 is 2% of it and grows only as fast as the optimiser moves it.
    """
    if dim % 4:
        raise ValueError(f"sin-cos 2-D position embeddings need a width divisible by 4; got {dim}")
    h, w = grid
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / max(quarter - 1, 1))
    x = x.reshape(-1, 1) * omega
    y = y.reshape(-1, 1) * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


def idefics3_position_index(side: int) -> Tensor:
    """``[side * side]``: the position-table row of each patch of a full ``side x side`` grid as
    transformers' ``Idefics3VisionEmbeddings`` computes it.

    Patch ``i`` of an axis sits at the fractional coordinate ``i * (1 / side)`` (float32) and is
    bucketised against ``arange(1 / side, 1, 1 / side)``; float rounding puts some coordinates
    one bucket low, so for e.g. ``side = 27`` (SmolVLM) a few rows are read twice and others never.
    Checkpoints were trained with it, so parity needs it.
    """
    boundaries = torch.arange(1 / side, 1.0, 1 / side)
    step = 1.0 / torch.tensor([side])
    coords = (torch.arange(side, dtype=torch.float32) * step).clamp(max=1.0 - 1e-6)
    buckets = torch.bucketize(coords, boundaries, right=True)
    return (buckets[:, None] * side + buckets[None, :]).reshape(-1)


def resize_pos_embed(pos: Tensor, new_grid: tuple[int, int], n_prefix: int, old_grid: tuple[int, int] | None = None) -> Tensor:
    """Bicubically resample learned position embeddings to another patch grid.

    ``pos [1, n_prefix + h*w, D] -> [1, n_prefix + H*W, D]``; prefix (class token) slots are kept
    as they are. Matches timm's ``resample_abs_pos_embed`` (bicubic, antialiased).
    """
    prefix, grid = pos[:, :n_prefix], pos[:, n_prefix:]
    if old_grid is None:
        side = math.isqrt(grid.shape[1])
        if side * side != grid.shape[1]:
            raise ValueError(f"cannot infer a square grid from {grid.shape[1]} position embeddings; pass old_grid")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return pos
    D = grid.shape[-1]
    g = grid.reshape(1, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2).float()
    g = F.interpolate(g, size=new_grid, mode="bicubic", antialias=True, align_corners=False)
    g = g.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], D).to(pos.dtype)
    return torch.cat([prefix, g], dim=1)


class VisionTransformer(nn.Module):
    """ViT / CLIP / SigLIP image encoder.

    ``forward(pixels [N, C, H, W]) -> features [N, P, D]``: patch tokens (class token removed)
    from block ``feature_layer``, followed by the final norm when ``feature_norm``; blocks after
    ``feature_layer`` are skipped. ``pooled(pixels) -> [N, E]``: the image embedding for
    retrieval (class token, mean or MAP pooling of the final normed tokens, then ``proj``).
    """

    def __init__(self, config: VLMConfig | EncoderConfig):
        super().__init__()
        cfg = config.encoder if isinstance(config, VLMConfig) else config
        self.cfg = cfg
        D = cfg.width
        if cfg.stem in ("conv", "hybrid"):
            self.patch_embed = ConvStem(cfg.pixel_channels, D, cfg.patch_size, linear_path=cfg.stem == "hybrid")
        else:
            self.patch_embed = nn.Conv2d(cfg.pixel_channels, D, cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias)
        self.n_prefix = 1 if cfg.class_token else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        if cfg.pos_embed == "sincos2d":
            # A buffer, not a parameter: fixed, rebuilt on load, never decayed or trained.
            self.register_buffer("pos_embed", self._sincos((cfg.grid_size, cfg.grid_size)), persistent=False)
        else:
            self.pos_embed = nn.Parameter(torch.randn(1, self.n_prefix + cfg.n_patches, D) * 0.02)
        index = idefics3_position_index(cfg.grid_size) if cfg.pos_index == "idefics3" else None
        self.register_buffer("pos_index", index, persistent=False)
        self.ln_pre = LayerNorm(D, eps=cfg.norm_eps) if cfg.pre_norm else None
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.depth))
        self.norm = LayerNorm(D, eps=cfg.norm_eps) if cfg.final_norm else None
        self.pool_head = AttentionPoolHead(cfg) if cfg.pooling == "map" else None
        self.proj = nn.Linear(D, cfg.embed_dim, bias=False) if cfg.embed_dim else None

    # ---- the part contract (minivlm.registry) ----------------------------------------------
    @classmethod
    def check_config(cls, config: VLMConfig) -> None:
        """Raise :class:`~minivlm.config.ConfigError` naming the first invalid ``encoder.*`` field."""
        e = config.encoder
        require(e.image_size % e.patch_size == 0 or (e.drop_remainder and e.stem == "patch"), "encoder.image_size",
                f"{e.image_size} is not a multiple of encoder.patch_size={e.patch_size} (encoder.drop_remainder=true "
                f"lets the patch conv leave the last pixels unread)")
        require(e.width % e.n_heads == 0, "encoder.width", f"{e.width} is not divisible by encoder.n_heads={e.n_heads}")
        require(-e.depth <= e.feature_layer < e.depth, "encoder.feature_layer",
                f"{e.feature_layer} is outside [-{e.depth}, {e.depth - 1}] for depth {e.depth}")
        require(e.activation in ("gelu", "gelu_tanh", "quick_gelu"), "encoder.activation",
                f"expected gelu | gelu_tanh | quick_gelu, got {e.activation!r}")
        require(e.stem in ("patch", "conv", "hybrid"), "encoder.stem", f"expected patch | conv | hybrid, got {e.stem!r}")
        require(e.stem == "patch" or (e.patch_size & (e.patch_size - 1)) == 0, "encoder.stem",
                f"the {e.stem} stem halves the resolution per layer, so patch_size must be a power of 2; got {e.patch_size}")
        require(e.temporal_input in ("frames", "differences"), "encoder.temporal_input",
                f"expected frames | differences, got {e.temporal_input!r}")
        require(e.pos_embed in ("learned", "sincos2d"), "encoder.pos_embed",
                f"expected learned | sincos2d, got {e.pos_embed!r}")
        require(e.pos_embed != "sincos2d" or e.width % 4 == 0, "encoder.pos_embed",
                f"sincos2d splits the width in four (sin/cos of x and y); encoder.width={e.width} is not divisible by 4")
        require(e.pos_index in ("grid", "idefics3"), "encoder.pos_index", f"expected grid | idefics3, got {e.pos_index!r}")
        require(e.pos_index == "grid" or (e.pos_embed == "learned" and not e.class_token), "encoder.pos_index",
                "idefics3 indexes a learned table of patch positions: needs pos_embed=learned and no class token")
        require(e.pooling in ("none", "cls", "mean", "map"), "encoder.pooling",
                f"expected none | cls | mean | map, got {e.pooling!r}")
        require(e.pooling != "cls" or e.class_token, "encoder.pooling", "'cls' pooling needs encoder.class_token=True")
        require(e.normalization in ("clip", "siglip", "imagenet"), "encoder.normalization",
                f"expected clip | siglip | imagenet, got {e.normalization!r}")

    @classmethod
    def feature_tokens(cls, config: VLMConfig) -> int:
        """Patch tokens per image handed to the projector (the class token is not one of them)."""
        return config.encoder.n_patches

    def _sincos(self, grid: tuple[int, int]) -> Tensor:
        """``[1, n_prefix + h*w, D]`` fixed embeddings; the class-token slot gets zeros."""
        patches = sincos_2d_pos_embed(grid, self.cfg.width)
        return torch.cat([patches.new_zeros(self.n_prefix, self.cfg.width), patches]).unsqueeze(0)

    @property
    def out_dim(self) -> int:
        return self.cfg.width

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim or self.cfg.width

    def _check_pixels(self, pixels: Tensor) -> None:
        c, p = self.cfg, self.cfg.patch_size
        if pixels.ndim != 4 or pixels.shape[1] != c.pixel_channels:
            stacked = f" ({c.temporal_patch_size} frames of {c.in_channels})" if c.temporal_patch_size > 1 else ""
            raise ValueError(f"pixel values must be [N, {c.pixel_channels}{stacked}, H, W]; got {tuple(pixels.shape)}")
        if (pixels.shape[2] % p or pixels.shape[3] % p) and not c.drop_remainder:
            raise ValueError(f"image height and width must be multiples of the patch size {p}; got {tuple(pixels.shape[2:])}")

    def embed(self, pixels: Tensor) -> Tensor:
        """Patchify, add class token and position embeddings: ``[N, C, H, W] -> [N, n_prefix + P, D]``."""
        self._check_pixels(pixels)
        if self.cfg.temporal_patch_size > 1 and self.cfg.temporal_input == "differences":
            pixels = mean_and_differences(pixels, self.cfg.temporal_patch_size)
        x = self.patch_embed(pixels)  # [N, D, h, w]
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        pos = self.pos_embed
        if self.pos_index is not None and grid == (self.cfg.grid_size, self.cfg.grid_size):
            pos = pos[:, self.pos_index]
        if grid != (self.cfg.grid_size, self.cfg.grid_size) and self.cfg.pos_embed == "sincos2d":
            pos = self._sincos(grid).to(pos.device)  # fixed embeddings are defined on any grid
        elif grid != (self.cfg.grid_size, self.cfg.grid_size):
            # Another resolution than trained: resample (timm's dynamic_img_size).
            pos = resize_pos_embed(pos, grid, self.n_prefix, (self.cfg.grid_size, self.cfg.grid_size))
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + pos.to(x.dtype)
        return self.ln_pre(x) if self.ln_pre is not None else x

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.embed(pixels)
        last = self.cfg.resolved_feature_layer
        for blk in self.blocks[: last + 1]:
            x = blk(x)
        if self.cfg.feature_norm and self.norm is not None:
            x = self.norm(x)
        return x[:, self.n_prefix:]

    def forward_tokens(self, pixels: Tensor) -> Tensor:
        """All blocks, final norm: ``[N, n_prefix + P, D]`` (timm ``forward_features``)."""
        x = self.embed(pixels)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x) if self.norm is not None else x

    def pooled(self, pixels: Tensor) -> Tensor:
        """Image embedding ``[N, E]`` for retrieval and classification heads."""
        x = self.forward_tokens(pixels)
        pooling = self.cfg.pooling
        if pooling == "cls":
            out = x[:, 0]
        elif pooling == "map":
            out = self.pool_head(x[:, self.n_prefix:] if self.n_prefix else x)
        else:  # "mean" and "none" both average the patch tokens for an embedding
            out = x[:, self.n_prefix:].mean(dim=1)
        return self.proj(out) if self.proj is not None else out
