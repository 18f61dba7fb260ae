"""Turn foreign checkpoints into minivlm checkpoint directories, and initialise parts from them.

:func:`import_checkpoint` is what ``minivlm import timm|open_clip|hf-llama|llava SRC --out DIR``
runs. A whole-model source (LLaVA) becomes an ordinary minivlm checkpoint
(``config.json`` + ``model.safetensors``, loadable with ``VisionLanguageModel.from_pretrained``).
A part-only source (an image encoder, a decoder) becomes a **part directory**::

    DIR/part.json          {"format": "minivlm-part", "format_version": 1, "part": "encoder",
                            "config": {<EncoderConfig fields>}, "source": {"importer": ..., "path": ...}}
    DIR/model.safetensors  the part's tensors, keys prefixed by the part name ("encoder.blocks.0...")
    DIR/tokenizer.model    copied from a Hugging Face decoder source when it has one

The key prefix is the one a full checkpoint uses, so :func:`load_part_weights` (what a config's
``encoder.init_from=DIR`` runs) reads either kind of directory the same way. Importers write
their mapped tensors directly, in the source dtype, after checking them against the target
module built on the ``meta`` device: a 7B import never materialises an fp32 copy of the model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from minivlm.config import ConfigError, EncoderConfig, VLMConfig
from minivlm.decoders.llama import LlamaDecoder
from minivlm.encoders.vit import VisionTransformer, resize_pos_embed
from minivlm.interop import MappedState, load_mapped, tied_aliases, verify_mapped
from minivlm.safetensors_io import load_safetensors, load_weights
from minivlm.model import CONFIG_NAME, WEIGHTS_NAME, VisionLanguageModel

log = logging.getLogger(__name__)

PART_CONFIG_NAME = "part.json"
PART_FORMAT, PART_FORMAT_VERSION = "minivlm-part", 1
TOKENIZER_NAME = "tokenizer.model"
IMPORT_KINDS = ("timm", "open_clip", "hf-llama", "llava", "smolvlm", "nanovlm")
#: Written beside a whole imported model: which importer read what (and the foreign config, for export).
SOURCE_NAME = "import_source.json"

#: Per part, config fields that may differ between a checkpoint and the model it initialises:
#: they choose how the part is *used* (which layer feeds the projector, the context length) or,
#: for ``image_size``, are adapted at load (position embeddings are resampled).
FREE_FIELDS: dict[str, frozenset[str]] = {
    "encoder": frozenset({"init_from", "feature_layer", "feature_norm", "pooling", "image_size"}),
    "projector": frozenset({"init_from"}),
    "fusion": frozenset({"init_from"}),
    "decoder": frozenset({"init_from", "max_seq_len"}),
}


class PartConfigMismatchError(ValueError):
    """A part checkpoint was made for a differently configured part; lists every differing field."""


# ---- writing ------------------------------------------------------------------------------------


def _meta_shapes(build: Callable[[], nn.Module]) -> tuple[dict[str, torch.Size], set[str]]:
    """State-dict shapes and tied aliases of a module, built on the meta device (no memory)."""
    with torch.device("meta"):
        module = build()
    return {k: v.shape for k, v in module.state_dict().items()}, tied_aliases(module)


def _save_tensors(state: dict[str, Tensor], path: Path, name: str) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata={"format": "pt", "minivlm_config": name})


def write_part(out_dir: str | Path, part: str, config: Any, mapped: MappedState, source: dict[str, Any]) -> Path:
    """Verify ``mapped`` (part-relative keys) against the part built from ``config``; write a part directory."""
    builders: dict[str, Callable[[], nn.Module]] = {
        "encoder": lambda: VisionTransformer(config), "decoder": lambda: LlamaDecoder(config)}
    if part not in builders:
        raise ValueError(f"part directories hold an encoder or a decoder; got part {part!r}")
    expected, tied = _meta_shapes(builders[part])
    verify_mapped(mapped, expected, source.get("path", part), tied)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": PART_FORMAT, "format_version": PART_FORMAT_VERSION, "part": part,
            "config": dataclasses.asdict(config), "source": source}
    (out / PART_CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    _save_tensors({f"{part}.{k}": v for k, v in mapped.state.items()}, out / WEIGHTS_NAME, f"{part} part")
    log.info("wrote %s part (%d tensors) to %s", part, len(mapped.state), out)
    return out


def write_model(out_dir: str | Path, config: VLMConfig, mapped: MappedState, source: str) -> Path:
    """Verify a whole-model mapping against ``VisionLanguageModel(config)``; write a minivlm checkpoint."""
    expected, tied = _meta_shapes(lambda: VisionLanguageModel(config))
    verify_mapped(mapped, expected, source, tied)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.to_json(out / CONFIG_NAME)
    _save_tensors(mapped.state, out / WEIGHTS_NAME, config.name)
    log.info("wrote a minivlm checkpoint (%d tensors) to %s", len(mapped.state), out)
    return out


def _copy_tokenizer(src: Path, out: Path) -> None:
    if (src / TOKENIZER_NAME).is_file():
        shutil.copyfile(src / TOKENIZER_NAME, out / TOKENIZER_NAME)
        log.info("copied %s", src / TOKENIZER_NAME)
    else:
        log.info("%s has no %s; the checkpoint has no tokenizer", src, TOKENIZER_NAME)


# ---- importers ----------------------------------------------------------------------------------


def _first_file(directory: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory} holds none of the expected weight files {list(names)}")


def _import_timm(src: Path, out: Path, model_name: str | None = None, model_args: dict[str, Any] | None = None,
                 image_size: int | None = None, normalization: str | None = None) -> Path:
    from minivlm.interop.timm_vit import (create_timm_model_on_meta, encoder_config_from_timm,
                                          map_timm_vit_state, normalization_from_stats, timm_grid)

    args = dict(model_args or {})
    if src.is_dir():
        # timm's Hugging Face Hub layout (timm.models.push_to_hf.save_for_hf).
        hub = json.loads(_first_file(src, ("config.json",)).read_text())
        model_name = model_name or hub.get("architecture")
        args = {**{k: hub[k] for k in ("num_classes", "global_pool") if k in hub}, **hub.get("model_args", {}), **args}
        stats = hub.get("pretrained_cfg", {})
        normalization = normalization or normalization_from_stats(stats.get("mean"), stats.get("std"))
        weights = _first_file(src, ("model.safetensors", "pytorch_model.bin"))
    else:
        weights = src
    if not model_name:
        raise ValueError(f"{src}: a timm weights file needs model_name= (e.g. 'vit_base_patch16_siglip_224')")
    structure = create_timm_model_on_meta(model_name, **args)
    config = encoder_config_from_timm(structure, image_size=image_size, normalization=normalization)
    mapped = map_timm_vit_state(load_weights(weights), config, timm_grid(structure))
    return write_part(out, "encoder", config, mapped, {"importer": "timm", "path": str(src), "model_name": model_name})


def _import_open_clip(src: Path, out: Path, model_name: str | None = None, model_cfg: dict[str, Any] | None = None,
                      image_size: int | None = None, normalization: str | None = None) -> Path:
    from minivlm.interop.open_clip import encoder_config_from_open_clip, map_open_clip_visual_state

    model: str | dict[str, Any] | None = model_cfg or model_name
    if src.is_dir():
        # open_clip's Hugging Face Hub layout (open_clip.push_to_hf_hub).
        config_path = _first_file(src, ("open_clip_config.json",))
        hub = json.loads(config_path.read_text())
        if "model_cfg" not in hub:
            raise ValueError(f"{config_path} has no 'model_cfg'; expected open_clip's Hub layout")
        model = model or {**hub["model_cfg"], "preprocess_cfg": hub.get("preprocess_cfg", {})}
        weights = _first_file(src, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
    else:
        weights = src
    if model is None:
        raise ValueError(f"{src}: an open_clip weights file needs model_name= (e.g. 'ViT-B-32') or model_cfg=")
    state = load_weights(weights)
    if state and all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k.removeprefix("module."): v for k, v in state.items()}
    config = encoder_config_from_open_clip(model, image_size=image_size, normalization=normalization)
    mapped = map_open_clip_visual_state(state, config, model)
    source = {"importer": "open_clip", "path": str(src), "model": model}
    return write_part(out, "encoder", config, mapped, source)


def _import_hf_llama(src: Path, out: Path) -> Path:
    from minivlm.interop.hf_llama import decoder_config_from_hf, load_hf_state, map_hf_llama_state, read_hf_config

    config = decoder_config_from_hf(read_hf_config(src))
    mapped = map_hf_llama_state(load_hf_state(src), config)
    written = write_part(out, "decoder", config, mapped, {"importer": "hf-llama", "path": str(src)})
    _copy_tokenizer(src, written)
    return written


def write_staged(out: str | Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(directory)`` into a temporary directory beside ``out``, then move each file into
    ``out`` (each an atomic rename): a failure leaves no half-written checkpoint behind."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(staging)
        out.mkdir(exist_ok=True)
        for item in staging.iterdir():
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def write_complete(out: Path, config: VLMConfig, mapped: MappedState, processor: Any, source: dict[str, Any]) -> Path:
    """A whole model with its processor (tokenizer, image processor, template) and the import record."""

    def write(directory: Path) -> None:
        write_model(directory, config, mapped, source.get("path", "import"))
        if processor is not None:
            processor.save_pretrained(directory)
        (directory / SOURCE_NAME).write_text(json.dumps(source, indent=2, sort_keys=True) + "\n")

    return write_staged(out, write)


def _import_llava(src: Path, out: Path) -> Path:
    from minivlm.interop.hf_llama import load_hf_state, read_hf_config
    from minivlm.interop.llava import llava_processor, map_llava_state, vlm_config_from_llava

    hf = read_hf_config(src)
    config = vlm_config_from_llava(hf)
    processor = llava_processor(src, config)  # checked before anything is written
    if processor is None:
        log.warning("%s ships no tokenizer: writing the weights only (the checkpoint cannot read text)", src)
    mapped = map_llava_state(load_hf_state(src), config)
    return write_complete(out, config, mapped, processor, {"importer": "llava", "path": str(src), "config": hf})


def _import_smolvlm(src: Path, out: Path) -> Path:
    from minivlm.interop.hf_llama import load_hf_state, read_hf_config
    from minivlm.interop.idefics3 import idefics3_processor, map_idefics3_state, vlm_config_from_idefics3

    hf = read_hf_config(src)
    config = vlm_config_from_idefics3(hf)
    processor = idefics3_processor(src, config)
    mapped = map_idefics3_state(load_hf_state(src), config)
    return write_complete(out, config, mapped, processor, {"importer": "smolvlm", "path": str(src), "config": hf})


def _import_nanovlm(src: Path, out: Path, tokenizer: str | Path | None = None) -> Path:
    from minivlm.interop.hf_llama import read_hf_config
    from minivlm.interop.nanovlm import map_nanovlm_state, nanovlm_processor, vlm_config_from_nanovlm

    nano = read_hf_config(src)
    config = vlm_config_from_nanovlm(nano)
    processor = nanovlm_processor(nano, config, tokenizer)
    mapped = map_nanovlm_state(load_safetensors(_first_file(src, ("model.safetensors",))), config)
    return write_complete(out, config, mapped, processor, {"importer": "nanovlm", "path": str(src), "config": nano})


_IMPORTERS: dict[str, Callable[..., Path]] = {
    "timm": _import_timm, "open_clip": _import_open_clip, "hf-llama": _import_hf_llama, "llava": _import_llava,
    "smolvlm": _import_smolvlm, "nanovlm": _import_nanovlm}
_OPTIONS: dict[str, tuple[str, ...]] = {
    "timm": ("model_name", "model_args", "image_size", "normalization"),
    "open_clip": ("model_name", "model_cfg", "image_size", "normalization"),
    "hf-llama": (), "llava": (), "smolvlm": (), "nanovlm": ("tokenizer",),
}


def import_checkpoint(kind: str, src: str | Path, out_dir: str | Path, **opts: Any) -> Path:
    """Convert a foreign checkpoint into a minivlm directory (see the module docstring).

    Args:
        kind: ``"timm"`` | ``"open_clip"`` | ``"hf-llama"`` | ``"llava"`` | ``"smolvlm"`` | ``"nanovlm"``.
        src: ``timm``: a timm Hub directory (``config.json`` + ``model.safetensors``) or a weights
            file with ``model_name=``; ``open_clip``: an open_clip Hub directory
            (``open_clip_config.json`` + ``open_clip_model.safetensors``) or a weights file with
            ``model_name=`` / ``model_cfg=``; ``hf-llama`` / ``llava``: a Hugging Face directory
            (``config.json`` + one or sharded safetensors, ``tokenizer.model`` copied if present);
            ``smolvlm``: an Idefics3 / SmolVLM / SmolVLM2 directory (model + processor files);
            ``nanovlm``: a nanoVLM ``save_pretrained`` directory (its tokenizer is the hub id in
            its config, read from the local cache, or ``tokenizer=DIR``). Any SRC may instead be
            a hub id in the local Hugging Face cache (:mod:`minivlm.interop.hub`).
        out_dir: the directory to write.
        opts: ``timm``: model_name, model_args, image_size, normalization; ``open_clip``:
            model_name, model_cfg, image_size, normalization (``image_size`` builds the encoder for
            another square size, resampling position embeddings).

    Returns:
        ``out_dir``: a part directory (``timm``, ``open_clip``: the encoder; ``hf-llama``: the
        decoder) or a complete minivlm checkpoint with its processor and chat template
        (``llava``, ``smolvlm``, ``nanovlm``).
    """
    if kind not in _IMPORTERS:
        raise ValueError(f"unknown import kind {kind!r}; expected one of {list(IMPORT_KINDS)}")
    unknown = sorted(set(opts) - set(_OPTIONS[kind]))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {kind!r}; expected some of {list(_OPTIONS[kind])}")
    from minivlm.interop.hub import resolve_source

    return _IMPORTERS[kind](resolve_source(kind, src), Path(out_dir), **opts)


# ---- reading ------------------------------------------------------------------------------------


def _part_config_differences(part: str, stored: dict[str, Any], own: Any) -> list[str]:
    """``"part.field: checkpoint X vs model Y"`` for every non-free field that differs.

    A field the stored config lacks (written before the field existed) counts as its default.
    """
    stored = {**dataclasses.asdict(type(own)()), **stored}
    return [f"{part}.{name}: checkpoint {stored[name]!r} vs model {value!r}"
            for name, value in dataclasses.asdict(own).items()
            if name not in FREE_FIELDS[part] and stored[name] != value]


def read_part_directory(path: str | Path, part: str) -> tuple[dict[str, Any], dict[str, Tensor], list[str]]:
    """``(part config dict, part-relative tensors, keys outside the part)`` from either directory kind.

    Keys of other parts in a *full* checkpoint are expected and not returned; in a part directory
    every key must carry the part prefix, and any other is returned as a problem.
    """
    d = Path(path)
    prefix = f"{part}."
    if (d / PART_CONFIG_NAME).is_file():
        meta = json.loads((d / PART_CONFIG_NAME).read_text())
        if meta.get("format") != PART_FORMAT or meta.get("format_version") != PART_FORMAT_VERSION:
            raise ValueError(f"{d / PART_CONFIG_NAME}: expected format {PART_FORMAT!r} version {PART_FORMAT_VERSION}, "
                             f"got {meta.get('format')!r} version {meta.get('format_version')!r}")
        if meta.get("part") != part:
            raise ValueError(f"{d} holds a {meta.get('part')!r} part; cannot initialise the {part!r} from it")
        state = load_safetensors(d / WEIGHTS_NAME)
        strays = [k for k in state if not k.startswith(prefix)]
        stored = meta["config"]
    elif (d / CONFIG_NAME).is_file():
        try:
            full_config = VLMConfig.from_json(d / CONFIG_NAME)
        except ConfigError as err:
            raise ValueError(f"{d} is not a minivlm checkpoint: its {CONFIG_NAME} is not a minivlm config ({err}); "
                             f"convert it first with `minivlm import`") from err
        stored = dataclasses.asdict(getattr(full_config, part))
        state = load_safetensors(d / WEIGHTS_NAME)
        strays = []
    else:
        raise FileNotFoundError(f"{d} is neither a minivlm part directory ({PART_CONFIG_NAME}) nor a minivlm "
                                f"checkpoint ({CONFIG_NAME}); create one with `minivlm import`")
    return stored, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strays


def _resample_encoder_pos(state: dict[str, Tensor], stored: dict[str, Any], own: EncoderConfig) -> None:
    """Resample ``pos_embed`` in place when the checkpoint was made for another image size."""
    stored_grid = stored["image_size"] // stored["patch_size"]
    if "pos_embed" in state and stored["patch_size"] == own.patch_size and stored_grid != own.grid_size:
        n_prefix = 1 if own.class_token else 0
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], (own.grid_size, own.grid_size), n_prefix,
                                              (stored_grid, stored_grid))
        log.info("resampled encoder position embeddings from a %dx%d to a %dx%d grid",
                 stored_grid, stored_grid, own.grid_size, own.grid_size)


def load_part_weights(model: VisionLanguageModel, part: str, path: str | Path) -> None:
    """Initialise one part of ``model`` from a part directory or a full minivlm checkpoint.

    What a config's ``<part>.init_from=DIR`` does. The part's config must match the checkpoint's
    (except :data:`FREE_FIELDS`), and every tensor must map: all problems are reported at once.

    Raises:
        PartConfigMismatchError: listing every differing config field.
        WeightMappingError: listing every stray, missing or mismatched key.
    """
    module = model.part(part)
    own_config = getattr(model.config, part)
    stored, state, strays = read_part_directory(path, part)
    differences = _part_config_differences(part, stored, own_config)
    if differences:
        raise PartConfigMismatchError(f"{path} was made for a differently configured {part}:\n  "
                                      + "\n  ".join(differences))
    if part == "encoder":
        _resample_encoder_pos(state, stored, own_config)
    load_mapped(module, MappedState(state, unmapped=strays), str(path))
    log.info("initialised the %s from %s (%d tensors)", part, path, len(state))

