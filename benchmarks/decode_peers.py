"""Batch-1 greedy decoding on the CPU: minivlm (eager and compiled) against nanoVLM and
transformers' Idefics3, at identical shapes, interleaved in one process.

Run from the repository root::

    python -m benchmarks.decode_peers [--rounds 7] [--new-tokens 64] [--threads 1] [--no-compile]
                                      [--nanovlm ../shared/peers/nanovlm] [--out DIR]

The models are :func:`benchmarks.models.benchmark_config` ``(small=True)`` with random weights,
fp32 on the CPU, and each ``generate`` call decodes ``new_tokens`` tokens after one image and 16
text tokens (image encoding and prefill included, as a user's call pays them). nanoVLM is
imported from its source (``models/`` of huggingface/nanoVLM; ``--nanovlm``); its row is skipped
when that folder is absent. Rows run in rounds, each implementation once per round (A B C A B C
...), so a busy machine slows all of them alike; the table reports medians over rounds of the
tokens per second measured on the wall clock and on the process's CPU time (steadier on a shared
machine), and of each row's per-round ratio to nanoVLM, and the ratio of each row's fastest round
(CPU time) to nanoVLM's fastest.

The compiled row is ``GenerationConfig(compile=True)`` (``torch.compile`` of the decode step,
inductor's C++ backend on the CPU): one compilation per process (its time is printed apart and
excluded from the rounds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import environment
from benchmarks.decode import make_prompt, minivlm_generate, peer_generate
from benchmarks.models import benchmark_config, build_idefics3, build_minivlm
from benchmarks.tables import format_table
from minivlm.config import VLMConfig
from minivlm.registry import image_tokens

DEFAULT_NANOVLM = Path(__file__).resolve().parents[1].parent / "shared" / "peers" / "nanovlm"
CPU = torch.device("cpu")


def load_nanovlm(source: Path):
    """nanoVLM's ``models`` package from its source folder, or None when the folder is absent.

    Its ``vision_language_model`` imports ``data.processors.get_tokenizer`` (a hub download) at
    module level; only the image token id and the end-of-sequence id are read from the tokenizer
    in ``forward`` and ``generate``, so a stand-in module supplies them.
    """
    if not (source / "models" / "vision_language_model.py").is_file():
        return None
    data, processors = types.ModuleType("data"), types.ModuleType("data.processors")
    processors.get_tokenizer = lambda *args, **kwargs: None  # build_nanovlm sets the one it uses
    data.processors = processors
    saved = {name: sys.modules.get(name) for name in ("data", "data.processors")}
    sys.modules.update({"data": data, "data.processors": processors})
    sys.path.insert(0, str(source))
    try:
        import models.config as nano_config
        import models.vision_language_model as nano_vlm
    finally:  # leave the interpreter's import state as it was, but for nanoVLM's own modules
        sys.path.remove(str(source))
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return nano_config, nano_vlm


def build_nanovlm(modules, config: VLMConfig):
    """nanoVLM at minivlm's shapes: the same ViT, pixel-shuffle connector and Llama decoder."""
    nano_config, nano_vlm = modules
    e, p, d = config.encoder, config.projector, config.decoder
    cfg = nano_config.VLMConfig(
        vit_hidden_dim=e.width, vit_inter_dim=e.mlp_dim, vit_patch_size=e.patch_size, vit_img_size=e.image_size,
        vit_n_heads=e.n_heads, vit_n_blocks=e.depth, vit_ln_eps=e.norm_eps, vit_cls_flag=e.class_token,
        lm_hidden_dim=d.width, lm_inter_dim=d.mlp_dim, lm_rms_eps=d.norm_eps, lm_re_base=d.rope_theta,
        lm_max_position_embeddings=d.max_seq_len, lm_vocab_size=d.vocab_size, lm_n_heads=d.n_heads,
        lm_n_kv_heads=d.n_kv_heads, lm_n_blocks=d.n_layers, lm_tie_weights=d.tie_embeddings,
        lm_max_length=d.max_seq_len, mp_pixel_shuffle_factor=p.shuffle_factor,
        mp_image_token_length=image_tokens(config), vlm_load_backbone_weights=False,
    )
    tokenizer = types.SimpleNamespace(image_token_id=config.image_token_id, eos_token_id=None)
    nano_vlm.get_tokenizer = lambda *args, **kwargs: tokenizer
    return nano_vlm.VisionLanguageModel(cfg, load_backbone=False).eval()


