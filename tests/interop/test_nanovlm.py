"""nanoVLM checkpoints through `minivlm import nanovlm`: the model is nanoVLM's own code (the shared
peer copy of ``models/``); its tokenizer comes from a hub id in the local Hugging Face cache, laid
out as ``huggingface_hub`` lays it out.

The peer copy lacks nanoVLM's ``data/`` package, so the reference *inputs* are built here from
what ``data/processors.py`` and ``data/custom_transforms.py`` (revision 4e0c096) do: transformers'
tokenizer with ``extra_special_tokens`` and ChatML, the image string prepended to the first user
message, ``DynamicResize`` (Pillow bicubic) + ``ToTensor`` + ``GlobalAndSplitImages``.
"""
from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torchvision.transforms.functional as TF
from einops import rearrange

from paritykit import IMAGE_SIZES, image

transformers = pytest.importorskip("transformers")
REPO_ROOT = Path(__file__).resolve().parents[2]
PEER = REPO_ROOT.parent / "shared" / "peers" / "nanovlm"
sys.path.insert(0, str(REPO_ROOT))  # the repository's benchmarks package
pytestmark = pytest.mark.skipif(not (PEER / "models").is_dir(), reason="the nanoVLM peer (../shared/peers) is absent")

from minivlm.interop.convert import import_checkpoint  # noqa: E402
from minivlm.interop.reference import bytelevel_tokenizer  # noqa: E402
from minivlm.model import VisionLanguageModel  # noqa: E402

HUB_ID = "HuggingFaceTB/SmolLM2-360M-Instruct"
TILE, MAX_SIDE = 32, 96


def fake_hub_cache(root: Path, repo: str, files: dict[str, str]) -> Path:
    """A Hugging Face cache holding ``files`` of ``repo`` (refs/main -> snapshots/<commit>/...)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    return root


@pytest.fixture(scope="module")
def peer():
    """nanoVLM's ``models`` package, loaded as the decode benchmark loads it (a stand-in for the
    ``data.processors`` module it imports)."""
    from benchmarks.decode_peers import load_nanovlm

    config, vlm = load_nanovlm(PEER)
    return types.SimpleNamespace(config=config, vlm=vlm)


@pytest.fixture(scope="module")
def setup(peer, tmp_path_factory):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("nanovlm")
    fast = PreTrainedTokenizerFast(tokenizer_object=bytelevel_tokenizer([]), bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.save_pretrained(root / "tok")
    cache = fake_hub_cache(root / "cache", HUB_ID, {n: (root / "tok" / n).read_text()
                                                    for n in ("tokenizer.json", "tokenizer_config.json")})
    cfg = peer.config.VLMConfig(
        vit_hidden_dim=32, vit_inter_dim=64, vit_patch_size=8, vit_img_size=TILE, vit_n_heads=2, vit_n_blocks=2,
        lm_hidden_dim=32, lm_inter_dim=64, lm_n_heads=4, lm_n_kv_heads=2, lm_n_blocks=2, lm_base_vocab_size=len(fast),
        lm_vocab_size=len(fast) + 66, lm_re_base=10000, lm_max_position_embeddings=4096, mp_pixel_shuffle_factor=2,
        mp_image_token_length=4, max_img_size=MAX_SIDE, resize_to_max_side_len=False, lm_tokenizer=HUB_ID,
        vlm_load_backbone_weights=False)
    tokenizer = AutoTokenizer.from_pretrained(root / "tok", use_fast=True, extra_special_tokens=cfg.vlm_extra_tokens,
                                              chat_template=cfg.lm_chat_template)
    tokenizer.pad_token = tokenizer.eos_token
    peer.vlm.get_tokenizer = lambda *a, **k: types.SimpleNamespace(
        image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"), eos_token_id=None)
    torch.manual_seed(3)
    reference = peer.vlm.VisionLanguageModel(cfg, load_backbone=False).eval()
    reference.save_pretrained(str(root / "nano"))
    return types.SimpleNamespace(root=root, cache=cache, cfg=cfg, tokenizer=tokenizer, reference=reference)


@pytest.fixture(scope="module")
def model(setup):
    import os

    previous = os.environ.get("HF_HUB_CACHE")
    os.environ["HF_HUB_CACHE"] = str(setup.cache)
    try:
        out = import_checkpoint("nanovlm", setup.root / "nano", setup.root / "minivlm")
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_CACHE")
        else:
            os.environ["HF_HUB_CACHE"] = previous
    return VisionLanguageModel.from_pretrained(out).eval()


def reference_views(pil) -> tuple[torch.Tensor, tuple[int, int]]:
    """``get_image_processor(MAX_SIDE, TILE, False)`` of nanoVLM, re-stated."""
    w, h = pil.size
    long, short = (w, h) if w >= h else (h, w)
    target_long = min(MAX_SIDE, math.ceil(long / TILE) * TILE)
    target_short = max(math.ceil(short * (target_long / long) / TILE) * TILE, TILE)
    new_h, new_w = (target_short, target_long) if w >= h else (target_long, target_short)
    x = TF.to_tensor(TF.resize(pil, [new_h, new_w], interpolation=TF.InterpolationMode.BICUBIC)).unsqueeze(0)
    grid = (new_h // TILE, new_w // TILE)
    patches = rearrange(x, "b c (nh ph) (nw pw) -> (b nh nw) c ph pw", ph=TILE, pw=TILE)
    if grid == (1, 1):
        return patches, grid
    return torch.cat([TF.resize(x, [TILE, TILE]), patches]), grid


def reference_prompt(tokenizer, images: list, turns: list[tuple[str, str | None]]) -> list[int]:
    """nanoVLM's ``get_image_string`` prepended to the first user message, ChatML, generation prompt."""
    string = ""
    for index, pil in enumerate(images):
        _, (n_h, n_w) = reference_views(pil)
        string += f"<image: {index}>" if len(images) > 1 else ""
        string += tokenizer.global_image_token + tokenizer.image_token * 4
        if (n_h, n_w) != (1, 1):
            for i in range(n_h):
                for j in range(n_w):
                    string += getattr(tokenizer, f"r{i + 1}c{j + 1}") + tokenizer.image_token * 4
    messages = []
    for user, assistant in turns:
        messages.append({"role": "user", "content": user})
        if assistant is not None:
            messages.append({"role": "assistant", "content": assistant})
    messages[0]["content"] = string + messages[0]["content"]
    return tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]


