"""Shared fixtures of the text tests: a small trained tokenizer, a real 32k one, a 64px processor."""

from __future__ import annotations

from importlib import resources

import pytest
from minivlm.text import Processor, Tokenizer
from minivlm.vision import ImageProcessor, ImageProcessorConfig

CORPUS = [
    "You are a helpful assistant that reads chart images.",
    "What is the highest value in the bar chart?",
    "What is the lowest value in the bar chart?",
    "How many bars are red? There are 3 red bars and 2 blue bars.",
    "The answer is 42. The chart shows values 7, 13, 42 and 19.",
    "Describe the image. A green circle next to a yellow square.",
    "user\nassistant\nsystem\n",
    "Compare the two pictures: the first one is brighter than the second one.",
    "Which frame shows the triangle? At 00:02 the triangle enters from the left.",
]

#: Placeholder tokens per image view in the processor fixture.
IMAGE_SEQ_LEN = 4


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    """A BPE tokenizer trained in memory, with tile markers for up to 4 tiles."""
    return Tokenizer.train(CORPUS * 20, vocab_size=600, max_tiles=4)


@pytest.fixture(scope="session")
def mistral_model_path():
    """The real 32k Llama-style sentencepiece model shipped by mistral-common."""
    path = resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    if not path.is_file():
        pytest.skip("mistral-common does not ship data/tokenizer.model.v1")
    return path


@pytest.fixture(scope="session")
def mistral_tokenizer(mistral_model_path) -> Tokenizer:
    return Tokenizer.from_file(mistral_model_path, max_tiles=4)


@pytest.fixture(scope="session")
def image_processor() -> ImageProcessor:
    return ImageProcessor(ImageProcessorConfig(image_size=64))


@pytest.fixture(scope="session")
def processor(tokenizer, image_processor) -> Processor:
    return Processor(tokenizer, image_processor, IMAGE_SEQ_LEN)

