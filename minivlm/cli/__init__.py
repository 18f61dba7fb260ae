"""Command line: ``minivlm train | chat | eval | ...``. Only this package prints.

The core commands live here; larger ones are modules of this package (``chat``, ``evaluate``,
``retrieve``, ``ablate``, ``explain``), each exposing ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import signal
import sys
import time
from pathlib import Path

from minivlm.config import PRESETS, VLMConfig, preset


def _load_config(spec: str) -> VLMConfig:
    """A preset name, a checkpoint directory, or a config.json path."""
    p = Path(spec)
    if p.is_dir():
        return VLMConfig.from_json(p / "config.json")
    if p.suffix == ".json" and p.is_file():
        return VLMConfig.from_json(p)
    return preset(spec)


def cmd_summary(args: argparse.Namespace) -> int:
    from minivlm.summary import summarize

    cfg = _load_config(args.model).override(*args.overrides)
    s = summarize(cfg, text_tokens=args.text_tokens)
    print(json.dumps(s.to_dict(), indent=2) if args.json else f"{s.name}\n{s.table()}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Build ``tiny``, print its summary, run one forward/backward on random data."""
    import torch

    from minivlm.model import VisionLanguageModel
    from minivlm.registry import image_seq_len
    from minivlm.summary import summarize

    torch.manual_seed(args.seed)
    cfg = preset("tiny").override(*args.overrides)
    model = VisionLanguageModel(cfg)
    print(f"minivlm demo: preset {cfg.name}\n{summarize(model).table()}")
    n_image = image_seq_len(cfg)
    B, T = 4, n_image + 32
    ids = torch.randint(cfg.image_token_id + 1, cfg.decoder.vocab_size, (B, T))
    ids[:, 1:1 + n_image] = cfg.image_token_id
    pixels = torch.randn(B, cfg.encoder.pixel_channels, cfg.encoder.image_size, cfg.encoder.image_size)
    labels = ids.clone()
    labels[:, : 1 + n_image] = -100
    t0 = time.perf_counter()
    out = model(ids, pixel_values=pixels, labels=labels)
    out.loss.backward()
    dt = time.perf_counter() - t0
    grads = sum(p.grad is not None for p in model.parameters())
    print(f"forward+backward on batch {B} x {T} tokens: loss {out.loss.item():.3f} "
          f"(ln V = {torch.log(torch.tensor(float(cfg.decoder.vocab_size))):.3f}), {dt * 1000:.0f} ms, "
          f"{grads} parameter tensors received gradients")
    return 0


def train_assignments(args: argparse.Namespace) -> list[str]:
    """The config settings this ``minivlm train`` command line gives explicitly, as overrides."""
    assignments = list(args.overrides)
    for flag, key in ((args.data, "data.mixture"), (args.steps, "train.steps"), (args.seed, "train.seed")):
        if flag is not None:
            assignments.append(f"{key}={flag}")
    return assignments


