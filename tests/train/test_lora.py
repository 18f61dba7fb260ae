"""LoRA adapters: exact at init, only adapters (+ projector) train, merge, save and load."""

from __future__ import annotations

import pytest
import torch
import trainkit as tk
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from minivlm.safetensors_io import load_safetensors
from minivlm.model import VisionLanguageModel
from minivlm.train import checkpoint as ckpt
from minivlm.train.lora import (
    LoRAError,
    LoRALinear,
    apply_lora,
    has_lora,
    load_lora,
    lora_modules,
    lora_state_dict,
    merge_lora,
    save_lora,
)
from minivlm.train.trainer import Trainer

DECODER_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def _outputs(model: nn.Module, batch: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def batch() -> dict:
    return tk.collate(list(tk.shapes_samples(4)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained 4 steps with decoder LoRA r=4 through the trainer's config hook."""
    cfg = tk.config("train.steps=4", "train.lr=1e-2", "train.warmup_steps=0")
    cfg.train.lora_rank, cfg.train.lora_alpha = 4, 8.0  # until TrainConfig has these fields
    base = tk.model(cfg)
    before = tk.weights(base)
    trainer = Trainer(base, tk.processor(), tk.dataset(), tmp_path_factory.mktemp("lora"), dist=tk.cpu(),
                      progress=False)
    trainer.fit()
    return cfg, before, trainer


def test_a_lora_linear_starts_as_its_base_and_adds_a_scaled_low_rank_update():
    base = nn.Linear(6, 5)
    lora = LoRALinear(base, r=2, alpha=4)
    x = torch.randn(3, 6)
    assert torch.equal(lora(x), base(x))
    assert lora.weight is base.weight and not lora.weight.requires_grad and not lora.bias.requires_grad
    assert set(lora.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    assert lora.lora_A.shape == (2, 6) and lora.lora_B.shape == (5, 2) and lora.scale == 2.0
    with torch.no_grad():
        lora.lora_B.normal_()
    expected = base(x) + 2.0 * x @ lora.lora_A.T @ lora.lora_B.T
    torch.testing.assert_close(lora(x), expected)
    torch.testing.assert_close(lora.merged()(x), expected, rtol=1e-5, atol=1e-5)


def test_adapter_dropout_acts_only_in_training():
    lora = LoRALinear(nn.Linear(8, 8), r=2, alpha=2, dropout=0.5)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(4, 8)
    assert not torch.equal(lora.train()(x), lora.eval()(x))
    torch.testing.assert_close(lora.eval()(x), lora.merged()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"r": 0}, "rank r must be a positive integer"),
    ({"r": 2.5}, "rank r must be a positive integer"),
    ({"alpha": 0}, "alpha must be a finite number > 0"),
    ({"dropout": 1.0}, r"dropout must lie in \[0, 1\)"),
])
def test_bad_lora_settings_raise(kwargs, message):
    with pytest.raises(LoRAError, match=message):
        LoRALinear(nn.Linear(4, 4), **({"r": 2, "alpha": 4} | kwargs))


def test_apply_lora_adapts_the_targets_and_leaves_the_output_unchanged(batch):
    model = tk.model(tk.config("decoder.n_layers=2"))
    reference = _outputs(model, batch)
    adapted = apply_lora(model, r=4, alpha=8)
    assert adapted == [f"decoder.layers.{i}.{m}.{t}" for i in range(2) for m, ts in
                       (("attn", DECODER_TARGETS[:4]), ("mlp", DECODER_TARGETS[4:])) for t in ts]
    assert torch.equal(_outputs(model, batch), reference)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.{k}" for m in adapted for k in ("lora_A", "lora_B")} | {
        n for n, _ in model.named_parameters() if n.startswith("projector.")}


def test_the_encoder_can_be_adapted_too(batch):
    model = tk.model(tk.config())
    adapted = apply_lora(model, parts=("encoder", "decoder"), r=2, train_projector=False)
    assert {n for n in adapted if n.startswith("encoder.blocks.0.")} == {
        "encoder.blocks.0.attn.qkv", "encoder.blocks.0.attn.proj", "encoder.blocks.0.mlp.fc1",
        "encoder.blocks.0.mlp.fc2"}
    assert not any(p.requires_grad for p in model.projector.parameters())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"parts": ("vision",)}, "LoRA parts must be a non-empty subset"),
    ({"parts": ()}, "LoRA parts must be a non-empty subset"),
    ({"parts": ("projector",)}, "model.projector has no default LoRA targets"),
    ({"targets": ("query",)}, r"no nn.Linear named \['query'\] in model.decoder; its linear layers are"),
    ({"targets": ("lm_head",)}, r"decoder.lm_head.weight is tied to \['decoder.embed.weight'\]"),
])
def test_apply_lora_rejects_what_it_cannot_adapt(kwargs, message):
    with pytest.raises(LoRAError, match=message):
        apply_lora(tk.model(tk.config()), **kwargs)


