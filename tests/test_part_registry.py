"""The part registries: exact-key lookup, the built-ins listed explicitly, and the part contract: a
new projector with its own token count is one class plus one registry line."""
import pytest
import torch
from torch import Tensor, nn

from minivlm.config import ConfigError, VLMConfig, preset, require
from minivlm.data import build_dataset
from minivlm.model import VisionLanguageModel
from minivlm.registry import DECODERS, ENCODERS, FUSIONS, PROJECTORS, Registry, image_seq_len, image_tokens
from minivlm.train.distributed import DistributedContext
from minivlm.train.recipe import attach_tokenizer, build_processor, build_tokenizer
from minivlm.train.trainer import Trainer
from tinykit import TINY_PARTS


def test_builtin_parts_are_registered_by_exact_name():
    import minivlm.model  # noqa: F401

    assert ENCODERS.names() == ["vit"]
    assert PROJECTORS.names() == ["linear", "mlp", "pixel_shuffle", "resampler"]
    assert FUSIONS.names() == ["cross_attention", "prefix", "splice"]
    assert DECODERS.names() == ["llama"]


def test_lookup_is_exact_not_prefix():
    reg = Registry("projector")
    reg.register("mlp")(object)
    with pytest.raises(ValueError, match=r"unknown projector 'mof_mlp'; expected one of \['mlp'\]"):
        reg.get("mof_mlp")
    with pytest.raises(ValueError, match="unknown projector 'ml'"):
        reg.get("ml")


def test_double_registration_is_an_error():
    reg = Registry("x")
    reg.register("a")(int)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(float)


# ---- a new projector: one class here, one registry line -------------------------------------------


class AveragePoolProjector(nn.Module):
    """Averages each 2x2 block of patch features, then one Linear: ``[N, P, D] -> [N, P / 4, D_txt]``.

    Not a built-in: it declares its own token count and config check, and nothing else in the
    package knows about it.
    """

    @classmethod
    def check_config(cls, config: VLMConfig) -> None:
        require(config.encoder.grid_size % 2 == 0, "encoder.image_size", "the patch grid must have an even side")

    @classmethod
    def output_tokens(cls, config: VLMConfig, feature_tokens: int) -> int:
        return feature_tokens // 4

    def __init__(self, config: VLMConfig):
        super().__init__()
        self.proj = nn.Linear(config.encoder.width, config.decoder.width)

    def forward(self, features: Tensor) -> Tensor:
        N, P, D = features.shape
        side = int(P**0.5)
        grid = features.view(N, side, side, D).permute(0, 3, 1, 2)
        pooled = nn.functional.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)  # [N, P / 4, D]
        return self.proj(pooled)


@pytest.fixture
def average_pool():
    PROJECTORS.register("average_pool", AveragePoolProjector)
    yield
    PROJECTORS.unregister("average_pool")


def test_a_new_projector_with_its_own_token_count_trains(average_pool, tmp_path):
    cfg = preset("tiny").override(*TINY_PARTS, "projector=average_pool", "decoder.n_layers=1",
                                  "decoder.max_seq_len=128", "data.max_length=96", "data.packing=false",
                                  "data.curriculum=", "data.curriculum_steps=0", "train.steps=3", "train.batch_size=4",
                                  "train.warmup_steps=1", "train.save_every=0", "train.precision=fp32",
                                  "train.cpu_threads=1")
    assert image_tokens(cfg) == 4 == image_seq_len(cfg)  # 4x4 patches pooled 2x2; one placeholder per token
    data = build_dataset("shapes", "train", seed=0, image_size=cfg.encoder.image_size)
    samples = [data[i] for i in range(32)]
    tokenizer = build_tokenizer(samples, vocab_size=300)
    attach_tokenizer(cfg, tokenizer)
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg)
    before = model.projector.proj.weight.detach().clone()
    trainer = Trainer(model, build_processor(cfg, tokenizer), samples, tmp_path, dist=DistributedContext.single("cpu"),
                      progress=False)
    result = trainer.fit()
    assert result.steps == 3 and result.status == "finished"
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    assert not torch.equal(model.projector.proj.weight, before)  # the projector learned


def test_a_new_projector_checks_its_own_config(average_pool):
    with pytest.raises(ConfigError, match="encoder.image_size: the patch grid must have an even side"):
        VisionLanguageModel(preset("tiny").override(*TINY_PARTS, "projector=average_pool", "encoder.image_size=36"))
