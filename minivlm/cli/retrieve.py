"""``minivlm retrieve``: rank images for a text, or texts for an image, with a retrieval head.

    minivlm retrieve --model DIR --images photos/ --text "a large red circle at the top left"
    minivlm retrieve --model DIR --image photo.png --texts captions.txt --top 3

Scores are cosine similarities of the model's image and text embeddings
(:mod:`minivlm.retrieval`); the model needs a trained retrieval head.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from minivlm.cli.common import add_model_arguments, load_model

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "retrieve", help="rank images for a text (--text --images) or texts for an image (--image --texts)",
        description="Cross-modal retrieval with the model's retrieval head: text -> images or image -> texts.")
    add_model_arguments(p)
    p.add_argument("--text", help="query text (ranks --images)")
    p.add_argument("--images", nargs="+", metavar="DIR_OR_FILE", help="images to rank: files and/or directories")
    p.add_argument("--image", metavar="PATH", help="query image (ranks --texts)")
    p.add_argument("--texts", metavar="FILE", help="texts to rank, one per line")
    p.add_argument("--top", type=int, default=10, metavar="K", help="show the K best (default 10)")
    p.add_argument("--json", action="store_true", help="print the query and ranked results as JSON")
    p.set_defaults(func=cmd_retrieve)


def image_files(sources: list[str]) -> list[Path]:
    """Files as given, directories expanded to their image files (sorted by name)."""
    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            files.extend(sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif source.is_file():
            files.append(source)
        else:
            raise FileNotFoundError(f"--images: {source} is neither a file nor a directory")
    if not files:
        raise ValueError(f"--images: no image files ({', '.join(IMAGE_SUFFIXES)}) in {sources}")
    return files


def read_texts(path: str) -> list[str]:
    """Non-empty lines of ``path``, stripped."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--texts: {file} does not exist")
    texts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"--texts: {file} holds no text (one per line expected)")
    return texts


def cmd_retrieve(args: argparse.Namespace) -> int:
    from minivlm.retrieval import embed_images, embed_texts, rank
    from minivlm.vision import load_image

    if args.text and args.images and not (args.image or args.texts):
        text_to_images = True
    elif args.image and args.texts and not (args.text or args.images):
        text_to_images = False
    else:
        raise ValueError("give either --text with --images (text -> images) or --image with --texts (image -> texts)")
    if args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    # Inputs are read (and unreadable images reported) before the model loads.
    if text_to_images:
        items = [str(f) for f in image_files(args.images)]
        images = [load_image(f) for f in items]
    else:
        items = read_texts(args.texts)
        query_image = load_image(args.image)
    model = load_model(args)
    if text_to_images:
        query_text, kind = args.text, "image"
        query, candidates = embed_texts(model, [args.text])[0], embed_images(model, images)
    else:
        query_text, kind = args.image, "text"
        query, candidates = embed_images(model, [query_image])[0], embed_texts(model, items)
    indices, scores = rank(query, candidates, k=min(args.top, len(items)))
    results = [{"rank": r + 1, "score": round(float(s), 4), kind: items[i]}
               for r, (i, s) in enumerate(zip(indices.tolist(), scores.tolist()))]
    if args.json:
        print(json.dumps({"query": query_text, "results": results}, indent=2))
        return 0
    print(f"query: {query_text}")
    for row in results:
        print(f"{row['rank']:>4}  {row['score']:+.4f}  {row[kind]}")
    return 0
