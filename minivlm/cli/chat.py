"""``minivlm chat``: ask a trained model about images or a video, once or interactively.

    minivlm chat --model runs/tiny/model --image shapes.png "What colour is the circle?"
    minivlm chat --model runs/tiny/model --image a.png --image b.png      # interactive session

Without a question it reads one question per line from stdin until EOF or ``exit``; every turn
sees the earlier turns and the images given on the command line. A line that is not UTF-8 is
reported and skipped (the session goes on; the exit code is then 2).
"""

from __future__ import annotations

import argparse
import json
import sys

from minivlm.cli.common import add_generation_arguments, add_model_arguments, generation_options, load_model

EXIT_WORDS = ("exit", "quit")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "chat", help="ask a trained model about images or a video (interactive without a question)",
        description="Answer a question about images or a video. Without a question, read questions line by "
                    "line from stdin (a multi-turn conversation) until EOF or 'exit'.")
    p.add_argument("question", nargs="?", help="the question; omit it for an interactive session")
    add_model_arguments(p)
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="an image (repeatable)")
    p.add_argument("--video", metavar="PATH", help="a video: frame directory, GIF/WebP, or MP4 (with PyAV)")
    p.add_argument("--system", metavar="TEXT", help="system prompt")
    output = p.add_mutually_exclusive_group()
    output.add_argument("--stream", action="store_true", help="print the answer while it is generated")
    output.add_argument("--json", action="store_true", help='print {"answer": ...} (one object per turn)')
    add_generation_arguments(p)
    p.set_defaults(func=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    from minivlm.cli.errors import EXIT_BAD_INPUT
    from minivlm.generate import ChatSession, generation_config
    from minivlm.text.chat import ChatFormatError, check_text_encoding
    from minivlm.vision import load_image, load_video

    # Everything the user typed is checked before the model is even loaded.
    for text, what in ((args.question, "the question"), (args.system, "--system")):
        if text is not None:
            check_text_encoding(text, what)
    config = generation_config(**generation_options(args))
    images = [load_image(path) for path in args.image]
    if args.video is not None:
        load_video(args.video, max_frames=1)
    model = load_model(args)
    session = ChatSession(model, system=args.system, config=config)
    if args.question is not None:
        _answer(session, args.question, images, args.video, args)
        return 0
    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):  # a non-UTF-8 byte then fails one line, not the session
        sys.stdin.reconfigure(errors="surrogateescape")
    first_turn, exit_code, number = True, 0, 0
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        number += 1
        if not line or line.strip().lower() in EXIT_WORDS:
            return exit_code
        if not line.strip():
            continue
        # The media belong to the first turn; later turns still see them in the conversation.
        try:
            check_text_encoding(line.strip(), f"stdin line {number}")
            _answer(session, line.strip(), images if first_turn else [], args.video if first_turn else None, args)
        except KeyboardInterrupt:
            # Ctrl-C stops this answer only; the unfinished turn is not kept (ChatSession.ask_stream).
            print("\n(interrupted)", file=sys.stderr, flush=True)
            continue
        except ChatFormatError as err:  # this line only (e.g. not UTF-8): the session goes on
            print(f"minivlm chat: error: {err}", file=sys.stderr, flush=True)
            exit_code = EXIT_BAD_INPUT
            continue
        first_turn = False


def _answer(session, question: str, images: list, video: str | None, args: argparse.Namespace) -> None:
    if args.stream:
        for piece in session.ask_stream(question, images, video):
            print(piece, end="", flush=True)
        print()
    elif args.json:
        print(json.dumps({"answer": session.ask(question, images, video)}), flush=True)
    else:
        print(session.ask(question, images, video), flush=True)
