"""What a user does with a published VLM, through the command line: import it (from a directory or
the local Hugging Face cache), chat with it, evaluate it, fine-tune it (full and LoRA) with
``minivlm train --model``, and export the fine-tune back to the Hugging Face layout, which
transformers loads with the same logits."""
from __future__ import annotations

import json

import pytest
import torch

from paritykit import hf_content, image
from test_nanovlm import fake_hub_cache

transformers = pytest.importorskip("transformers")

from minivlm.cli import main  # noqa: E402
from minivlm.interop.reference import save_llava, save_smolvlm  # noqa: E402
from minivlm.model import VisionLanguageModel  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("workflow")
    image(64, 40).save(root / "picture.png")
    return root


@pytest.fixture(scope="module")
def smolvlm(files):
    hf = save_smolvlm(files / "smolvlm-hf", seed=5)
    assert main(["import", "smolvlm", str(hf), "--out", str(files / "smolvlm")]) == 0
    return hf, files / "smolvlm"


@pytest.mark.parametrize("kind", ["smolvlm", "llava"])
def test_chat_answers_with_an_imported_model(kind, files, smolvlm, capsys):
    if kind == "smolvlm":
        model_dir = smolvlm[1]
    else:
        model_dir = files / "llava"
        main(["import", "llava", str(save_llava(files / "llava-hf")), "--out", str(model_dir)])
    capsys.readouterr()
    code = main(["chat", "--model", str(model_dir), "--image", str(files / "picture.png"), "--max-new-tokens", "6",
                 "--json", "What is in this image?"])
    assert code == 0
    answer = json.loads(capsys.readouterr().out)["answer"]
    assert isinstance(answer, str)  # random weights: any text, but a real reply through the whole stack


def test_eval_scores_an_imported_model(smolvlm, capsys):
    capsys.readouterr()
    assert main(["eval", "--model", str(smolvlm[1]), "--data", "easy_vqa", "--limit", "3", "--json"]) == 0
    assert "easy_vqa/accuracy" in json.loads(capsys.readouterr().out)["metrics"]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_a_fine_tune_exports_to_transformers_with_the_same_logits(lora, smolvlm, files, parity):
    from transformers import Idefics3ForConditionalGeneration, Idefics3Processor

    hf, imported = smolvlm
    run = files / f"run-{lora}"
    overrides = ["train.batch_size=2", "train.warmup_steps=1", "train.lr=0.01", "train.cpu_threads=1"]
    overrides += ["train.lora_rank=4"] if lora else []
    assert main(["train", "--model", str(imported), "--data", "easy_vqa", "--steps", "2", "--eval-limit", "2",
                 "--out", str(run), "--no-progress", *overrides]) == 0
    assert (run / "adapters.safetensors").is_file() == lora
    out = files / f"export-{lora}"
    assert main(["export", "smolvlm", str(run / "model"), "--out", str(out)]) == 0
    tuned = VisionLanguageModel.from_pretrained(run / "model").eval()
    before = VisionLanguageModel.from_pretrained(imported)
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    # LoRA adapts the decoder (and trains the projector, as minivlm's LoRA recipe does); the encoder stays.
    assert changed and (not any(k.startswith("encoder.") for k in changed) if lora else True)
    reference, processor = Idefics3ForConditionalGeneration.from_pretrained(out).eval(), Idefics3Processor.from_pretrained(out)
    messages = [{"role": "user", "content": [{"type": "image", "image": image(90, 50)},
                                             {"type": "text", "text": "What is in this image?"}]}]
    text = processor.apply_chat_template([{**m, "content": hf_content(m["content"])} for m in messages],
                                         add_generation_prompt=True)
    theirs = processor(text=[text], images=[[messages[0]["content"][0]["image"]]], return_tensors="pt")
    ours = tuned.processor([messages], add_generation_prompt=True)
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    with torch.no_grad():
        parity(f"smolvlm {'LoRA' if lora else 'full'} fine-tune export logits",
               tuned(ours["input_ids"], pixel_values=ours["pixel_values"]).logits, reference(**theirs).logits)