def test_adapters_cannot_be_stacked():
    model = tk.model(tk.config())
    apply_lora(model, r=2)
    with pytest.raises(LoRAError, match="already has LoRA adapters"):
        apply_lora(model, r=2)


def test_training_changes_only_adapters_and_projector(trained):
    _, before, trainer = trained
    after = trainer.model.state_dict()
    changed = {k for k in after if k not in before or not torch.equal(after[k], before[k])}
    assert changed and all(k.endswith(("lora_A", "lora_B")) or k.startswith("projector.") for k in changed)
    assert any(k.endswith("lora_B") for k in changed)  # B left zero: the adapters really trained
    assert {g["name"].split("/")[0] for g in trainer.optimizer.param_groups} == {"lora", "projector"}


def test_merged_and_unmerged_outputs_match(trained, batch, tmp_path):
    cfg, _, trainer = trained
    unmerged = _outputs(trainer.model, batch)
    model = tk.model(cfg)
    load_lora(model, save_lora(trainer.model, tmp_path / "adapters.safetensors"))
    merge_lora(model)
    assert not has_lora(model) and set(model.state_dict()) == set(VisionLanguageModel(cfg).state_dict())
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    torch.testing.assert_close(_outputs(model, batch), unmerged, rtol=1e-5, atol=1e-5)


def test_merging_a_model_without_adapters_changes_nothing(batch):
    model = tk.model(tk.config())
    reference = _outputs(model, batch)
    assert torch.equal(_outputs(merge_lora(model), batch), reference)


def test_adapters_round_trip_through_a_file_onto_the_base_model(trained, batch, tmp_path):
    cfg, _, trainer = trained
    path = save_lora(trainer.model, tmp_path / "adapters.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(lora_state_dict(trainer.model)) | {k for k in trainer.model.state_dict()
                                                          if k.startswith("projector.")}
    fresh = tk.model(cfg)  # the base weights the adapters were trained on
    names = load_lora(fresh, path)
    assert names == list(lora_modules(trainer.model))
    assert torch.equal(_outputs(fresh, batch), _outputs(trainer.model, batch))


def test_loading_adapters_of_another_shape_or_a_foreign_file_fails(trained, tmp_path):
    cfg, _, trainer = trained
    path = save_lora(trainer.model, tmp_path / "adapters.safetensors")
    other_rank = tk.model(cfg)
    apply_lora(other_rank, r=2)
    with pytest.raises(LoRAError, match=r"lora_A is \[4, 32\], the model expects \[2, 32\]"):
        load_lora(other_rank, path)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(LoRAError, match="is not a LoRA adapter file"):
        load_lora(tk.model(cfg), tmp_path / "plain.safetensors")


def test_a_merged_model_loads_with_from_pretrained(trained, batch, tmp_path):
    cfg, _, trainer = trained
    model = tk.model(cfg)
    load_lora(model, save_lora(trainer.model, tmp_path / "adapters.safetensors"))
    expected = _outputs(model, batch)
    merge_lora(model).save_pretrained(tmp_path / "merged")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_outputs(loaded, batch), expected, rtol=1e-5, atol=1e-5)


def test_a_lora_run_resumes_exactly(tmp_path):
    def trainer(run_dir) -> Trainer:
        cfg = tk.config("train.steps=4", "train.save_every=2")
        cfg.train.lora_rank = 2
        return Trainer(tk.model(cfg), tk.processor(), tk.dataset(), run_dir, dist=tk.cpu(), progress=False)

    straight = trainer(tmp_path / "straight")
    straight.fit()
    crashing = trainer(tmp_path / "resumed")
    tk.crash_after_checkpoint(crashing, step=2)
    with pytest.raises(tk.SimulatedCrash):
        crashing.fit()
    assert any(k.endswith("lora_A") for k in load_safetensors(
        ckpt.latest_checkpoint(tmp_path / "resumed") / "model.safetensors"))
    resumed = trainer(tmp_path / "resumed")
    resumed.fit(resume=True)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