def cmd_train(args: argparse.Namespace) -> int:
    from minivlm.cli.errors import EXIT_FAILED, interrupted_exit_code
    from minivlm.registry import validate_config
    from minivlm.train.recipe import run

    base = args.model
    if base and not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(f"--model {base}: not a checkpoint directory (no config.json)")
    assignments = train_assignments(args)
    cfg = (_load_config(base) if base else preset(args.preset or "tiny")).override(*assignments)
    validate_config(cfg)
    run_dir = Path(args.out) if args.out else Path("runs") / (args.name or cfg.name)
    explicit = assignments + ([f"name={cfg.name}"] if args.preset else [])  # --preset must match on --resume
    out = run(cfg, run_dir, resume=args.resume, overwrite=args.overwrite, overrides=explicit,
              max_minutes=args.max_minutes, eval_limit=args.eval_limit, progress=not args.no_progress, base=base)
    if out.status == "interrupted":
        name = signal.Signals(out.stop_signal).name if out.stop_signal else "a signal"
        print(f"\ntraining interrupted by {name} at step {out.steps}; a checkpoint was saved in {run_dir}: "
              f"run the same command with --resume to continue", file=sys.stderr)
        return interrupted_exit_code(out.stop_signal)
    if out.status == "nonfinite":
        print(f"minivlm train: error: training failed: {out.skipped_steps} steps were skipped for a non-finite "
              f"loss or gradient; {out.model_dir} was not written (lower train.lr, or use train.precision=bf16 "
              f"or fp32)", file=sys.stderr)
        return EXIT_FAILED
    if out.report is not None:
        print(f"\ntrained {out.steps} steps in {out.train_seconds:.0f} s ({out.status}); "
              f"evaluated in {out.eval_seconds:.0f} s\n")
        print(out.report.table())
        preds = out.report.predictions
        print("\nsample answers:")
        for p in preds[:: max(1, len(preds) // 40)][:8]:  # the spread eval.json keeps
            mark = "" if p.correct is None else ("  ok" if p.correct else "  WRONG")
            print(f"  [{p.task}] {p.question!r} -> {p.prediction!r} (expected {p.answer!r}){mark}")
    if out.not_evaluated:
        print(f"\nnot evaluated: {', '.join(out.not_evaluated)} (file data has no test split; score a held-out "
              f"file with: minivlm eval --model {out.model_dir} --data jsonl:TEST.jsonl)")
    print(f"\nmodel: {out.model_dir}\nrun:   {run_dir} (metrics.jsonl, loss.png, eval.json)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from minivlm.train.plot import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


#: Subcommands that modules of this package add with ``register(subparsers)``: name -> (module, help).
#: A module is imported only when its command is chosen, since building its parser can be heavy
#: (``import`` lists the import kinds, which imports torch); ``minivlm --help`` lists them from here.
COMMAND_MODULES: dict[str, tuple[str, str]] = {
    "ablate": ("minivlm.cli.ablate", "train and evaluate a grid of config variants under one budget; write tables "
                                     "and plots"),
    "explain": ("minivlm.cli.explain", "answer a question about an image and save decoder attention + encoder "
                                       "rollout maps"),
    "chat": ("minivlm.cli.chat", "ask a trained model about images or a video (interactive without a question)"),
    "eval": ("minivlm.cli.evaluate", "score a checkpoint on test data (VQA accuracy, BLEU-4/CIDEr, recall@k)"),
    "retrieve": ("minivlm.cli.retrieve", "rank images for a text (--text --images) or texts for an image "
                                         "(--image --texts)"),
    "import": ("minivlm.cli.import_", "convert a published checkpoint (SmolVLM, LLaVA, nanoVLM, timm, open_clip, "
                                      "HF Llama) into minivlm"),
    "export": ("minivlm.cli.import_", "write a minivlm checkpoint back in the Hugging Face layout"),
}


def chosen_command(argv: list[str]) -> str | None:
    """The subcommand named on a command line: its first argument that is not an option."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The command-line parser; only the module of the command chosen in ``argv`` (default:
    ``sys.argv[1:]``) builds its full subparser, the others are listed by name and help."""
    parser = argparse.ArgumentParser(prog="minivlm", description="A from-scratch modular vision-language model library.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error (and debug logging)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("summary", help="parameters, FLOPs and image tokens per part")
    p.add_argument("model", help=f"a preset ({', '.join(sorted(PRESETS))}), checkpoint directory or config.json")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. decoder.n_layers=8")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens in the reference sample")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("train", help="train a model (default: tiny preset on the embedded data mixture)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.lr=1e-3 projector=mlp")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), help="model and recipe preset (default: tiny)")
    source.add_argument("--model", metavar="DIR", help="fine-tune this checkpoint (e.g. from `minivlm import`) "
                                                       "instead of a preset; overrides and train.lora_rank=N apply")
    p.add_argument("--data", help="mixture spec, e.g. easy_vqa:0.5,shapes:0.3,charts:0.2")
    p.add_argument("--out", help="run directory (default runs/<name>)")
    p.add_argument("--name", help="run name under runs/")
    p.add_argument("--steps", type=int)
    p.add_argument("--max-minutes", type=float, help="stop training after this many minutes")
    p.add_argument("--seed", type=int)
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true",
                          help="continue the run of the directory from its newest intact checkpoint")
    existing.add_argument("--overwrite", action="store_true",
                          help="delete the run files already in the directory (checkpoints, model, metrics) first")
    p.add_argument("--eval-limit", type=int, help="score at most this many test samples per task")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plot", help="draw a run's loss curve")
    p.add_argument("run_dir")
    p.add_argument("--out")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("demo", help="build the tiny model and run one forward/backward")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    chosen = chosen_command(sys.argv[1:] if argv is None else argv)
    if chosen in COMMAND_MODULES:
        importlib.import_module(COMMAND_MODULES[chosen][0]).register(sub)
    for name, (_, help_text) in COMMAND_MODULES.items():
        if name not in sub.choices:
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure is one line on stderr and an exit code (:mod:`minivlm.cli.errors`)."""
    from minivlm.cli.errors import run_guarded

    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose or args.debug else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    return run_guarded(args.command, args.func, args, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