def test_a_hub_id_is_read_from_the_local_cache_and_never_downloaded(smolvlm, files, monkeypatch, capsys):
    hf, _ = smolvlm
    cache = fake_hub_cache(files / "cache", "HuggingFaceTB/SmolVLM-Instruct",
                           {p.name: p.read_text() for p in hf.iterdir() if p.suffix in (".json", ".jinja")})
    snapshot = next((cache / "models--HuggingFaceTB--SmolVLM-Instruct" / "snapshots").iterdir())
    (snapshot / "model.safetensors").write_bytes((hf / "model.safetensors").read_bytes())
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert main(["import", "smolvlm", "HuggingFaceTB/SmolVLM-Instruct", "--out", str(files / "from-cache")]) == 0
    assert (files / "from-cache" / "tokenizer.json").is_file()
    capsys.readouterr()
    assert main(["import", "smolvlm", "HuggingFaceTB/SmolVLM2-2.2B-Instruct", "--out", str(files / "absent")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "not in" in error and "SmolVLM2-2.2B-Instruct" in error
    assert not (files / "absent").exists()


def test_a_timm_model_name_is_its_cached_hub_repository(files, monkeypatch, capsys):
    import timm
    from timm.models._hub import save_for_hf

    monkeypatch.setenv("HF_HUB_CACHE", str(files / "timm-cache"))
    name = "vit_tiny_patch16_224.augreg_in21k"
    capsys.readouterr()
    assert main(["import", "timm", name, "--out", str(files / "vit")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"timm/{name}" in error and "not in" in error
    # What timm's hub repository holds, with random weights (the real download is not possible here).
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=32, depth=2)
    save_for_hf(model, files / "timm-hf", safe_serialization=True, model_args={"img_size": 32, "depth": 2})
    fake_hub_cache(files / "timm-cache", f"timm/{name}", {})
    snapshot = next((files / "timm-cache" / f"models--timm--{name}" / "snapshots").iterdir())
    for item in (files / "timm-hf").iterdir():
        (snapshot / item.name).write_bytes(item.read_bytes())
    assert main(["import", "timm", name, "--out", str(files / "vit")]) == 0
    part = json.loads((files / "vit" / "part.json").read_text())
    assert part["part"] == "encoder" and part["config"]["depth"] == 2


def test_an_option_of_another_kind_is_a_one_line_error(smolvlm, files, capsys):
    capsys.readouterr()
    assert main(["import", "smolvlm", str(smolvlm[0]), "--out", str(files / "x"), "--tokenizer", "y"]) == 2
    assert "--tokenizer does not apply" in capsys.readouterr().err
    assert main(["train", "--model", str(files / "missing"), "--steps", "1"]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err


def test_export_refuses_a_model_the_layout_cannot_hold(files, capsys):
    from minivlm.config import preset
    from minivlm.train.recipe import attach_tokenizer, build_processor, build_tokenizer
    from minivlm.data import build_dataset

    cfg = preset("tiny").override("decoder.n_layers=1", "encoder.depth=1")
    tokenizer = build_tokenizer(build_dataset("shapes", "train", seed=0, image_size=64), 300, n_samples=50)
    model = VisionLanguageModel(attach_tokenizer(cfg, tokenizer))
    model.processor = build_processor(cfg, tokenizer)
    model.save_pretrained(files / "tiny")
    capsys.readouterr()
    assert main(["export", "smolvlm", str(files / "tiny"), "--out", str(files / "tiny-hf")]) == 2
    error = capsys.readouterr().err
    assert "cannot be represented" in error and "hybrid stem" in error and "chat template" in error
    assert not (files / "tiny-hf").exists()


def test_a_checkpoint_whose_template_minivlm_does_not_render_is_refused(files, capsys):
    from minivlm.text.templates import ChatMLTemplate

    hf = save_smolvlm(files / "odd-template", seed=6)
    (hf / "chat_template.jinja").write_text(ChatMLTemplate.jinja)
    capsys.readouterr()
    assert main(["import", "smolvlm", str(hf), "--out", str(files / "odd")]) == 2
    error = capsys.readouterr().err
    assert "chat template renders" in error and "'idefics3' template renders" in error
    assert not (files / "odd").exists()


def test_the_wrong_importer_names_the_model_type(files, capsys):
    hf = save_llava(files / "llava-for-smolvlm")
    capsys.readouterr()
    assert main(["import", "smolvlm", str(hf), "--out", str(files / "wrong")]) == 2
    assert "model_type 'llava'; expected one of ('idefics3', 'smolvlm')" in capsys.readouterr().err


def test_ids_that_pad_the_vocabulary_beyond_the_tokenizer_are_never_generated(smolvlm):
    from minivlm.generate import GenerationConfig, chat, generate

    model = VisionLanguageModel.from_pretrained(smolvlm[1]).eval()
    n_text = len(model.processor.tokenizer)
    assert model.config.decoder.vocab_size > n_text  # the reference pads its vocabulary, as published models do
    with torch.no_grad():  # make the padding rows the most likely continuations
        model.decoder.lm_head.weight[:n_text] = 0.0
        model.decoder.lm_head.weight[n_text:] = model.decoder.norm.weight * 5
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    batch = model.processor([messages], add_generation_prompt=True, padding_side="left")
    unguarded = generate(model, batch["input_ids"], batch["attention_mask"], config=GenerationConfig(max_new_tokens=4))
    assert max(unguarded.tokens[0]) >= n_text  # what the guard prevents
    guarded = generate(model, batch["input_ids"], batch["attention_mask"], config=GenerationConfig(max_new_tokens=4),
                       tokenizer=model.processor.tokenizer)
    assert max(guarded.tokens[0]) < n_text
    assert isinstance(chat(model, messages, max_new_tokens=4), str)  # decodes, where it used to raise


def test_a_sentencepiece_only_llava_keeps_its_added_tokens_at_their_ids(files, capsys):
    """A LLaVA directory that ships tokenizer.model (no tokenizer.json): transformers' added tokens
    (tokenizer_config.json's added_tokens_decoder) land at their ids, so <image> is image_token_index."""
    import io

    import sentencepiece as spm

    from minivlm.text.processor import Processor

    hf = save_llava(files / "llava-spm")
    model = io.BytesIO()  # a plain Llama-style sentencepiece model: <unk> <s> </s>, no chat tokens
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["what is in this image? a red square. USER ASSISTANT"] * 30),
                                   model_writer=model, vocab_size=300, model_type="bpe", byte_fallback=True,
                                   hard_vocab_limit=False, minloglevel=2)
    n = spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
    (hf / "tokenizer.json").unlink()
    (hf / "tokenizer.model").write_bytes(model.getvalue())
    config = json.loads((hf / "config.json").read_text())
    config["image_token_index"] = n
    (hf / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((hf / "tokenizer_config.json").read_text())
    tokenizer_config["added_tokens_decoder"] = {str(n): {"content": "<image>", "special": True},
                                                str(n + 1): {"content": "<llava-pad>", "special": True}}
    (hf / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert main(["import", "llava", str(hf), "--out", str(files / "llava-spm-mini")]) == 0
    processor = Processor.from_pretrained(files / "llava-spm-mini")
    assert processor.tokenizer.image_token_id == n and processor.tokenizer.token_to_id("<llava-pad>") == n + 1
    assert processor.template.kind == "llava"
    capsys.readouterr()
    assert main(["chat", "--model", str(files / "llava-spm-mini"), "--image", str(files / "picture.png"),
                 "--max-new-tokens", "4", "--json", "What is in this image?"]) == 0
    assert "answer" in json.loads(capsys.readouterr().out)
