"""``minivlm explain``: answer a question about an image and save its attention maps as a PNG."""

from __future__ import annotations

import argparse
from pathlib import Path

from minivlm.cli.common import add_model_arguments, load_model


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "explain", help="answer a question about an image and save decoder attention + encoder rollout maps",
        description="Generate the answer, then draw where the answer tokens attended on the image (decoder "
                    "attention mapped back to patches) and the encoder's attention rollout.")
    p.add_argument("question", help="the question, e.g. \"what shape is in the image?\"")
    add_model_arguments(p)
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--out", help="PNG to write (default: <image name>_explain.png in the current directory)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.set_defaults(func=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    from minivlm.explain import explain

    image = Path(args.image)
    if not image.is_file():
        raise FileNotFoundError(f"image {image} does not exist")
    model = load_model(args)
    result = explain(model, str(image), args.question, max_new_tokens=args.max_new_tokens)
    out = result.save(Path(args.out) if args.out else Path(f"{image.stem}_explain.png"))
    share = result.image_attention_share
    share = "" if share is None else f" ({share:.0%} of the answer's attention on the image)"
    print(f"Q: {args.question}\nA: {result.answer}{share}\nwrote {out}")
    return 0