def ours(model, images: list, turns: list[tuple[str, str | None]]) -> dict:
    messages = []
    for k, (user, assistant) in enumerate(turns):
        media = [{"type": "image", "image": im} for im in images] if k == 0 else []
        messages.append({"role": "user", "content": media + [{"type": "text", "text": user}]})
        if assistant is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": assistant}]})
    return model.processor([messages], add_generation_prompt=True)


def test_the_checkpoint_carries_nanovlms_tokenizer_and_layout(setup, model):
    tokenizer = model.processor.tokenizer
    assert tokenizer.vocab_size == len(setup.tokenizer) == setup.cfg.lm_vocab_size
    for token in ("<|image|>", "<|global_image|>", "<row_1_col_1>", "<row_8_col_8>"):
        assert tokenizer.token_to_id(token) == setup.tokenizer.convert_tokens_to_ids(token)
    assert tokenizer.pad_id == setup.tokenizer.pad_token_id and model.processor.template.kind == "nanovlm"


@pytest.mark.parametrize("size", IMAGE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_one_image_of_each_size_gives_the_reference_inputs(setup, model, size):
    pil = image(*size)
    batch = ours(model, [pil], [("What is in this image?", None)])
    assert batch["input_ids"][0].tolist() == reference_prompt(setup.tokenizer, [pil], [("What is in this image?", None)])
    assert torch.equal(batch["pixel_values"], reference_views(pil)[0])


CASES = {"one image": ([(150, 60)], [("What is in this image?", None)]),
         "several images": ([(64, 40), (40, 90)], [("Compare the two images.", None)]),
         "multi-turn": ([(97, 97)], [("How many shapes are there?", "There are 3."), ("What colour is it?", None)])}


@pytest.mark.parametrize("name", list(CASES))
def test_conversations_give_the_reference_inputs_logits_and_generation(setup, model, name, parity):
    sizes, turns = CASES[name]
    images = [image(*s, seed=i) for i, s in enumerate(sizes)]
    batch = ours(model, images, turns)
    ids = reference_prompt(setup.tokenizer, images, turns)
    assert batch["input_ids"][0].tolist() == ids
    assert batch["attention_mask"].all()
    views = torch.cat([reference_views(im)[0] for im in images])
    assert torch.equal(batch["pixel_values"], views)
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        hidden, _ = setup.reference(input_ids, views)
        reference_logits = setup.reference.decoder.head(hidden)
        our_logits = model(batch["input_ids"], pixel_values=batch["pixel_values"]).logits
    parity(f"nanovlm {name} logits", our_logits, reference_logits)
    expected = setup.reference.generate(input_ids, views, max_new_tokens=32, greedy=True)[0].tolist()
    assert setup.tokenizer.convert_tokens_to_ids("<|image|>") not in expected  # minivlm never generates one
    from paritykit import greedy

    assert greedy(model, batch) == expected


def test_the_import_exports_back_to_a_checkpoint_nanovlm_loads(setup, model, peer, tmp_path, parity):
    from minivlm.interop.hf_export import export_checkpoint

    out = export_checkpoint("nanovlm", setup.root / "minivlm", tmp_path / "nano-again")
    again = peer.vlm.VisionLanguageModel.from_pretrained(str(out)).eval()
    images = [image(64, 40)]
    batch = ours(model, images, [("What is in this image?", None)])
    with torch.no_grad():
        hidden, _ = again(batch["input_ids"], batch["pixel_values"])
        parity("nanovlm export logits", model(batch["input_ids"], pixel_values=batch["pixel_values"]).logits,
               again.decoder.head(hidden))


def test_chat_answers_with_the_imported_nanovlm(setup, model, tmp_path, capsys):
    from minivlm.cli import main

    image(40, 90).save(tmp_path / "x.png")
    capsys.readouterr()
    assert main(["chat", "--model", str(setup.root / "minivlm"), "--image", str(tmp_path / "x.png"),
                 "--max-new-tokens", "5", "What is in this image?"]) == 0
    assert capsys.readouterr().out.endswith("\n")  # one reply printed (random weights: any text)
