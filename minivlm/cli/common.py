"""What the subcommands share: loading a checkpoint directory and the sampling options."""

from __future__ import annotations

import argparse
from typing import Any


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="checkpoint directory written by `minivlm train` (e.g. runs/tiny/model)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")


def load_model(args: argparse.Namespace):
    """The checkpoint of ``--model`` (with its retrieval head, if saved) on ``--device``, in eval mode.

    Raises:
        FileNotFoundError: not a checkpoint directory.
        ValueError: the checkpoint has no processor (tokenizer + image settings) to read inputs with.
    """
    import torch

    from minivlm.retrieval import load_pretrained

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_pretrained(args.model, map_location=device).eval()
    if model.processor is None:
        raise ValueError(f"{args.model} has no processor_config.json / tokenizer.model: it cannot read text or images")
    return model


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling (defaults: greedy, 64 new tokens)")
    group.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    group.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy")
    group.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off")
    group.add_argument("--top-p", type=float, default=1.0, metavar="P", help="in (0, 1]; 1 = off")
    group.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R", help="1 = off")
    group.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    group.add_argument("--seed", type=int, help="makes sampling reproducible")


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~minivlm.generate.GenerationConfig` fields set by :func:`add_generation_arguments`."""
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "repetition_penalty": args.repetition_penalty,
            "stop_strings": tuple(args.stop), "seed": args.seed}
