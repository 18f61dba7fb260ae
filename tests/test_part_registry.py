import pytest

from minivlm.registry import DECODERS, ENCODERS, FUSIONS, PROJECTORS, Registry


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
