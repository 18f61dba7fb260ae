"""``minivlm import`` and ``minivlm export``: published checkpoints in and out.

    minivlm import smolvlm HuggingFaceTB/SmolVLM-Instruct --out models/smolvlm   # from the local HF cache
    minivlm import llava path/to/llava-1.5-7b-hf --out models/llava
    minivlm import nanovlm path/to/nanoVLM-230M --out models/nanovlm [--tokenizer DIR]
    minivlm import timm vit_tiny_patch16_224.augreg_in21k --out parts/vit      # timm/<name> in the cache
    minivlm export smolvlm runs/finetune/model --out hf/smolvlm-finetuned          # also llava, nanovlm
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from minivlm.interop.convert import IMPORT_KINDS
    from minivlm.interop.hf_export import EXPORT_KINDS

    p = subparsers.add_parser(
        "import", help="convert a published checkpoint (SmolVLM, LLaVA, nanoVLM, timm, open_clip, HF Llama) into minivlm",
        description="Convert a checkpoint into a minivlm directory. Whole VLMs (smolvlm, llava, nanovlm) become complete "
                    "checkpoints (weights, config, tokenizer, image processing, chat template) that chat, eval, train and "
                    "from_pretrained accept; encoders and decoders become part directories (encoder.init_from=DIR).")
    p.add_argument("kind", choices=sorted(IMPORT_KINDS))
    p.add_argument("src", help="a directory or weights file, or a Hugging Face hub id (org/name) already in the local "
                               "cache (nothing is downloaded); for timm also a model name (timm/<name> in the cache)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--model-name", help="timm / open_clip: the architecture when SRC is a bare weights file")
    p.add_argument("--image-size", type=int, help="timm / open_clip: encoder input size (resamples position embeddings)")
    p.add_argument("--normalization", choices=["clip", "siglip", "imagenet"], help="timm / open_clip: image statistics")
    p.add_argument("--tokenizer", metavar="DIR_OR_HUB_ID", help="nanovlm: the tokenizer, instead of the hub id its "
                                                                 "config names")
    p.set_defaults(func=cmd_import)

    p = subparsers.add_parser("export", help="write a minivlm checkpoint back in the Hugging Face layout",
                              description="Write a checkpoint of an imported kind (or one trained from it) as the "
                                          "original library lays it out, processor files included.")
    p.add_argument("kind", choices=sorted(EXPORT_KINDS))
    p.add_argument("model", metavar="DIR", help="a minivlm checkpoint directory")
    p.add_argument("--out", required=True, metavar="DIR")
    p.set_defaults(func=cmd_export)


def cmd_import(args: argparse.Namespace) -> int:
    from minivlm.interop.convert import import_checkpoint

    opts = {k: v for k, v in (("model_name", args.model_name), ("image_size", args.image_size),
                              ("normalization", args.normalization), ("tokenizer", args.tokenizer)) if v is not None}
    for option in opts:
        if option == "tokenizer" and args.kind != "nanovlm" or option != "tokenizer" and args.kind not in ("timm", "open_clip"):
            raise ValueError(f"--{option.replace('_', '-')} does not apply to `minivlm import {args.kind}`")
    out = import_checkpoint(args.kind, args.src, args.out, **opts)
    print(f"wrote {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from minivlm.interop.hf_export import export_checkpoint

    print(f"wrote {export_checkpoint(args.kind, args.model, args.out)}")
    return 0