def nanovlm_generate(model, input_ids: torch.Tensor, pixels: torch.Tensor, new_tokens: int) -> Callable[[], int]:
    def run() -> int:
        with torch.no_grad():
            out = model.generate(input_ids, pixels, attention_mask=None, max_new_tokens=new_tokens, greedy=True)
        return out.shape[1]

    return run


def interleave(runs: dict[str, Callable[[], int]], rounds: int, new_tokens: int
               ) -> dict[str, list[tuple[float, float]]]:
    """``{name: [(wall tok/s, cpu tok/s) per round]}``, each name run once per round in turn."""
    measured: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            measured[name].append((new_tokens / (time.perf_counter() - wall), new_tokens / (time.process_time() - cpu)))
    return measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled minivlm row")
    parser.add_argument("--nanovlm", type=Path, default=DEFAULT_NANOVLM, help="nanoVLM source folder (holding models/)")
    parser.add_argument("--out", type=Path, default=None, help="directory for decode_peers.json")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.new_tokens < 1 or args.threads < 1:
        parser.error("--rounds, --new-tokens and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = benchmark_config(small=True)
    input_ids, pixels = make_prompt(config, 1, CPU, torch.float32)
    n = args.new_tokens
    runs: dict[str, Callable[[], int]] = {"minivlm eager": minivlm_generate(build_minivlm(config, CPU).eval(),
                                                                           input_ids, pixels, n, None)}
    notes, first_call = [], {}
    if not args.no_compile:
        runs["minivlm compiled"] = minivlm_generate(build_minivlm(config, CPU).eval(), input_ids, pixels, n, "inductor")
    nanovlm = load_nanovlm(args.nanovlm)
    if nanovlm is None:
        notes.append(f"nanoVLM skipped: no models/ in {args.nanovlm}")
    else:
        runs["nanoVLM eager"] = nanovlm_generate(build_nanovlm(nanovlm, config), input_ids, pixels, n)
    runs["transformers Idefics3 eager"] = peer_generate(build_idefics3(config, CPU).eval(), input_ids, pixels, n)
    for name, run in runs.items():  # warm-up; the first compiled call compiles
        start = time.perf_counter()
        produced = run()
        first_call[name] = time.perf_counter() - start
        if produced != n:
            raise RuntimeError(f"{name} produced {produced} tokens, expected {n}")
    uptime_before = _load()
    measured = interleave(runs, args.rounds, n)
    reference = "nanoVLM eager" if "nanoVLM eager" in runs else "transformers Idefics3 eager"
    rows = []
    for name, values in measured.items():
        ratios = [(w / rw, c / rc) for (w, c), (rw, rc) in zip(values, measured[reference], strict=True)]
        rows.append({
            "implementation": name, "first call s": round(first_call[name], 2),
            "wall tok/s": round(statistics.median(v[0] for v in values)),
            "cpu tok/s": round(statistics.median(v[1] for v in values)),
            f"wall x {reference}": round(statistics.median(r[0] for r in ratios), 3),
            f"cpu x {reference}": round(statistics.median(r[1] for r in ratios), 3),
            # Each row's fastest round against the reference's fastest: what a transient slowdown of
            # this shared VM (up to 1.9x between rounds) disturbs least.
            f"best cpu x {reference}": round(max(v[1] for v in values) / max(v[1] for v in measured[reference]), 3),
        })
    print(f"== decode_peers: batch 1, {n} new tokens, {args.rounds} interleaved rounds, {args.threads} thread(s); "
          f"load before {uptime_before}, after {_load()} ==")
    print(format_table(rows, list(rows[0])))
    for note in notes:
        print(note)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        payload = {"benchmark": "decode_peers", "environment": environment(CPU), "args": {k: str(v) for k, v in vars(args).items()},
                   "load": [uptime_before, _load()], "rows": rows, "rounds": measured, "notes": notes}
        (args.out / "decode_peers.json").write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def _load() -> str:
    """The 1-minute load average: how busy the machine was (the rows share it alike)."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
