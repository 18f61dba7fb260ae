"""Configs: JSON round trip, dotted overrides, validation messages that name the field, presets."""
import json

import pytest

from minivlm.config import PRESETS, ConfigError, VLMConfig, apply_overrides, preset
from minivlm.registry import image_seq_len, image_tokens, validate_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_json(name):
    cfg = preset(name)
    again = VLMConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(again.to_json()) == json.loads(cfg.to_json())


def test_round_trip_through_a_file(tmp_path):
    cfg = preset("tiny").override("decoder.n_layers=2", "train.betas=[0.8, 0.9]")
    cfg.to_json(tmp_path / "config.json")
    assert VLMConfig.from_json(tmp_path / "config.json") == cfg
    assert VLMConfig.from_json(tmp_path / "config.json").train.betas == (0.8, 0.9)


def test_dotted_overrides_parse_by_field_type():
    cfg = apply_overrides(preset("tiny"), ["decoder.n_layers=8", "decoder.rope_theta=5e5", "encoder.class_token=true",
                                           "projector.hidden_dim=none", "train.lr_scale={\"encoder\": 0.1}"])
    assert cfg.decoder.n_layers == 8 and isinstance(cfg.decoder.n_layers, int)
    assert cfg.decoder.rope_theta == 5e5
    assert cfg.encoder.class_token is True
    assert cfg.projector.hidden_dim is None
    assert cfg.train.lr_scale == {"encoder": 0.1}


def test_a_part_name_alone_sets_its_kind():
    cfg = apply_overrides(preset("tiny"), ["projector=resampler", "fusion=cross_attention"])
    assert cfg.projector.kind == "resampler" and cfg.fusion.kind == "cross_attention"


def test_overrides_do_not_mutate_the_original():
    base = preset("tiny")
    base.override("decoder.n_layers=1")
    assert base.decoder.n_layers == preset("tiny").decoder.n_layers


@pytest.mark.parametrize("item, fragment", [
    ("decoder.n_layerz=3", "decoder has no field 'n_layerz'"),
    ("decoder.n_layers=three", "decoder.n_layers: expected int"),
    ("encoder.class_token=maybe", "expected true/false"),
    ("nonsense", "expected key=value"),
])
def test_bad_overrides_name_the_problem(item, fragment):
    with pytest.raises(ConfigError, match=fragment):
        apply_overrides(preset("tiny"), [item])


@pytest.mark.parametrize("overrides, field", [
    (["projector.shuffle_factor=3"], "projector.shuffle_factor"),
    (["encoder.patch_size=7"], "encoder.image_size"),
    (["decoder.n_kv_heads=4"], "decoder.n_kv_heads"),
    (["encoder.feature_layer=9"], "encoder.feature_layer"),
    (["projector=mof_mlp"], "projector.kind"),
    (["encoder.pooling=cls"], "encoder.pooling"),
    (["decoder.n_layers=0"], "decoder.n_layers"),
    (["encoder.temporal_patch_size=0"], "encoder.temporal_patch_size"),
    (["image_token_id=5000"], "image_token_id"),
    (["encoder.activation=relu"], "encoder.activation"),
])
def test_validation_names_the_offending_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate_config(preset("tiny").override(*overrides))


def test_unknown_json_field_is_rejected():
    d = preset("tiny").to_dict()
    d["decoder"]["n_layer"] = 3
    with pytest.raises(ConfigError, match="unknown field"):
        VLMConfig.from_dict(d)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")


def test_derived_token_counts():
    cfg = preset("tiny")
    assert cfg.encoder.n_patches == 64
    assert image_tokens(cfg) == 16 == image_seq_len(cfg)  # pixel shuffle 2: 64 / 4
    assert image_seq_len(cfg.override("fusion=cross_attention")) == 1  # one marker per image
    assert image_tokens(cfg.override("projector=resampler", "projector.n_latents=9")) == 9
    assert image_tokens(cfg.override("projector=mlp")) == 64


def test_gpu_presets_load_data_in_workers_and_tiny_in_process():
    from minivlm.config import GPU_DATA_WORKERS

    assert GPU_DATA_WORKERS > 0 and preset("tiny").data.num_workers == 0
    for name in ("small", "nanovlm-460m", "llava-1.5-7b"):
        assert preset(name).data.num_workers == GPU_DATA_WORKERS, name
