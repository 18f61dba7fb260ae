"""Configuration: one dataclass per part, nested in :class:`VLMConfig`, plus named presets.

Configs are plain data: JSON round-trip (``to_dict`` / ``from_dict``), dotted overrides from the
command line (``decoder.n_layers=8``), and ``validate()`` that names the offending field.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minivlm.config_types import ConfigError, check_value, parse_value


def require(condition: bool, name: str, message: str) -> None:
    """Raise :class:`ConfigError` ``"<name>: <message>"`` unless ``condition`` holds (parts'
    ``check_config`` use it too, so every message names its field the same way)."""
    if not condition:
        raise ConfigError(f"{name}: {message}")


@dataclass
class EncoderConfig:
    """Vision Transformer (Dosovitskiy et al. 2021) covering the ViT, CLIP and SigLIP layouts.

    CLIP (Radford et al. 2021): ``class_token=True, pre_norm=True, patch_bias=False,
    activation="quick_gelu", pooling="cls"``. SigLIP (Zhai et al. 2023): ``class_token=False,
    pooling="map", activation="gelu_tanh"``.
    """

    kind: str = "vit"
    image_size: int = 64
    patch_size: int = 8
    in_channels: int = 3
    # Frames per token in time (Qwen2-VL's temporal_patch_size; ViViT's tubelets, Arnab et al.
    # 2021): the patch embedding sees this many consecutive video frames stacked on the channel
    # axis, so motion is visible inside one patch; an image is repeated to fill the stack.
    temporal_patch_size: int = 1
    # How the stacked frames reach the patch kernel: frames (as stacked, Qwen2-VL) | differences
    # (their mean, then consecutive differences: a still trains exactly like one frame).
    temporal_input: str = "frames"
    width: int = 128
    depth: int = 4
    n_heads: int = 4
    mlp_dim: int = 512
    class_token: bool = False
    pre_norm: bool = False  # CLIP's ln_pre on the embeddings
    final_norm: bool = True  # timm `norm`, CLIP `ln_post`, SigLIP `post_layernorm`
    feature_norm: bool = True  # apply final_norm to the features handed to the projector
    activation: str = "gelu"  # gelu | gelu_tanh | quick_gelu
    pooling: str = "none"  # none | cls | mean | map  (pooled output, used for retrieval)
    embed_dim: int | None = None  # projection after pooling (CLIP's `proj`), bias-free
    feature_layer: int = -1  # which block's output feeds the projector (LLaVA uses -2)
    patch_bias: bool = True
    stem: str = "patch"  # patch (one strided conv) | conv (3x3 stride-2 conv stack; Xiao et al. 2021) | hybrid (both, added)
    pos_embed: str = "learned"  # learned | sincos2d (fixed 2-D sin-cos; Beyer et al. 2022)
    pos_index: str = "grid"  # row a patch reads: grid (row-major) | idefics3 (transformers' bucketised coordinates)
    drop_remainder: bool = False  # image_size need not be a multiple of patch_size: the last pixels are unread (SigLIP 384/14)
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    normalization: str = "clip"  # image mean/std family: clip | siglip | imagenet
    init_from: str | None = None

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid_size**2

    @property
    def pixel_channels(self) -> int:
        """Channels of one encoder input: ``in_channels`` per frame times ``temporal_patch_size``."""
        return self.in_channels * self.temporal_patch_size

    @property
    def resolved_feature_layer(self) -> int:
        """feature_layer as a non-negative block index."""
        return self.feature_layer % self.depth if self.feature_layer < 0 else self.feature_layer


@dataclass
class ProjectorConfig:
    """Maps image features ``[N, P, D_img]`` to decoder-width tokens ``[N, P', D_txt]``."""

    kind: str = "mlp"  # linear | mlp | pixel_shuffle | resampler
    depth: int = 2  # Linear layers (mlp; pixel_shuffle's head). LLaVA-1.5 mlp2x_gelu = 2
    hidden_dim: int | None = None  # None: the decoder width
    bias: bool = True
    shuffle_factor: int = 2  # pixel_shuffle: P tokens -> P / r^2 tokens of width D * r^2
    n_latents: int = 16  # resampler: number of learned queries = image tokens
    n_layers: int = 2  # resampler: cross-attention layers
    n_heads: int = 4  # resampler heads
    init_from: str | None = None


@dataclass
class FusionConfig:
    """How image tokens meet the text stream."""

    kind: str = "splice"  # splice | cross_attention | prefix
    every: int = 1  # cross_attention: one gated block before every k-th decoder layer
    n_heads: int | None = None  # cross_attention heads; None: decoder n_heads
    init_from: str | None = None


@dataclass
class DecoderConfig:
    """Llama-style causal decoder (Touvron et al. 2023): RMSNorm, RoPE, SwiGLU, GQA."""

    kind: str = "llama"
    vocab_size: int = 1024
    width: int = 192
    n_layers: int = 4
    n_heads: int = 6
    n_kv_heads: int = 2
    head_dim: int | None = None  # None: width // n_heads
    mlp_dim: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    max_seq_len: int = 2048
    init_from: str | None = None

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.width // self.n_heads


@dataclass
class TrainConfig:
    """Optimisation settings shared by the trainer and the ablation runner."""

    stage: str = "full"  # align | finetune | full | custom (see minivlm.train.stages)
    lr: float = 2e-3
    lr_scale: dict[str, float] = field(default_factory=dict)  # per part multiplier, e.g. {"encoder": 0.5}
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.1
    batch_size: int = 32
    grad_accum: int = 1
    grad_clip: float = 1.0
    steps: int = 1000
    # A wall-clock budget: the schedule is shortened to fit it, so the result depends on the
    # machine's speed. Off by default; a run's length is `steps`.
    max_minutes: float | None = None
    cpu_threads: int = 0  # torch intra-op threads on the CPU; 0: chosen by timing steps (train/threads.py)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    compile: bool = False
    fused_loss: bool = True  # LM head + cross-entropy in token chunks, no [tokens, vocab] logits (kernels/fused_ce.py)
    loss_weighting: str = "token"  # token | sample | square: each sample's share of the loss (train/loss_weighting.py)
    activation_checkpointing: bool = False
    seed: int = 0
    eval_every: int = 0
    save_every: int = 200
    keep_checkpoints: int = 2
    max_nonfinite: int = 10
    log_every: int = 10
    fsdp: bool = False
    lora_rank: int = 0  # > 0: freeze the base weights and train LoRA adapters of this rank (minivlm.train.lora)
    lora_alpha: float = 16.0  # adapter update scale alpha / rank (Hu et al. 2021)
    lora_parts: tuple[str, ...] = ("decoder",)  # parts whose linear layers get adapters: decoder, encoder
    # A contrastive image-text objective trained beside generation (minivlm/train/contrastive.py):
    # each step adds retrieval_weight x the CLIP/SigLIP loss of retrieval_batch_size image-caption
    # pairs of `retrieval_data` to the loss; the model gets a retrieval head. 0: off.
    retrieval_weight: float = 0.0
    retrieval_batch_size: int = 32
    retrieval_loss: str = "clip"  # clip | siglip (minivlm/retrieval_head.py)
    retrieval_data: str = "retrieval"  # a dataset spec whose samples carry "image" and "caption"


@dataclass
class DataConfig:
    """What to train on and how images and text are prepared."""

    mixture: str = "easy_vqa:0.7,shapes:0.1,charts:0.05,multi_image:0.05,video:0.05,retrieval:0.05"
    # A curriculum: phases trained before `mixture` (e.g. the visual concepts first, then the full
    # mix), separated by ";" in both fields: curriculum="video:1;easy_vqa_shape:0.5,shapes:0.5" with
    # curriculum_steps="250;700" trains 250 steps on video, 700 on the second mix, then `mixture`.
    # All phases together take at most half of train.steps (the last ones are cut first).
    curriculum: str = ""
    curriculum_steps: str = ""
    resize: str = "resize"  # resize | letterbox | crop
    split_image: bool = False
    max_length: int = 256
    packing: bool = False
    num_workers: int = 0
    video_frames: int = 4
    strict: bool = False  # a bad record in a data file or an over-long sample is an error, not skipped/truncated

    @property
    def curriculum_phases(self) -> list[tuple[str, int]]:
        """``[(mixture spec, steps), ...]``, one per curriculum phase; empty without a curriculum.

        Raises:
            ValueError: the two fields disagree, or a step count is not a positive integer.
        """
        specs = [s.strip() for s in self.curriculum.split(";")] if self.curriculum.strip() else []
        text = str(self.curriculum_steps).strip()  # configs saved before phases hold an int
        try:
            steps = [int(x) for x in text.split(";")] if text not in ("", "0") else []
        except ValueError:
            raise ValueError(f"data.curriculum_steps: expected step counts separated by ';' (e.g. '250;700'), "
                             f"got {self.curriculum_steps!r}") from None
        if len(specs) != len(steps):
            raise ValueError(f"data.curriculum has {len(specs)} phase(s) ({self.curriculum!r}) but data.curriculum_steps "
                             f"gives {len(steps)} step count(s) ({self.curriculum_steps!r}); set both or neither")
        if any(not spec for spec in specs) or any(n < 1 for n in steps):
            raise ValueError(f"every curriculum phase needs a mixture and at least 1 step; got {self.curriculum!r} "
                             f"for {self.curriculum_steps!r}")
        return list(zip(specs, steps))


@dataclass
class VLMConfig:
    """The whole model: four parts plus the glue between them."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    image_token_id: int = 3
    attention_backend: str = "auto"  # auto | a backend of minivlm.kernels.dispatch.BACKENDS
    name: str = "custom"

    # ---- validation ------------------------------------------------------------------------
    def validate(self) -> "VLMConfig":
        """Check what needs no knowledge of the parts: positive sizes, the image token inside the
        vocabulary, the training and data settings. Raises :class:`ConfigError` naming the field.

        Each registered part checks its own fields and derived shapes (tokens per image) come from
        the parts too: :func:`minivlm.registry.validate_config` runs this and every part's check.
        """
        for part in ("encoder", "projector", "fusion", "decoder"):
            cfg = getattr(self, part)
            for fld in dataclasses.fields(cfg):
                v = getattr(cfg, fld.name)
                if isinstance(v, int) and not isinstance(v, bool) and fld.name != "feature_layer":
                    require(v > 0, f"{part}.{fld.name}", f"must be positive, got {v}")
        d = self.decoder
        require(0 <= self.image_token_id < d.vocab_size, "image_token_id",
                f"{self.image_token_id} is outside the vocabulary [0, {d.vocab_size})")
        t = self.train
        require(t.precision in ("auto", "fp32", "bf16", "fp16"), "train.precision",
                f"expected auto | fp32 | bf16 | fp16, got {t.precision!r}")
        require(t.schedule in ("cosine", "linear", "constant"), "train.schedule",
                f"expected cosine | linear | constant, got {t.schedule!r}")
        require(t.loss_weighting in ("token", "sample", "square"), "train.loss_weighting",
                f"expected token | sample | square, got {t.loss_weighting!r}")
        require(self.data.resize in ("resize", "letterbox", "crop"), "data.resize",
                f"expected resize | letterbox | crop, got {self.data.resize!r}")
        try:
            self.data.curriculum_phases
        except ValueError as err:
            require(False, "data.curriculum", str(err))
        return self

    # ---- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            from minivlm.io_atomic import atomic_write_text

            atomic_write_text(path, text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VLMConfig":
        return _from_dict(cls, d, "")

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> "VLMConfig":
        """From a JSON file path, or from JSON text (anything starting with ``{``).

        Raises:
            ConfigError: not JSON, not UTF-8, or a field of the wrong type; names the file.
        """
        is_text = isinstance(path_or_text, str) and path_or_text.lstrip().startswith("{")
        where = "config JSON" if is_text else str(path_or_text)
        try:
            return cls.from_dict(json.loads(path_or_text if is_text else Path(path_or_text).read_bytes().decode()))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{where} is not valid JSON: {err}") from None
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None

    def override(self, *assignments: str) -> "VLMConfig":
        """A copy with dotted ``key=value`` assignments applied (see :func:`apply_overrides`)."""
        return apply_overrides(self, list(assignments))


def _from_dict(cls: type, d: dict[str, Any], where: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{where or 'config'}: expected an object, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown field(s) {unknown}; expected some of {sorted(names)}")
    kwargs = {}
    for k, v in d.items():
        t = hints[k]
        if dataclasses.is_dataclass(t):
            kwargs[k] = _from_dict(t, v, f"{where}{k}.")
        elif f"{where}{k}" == "data.curriculum_steps" and isinstance(v, int):
            kwargs[k] = str(v)  # configs saved before curriculum phases hold an int
        else:
            kwargs[k] = check_value(v, t, f"{where}{k}")
    return cls(**kwargs)


def apply_overrides(cfg: VLMConfig, assignments: list[str]) -> VLMConfig:
    """Return a copy of ``cfg`` with ``a.b=value`` assignments applied.

    ``projector=mlp`` (a part name without a field) sets that part's ``kind``, which is what
    ablation grids write. Values are parsed by the field's type; unknown fields are errors.
    """
    cfg = copy.deepcopy(cfg)
    for item in assignments:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. decoder.n_layers=8")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        obj: Any = cfg
        for i, name in enumerate(parts):
            if not dataclasses.is_dataclass(obj) or name not in {f.name for f in dataclasses.fields(obj)}:
                where = ".".join(parts[:i]) or "config"
                known = sorted(f.name for f in dataclasses.fields(obj)) if dataclasses.is_dataclass(obj) else []
                raise ConfigError(f"override {key!r}: {where} has no field {name!r}; expected one of {known}")
            if i < len(parts) - 1:
                obj = getattr(obj, name)
        last = parts[-1]
        target_type = typing.get_type_hints(type(obj))[last]
        if dataclasses.is_dataclass(target_type):
            obj, last, target_type = getattr(obj, last), "kind", str
        setattr(obj, last, parse_value(raw.strip(), target_type, key))
    return cfg


# ---- presets ------------------------------------------------------------------------------


def _tiny() -> VLMConfig:
    # Trains on a 2-core CPU in minutes: 64 px images, 8 px patches -> 64 patches, pixel shuffle 2
    # -> 16 image tokens; ~2.8M parameters.
    # The defaults are the main job's recipe (`minivlm train`), each part measured (README,
    # "Training: the main job"):
    # - a fixed number of steps and no time budget: the same seed gives the same model on any
    #   machine, however fast or busy;
    # - a hybrid stem: a conv stack (shape needs a locality prior the 4-layer ViT cannot learn in
    #   minutes) plus the linear patch path (colour);
    # - all questions about an image in one sequence (the *_grouped views, shared-prefix branches):
    #   ~3x the questions per second of one question per row, and no answer leaks between them;
    # - a curriculum: shape and colour questions (and the synthetic tasks, whose first appearance
    #   mid-run otherwise wipes out the shape features) before the full mix. Shape is the slowest
    #   concept to learn and its signal drowns among the easy yes/no questions (74% of easy-VQA);
    #   a shape-only start makes the encoder colour-blind, hence the open (shape + colour) share;
    # - lr 5e-4 (1e-3 learns as fast but loses what the curriculum taught at the switch);
    # - video direction: all 6 frames of a clip, in temporal patches of 3 consecutive frames, so the
    #   stem sees motion inside a patch, and `square` loss weighting, so a video sample's two answer
    #   tokens are not outweighed 10:1 by a grouped easy-VQA item;
    # - a contrastive image-caption objective beside generation (retrieval_weight), so the model
    #   also retrieves (`minivlm retrieve`);
    # - train.precision=auto: bf16 autocast on CPUs with bf16 instructions (a step ~0.8x as long).
    synthetic = "shapes_grouped:0.05,charts_grouped:0.15,multi_image_grouped:0.1,video:0.2,retrieval:0.05"
    return VLMConfig(
        name="tiny",
        encoder=EncoderConfig(image_size=64, patch_size=8, width=128, depth=4, n_heads=4, mlp_dim=512, stem="hybrid",
                              temporal_patch_size=3),
        projector=ProjectorConfig(kind="pixel_shuffle", shuffle_factor=2, depth=2),
        decoder=DecoderConfig(vocab_size=1024, width=192, n_layers=4, n_heads=6, n_kv_heads=2, mlp_dim=512,
                              max_seq_len=512),
        train=TrainConfig(lr=5e-4, batch_size=16, warmup_steps=30, steps=TINY_STEPS, max_minutes=None, save_every=500,
                          loss_weighting="square", retrieval_weight=0.1, retrieval_batch_size=8),
        data=DataConfig(mixture=f"easy_vqa_grouped:0.45,{synthetic}", packing=True, max_length=256, video_frames=6,
                        curriculum="easy_vqa_shape:0.4,easy_vqa_open:0.25,shapes_grouped:0.05,charts_grouped:0.1,"
                                   "multi_image_grouped:0.05,video:0.1,retrieval:0.05", curriculum_steps="700"),
    )


#: Steps of the main job (``tiny``): fixed, so a seed gives the same model on every machine.
TINY_STEPS = 1500


#: DataLoader workers per rank in the GPU presets: image decoding and preprocessing run beside the
#: training process, and a sharded source gets one reader per worker (minivlm/data/shards.py).
#: ``tiny`` (CPU, 2 cores) keeps 0: workers would share its two cores with training (not measured faster).
GPU_DATA_WORKERS = 4


def _small() -> VLMConfig:
    return VLMConfig(
        name="small",
        data=DataConfig(num_workers=GPU_DATA_WORKERS),
        encoder=EncoderConfig(image_size=128, patch_size=16, width=384, depth=6, n_heads=6, mlp_dim=1536),
        projector=ProjectorConfig(kind="pixel_shuffle", shuffle_factor=2, depth=2),
        decoder=DecoderConfig(vocab_size=8192, width=512, n_layers=6, n_heads=8, n_kv_heads=4, mlp_dim=1376,
                              max_seq_len=2048),
    )


def _nanovlm_460m() -> VLMConfig:
    # nanoVLM's default (huggingface/nanoVLM models/config.py): SigLIP2-B/16-512 encoder,
    # pixel-shuffle 4 + bias-free linear (12288 -> 960), SmolLM2-360M decoder. 460,113,984 params.
    return VLMConfig(
        name="nanovlm-460m",
        data=DataConfig(num_workers=GPU_DATA_WORKERS),
        encoder=EncoderConfig(image_size=512, patch_size=16, width=768, depth=12, n_heads=12, mlp_dim=3072,
                              class_token=False, activation="gelu_tanh", normalization="siglip"),
        projector=ProjectorConfig(kind="pixel_shuffle", shuffle_factor=4, depth=1, bias=False),
        decoder=DecoderConfig(vocab_size=49218, width=960, n_layers=32, n_heads=15, n_kv_heads=5, mlp_dim=2560,
                              rope_theta=100000.0, tie_embeddings=True, max_seq_len=8192),
        image_token_id=49152,
    )


def _llava_15_7b() -> VLMConfig:
    # LLaVA-1.5-7B (Liu et al. 2023): CLIP ViT-L/14-336 second-to-last layer, mlp2x_gelu, Vicuna-7B.
    return VLMConfig(
        name="llava-1.5-7b",
        data=DataConfig(num_workers=GPU_DATA_WORKERS),
        encoder=EncoderConfig(image_size=336, patch_size=14, width=1024, depth=24, n_heads=16, mlp_dim=4096,
                              class_token=True, pre_norm=True, patch_bias=False, activation="quick_gelu",
                              pooling="cls", feature_layer=-2, feature_norm=False, norm_eps=1e-5),
        projector=ProjectorConfig(kind="mlp", depth=2, hidden_dim=4096),
        decoder=DecoderConfig(vocab_size=32064, width=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_dim=11008,
                              norm_eps=1e-5, tie_embeddings=False, max_seq_len=4096),
        image_token_id=32000,
    )


PRESETS: dict[str, typing.Callable[[], VLMConfig]] = {
    "tiny": _tiny,
    "small": _small,
    "nanovlm-460m": _nanovlm_460m,
    "llava-1.5-7b": _llava_15_7b,
}


def preset(name: str) -> VLMConfig:
    """A fresh copy of a named preset."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}") from None
