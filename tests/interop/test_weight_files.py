"""Broken or unsafe weight files fail with a WeightsFileError that names the file; nothing foreign is
unpickled beyond ``torch.load(weights_only=True)``."""
import json

import pytest
import torch
from safetensors.torch import save_file

from minivlm.interop.hf_llama import load_hf_state
from minivlm.safetensors_io import WeightsFileError, load_weights

UNPICKLED: list[str] = []


def _record_unpickling() -> str:
    UNPICKLED.append("code ran")
    return "payload"


class CodeOnLoad:
    """Pickles to a call of ``_record_unpickling``: what a malicious checkpoint would smuggle in."""

    def __reduce__(self):
        return (_record_unpickling, ())


@pytest.fixture
def safetensors_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.randn(64, 64), "b": torch.randn(64)}, str(path))
    return path


def test_a_truncated_file_is_named(safetensors_file):
    data = safetensors_file.read_bytes()
    safetensors_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsFileError, match=f"{safetensors_file}.*corrupt or truncated"):
        load_weights(safetensors_file)


def test_a_corrupt_header_is_named(safetensors_file):
    data = bytearray(safetensors_file.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    data[8:8 + header_len] = b"{" + b"\x00" * (header_len - 1)  # same length, not JSON any more
    safetensors_file.write_bytes(bytes(data))
    with pytest.raises(WeightsFileError, match=f"{safetensors_file}.*corrupt or truncated"):
        load_weights(safetensors_file)


def test_a_corrupt_shard_of_a_checkpoint_directory_is_named(tmp_path, safetensors_file):
    shard = tmp_path / "model-00001-of-00001.safetensors"
    safetensors_file.rename(shard)
    shard.write_bytes(shard.read_bytes()[:100])
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shard.name}}))
    with pytest.raises(WeightsFileError, match=shard.name):
        load_hf_state(tmp_path)


def test_a_pickle_with_a_custom_class_is_refused_without_running_it(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"weight": torch.zeros(2), "extra": CodeOnLoad()}, path)
    with pytest.raises(WeightsFileError, match=f"{path}.*weights_only=True"):
        load_weights(path)
    assert UNPICKLED == []


def test_a_plain_tensor_pickle_loads(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"weight": torch.arange(3.0)}, path)
    assert torch.equal(load_weights(path)["weight"], torch.arange(3.0))
