"""SmolVLM2 video: the prompt layout equals ``SmolVLMProcessor.replace_video_token`` and the frame
pixels equal ``SmolVLMVideoProcessor``'s (resize to the longest edge, then to one tile)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from minivlm.text.segments import segments_to_text
from minivlm.text.templates import Idefics3Template
from minivlm.vision.idefics3 import Idefics3ImageConfig, Idefics3ImageProcessor

transformers = pytest.importorskip("transformers")
pytest.importorskip("num2words")  # SmolVLMProcessor needs it


def frames(n: int, width: int = 60, height: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(n)
    return [rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def reference():
    from transformers import PreTrainedTokenizerFast, SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    from minivlm.interop.reference import bytelevel_tokenizer

    added = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", "<video>"]
    fast = PreTrainedTokenizerFast(tokenizer_object=bytelevel_tokenizer(added), eos_token="<|im_end|>")
    videos = SmolVLMVideoProcessor(max_image_size={"longest_edge": 32}, size={"longest_edge": 48})
    return SmolVLMProcessor(image_processor=SmolVLMImageProcessor(max_image_size={"longest_edge": 32}),
                            tokenizer=fast, video_processor=videos, image_seq_len=4)


@pytest.mark.parametrize("count, fps, duration", [(3, 1.0, 3.0), (21, 2.0, 10.5), (1, 1.0, 61.0)])
def test_the_video_prompt_equals_smolvlm2s(reference, count, fps, duration):
    from transformers.video_utils import VideoMetadata

    metadata = VideoMetadata(total_num_frames=count, fps=fps, duration=duration, frames_indices=list(range(count)))
    views = [(t, torch.zeros(1, 3, 32, 32)) for t in metadata.timestamps]
    chunks = Idefics3Template().video_layout(views, duration, 4)
    assert segments_to_text([s for segments, _ in chunks for s in segments]) == \
        reference.replace_video_token({"video_metadata": [metadata]}, 0)
    assert [v is not None for _, v in chunks] == [False] + [True] * count + [False]


def test_video_frames_equal_smolvlm2s_pixels(reference):
    clip = frames(3)
    theirs = reference.video_processor(videos=[np.stack(clip)], do_sample_frames=False, return_tensors="pt")
    ours = Idefics3ImageProcessor(Idefics3ImageConfig(image_size=32, video_longest_edge=48))
    views = torch.cat([ours.frame(Image.fromarray(f)) for f in clip])
    assert torch.equal(views, theirs["pixel_values"][0])
