"""Inputs and comparisons shared by the whole-VLM parity tests (SmolVLM, LLaVA, nanoVLM)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from minivlm.generate import GenerationConfig, generate

#: (width, height) of the test images: square, wide, tall, tiny and odd-sized.
IMAGE_SIZES = [(20, 20), (64, 40), (40, 90), (150, 60), (33, 47), (97, 97)]


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A random RGB image with some structure (a gradient plus noise), so resampling matters."""
    rng = np.random.default_rng(seed + width * 1000 + height)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], axis=-1)
    noise = rng.integers(-40, 40, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def hf_content(content: list[dict]) -> list[dict]:
    """A minivlm message content as transformers' chat template sees it (images without data)."""
    return [{"type": "image"} if c["type"] == "image" else c for c in content]


def conversations(images: list[Image.Image]) -> dict[str, list[dict]]:
    """Named conversations over ``images``: one image, several images, a multi-turn dialogue."""
    return {
        "one image": [{"role": "user", "content": [{"type": "image", "image": images[0]},
                                                   {"type": "text", "text": "What is in this image?"}]}],
        "several images": [{"role": "user", "content": [
            {"type": "image", "image": images[1]}, {"type": "image", "image": images[2]},
            {"type": "text", "text": "Compare the two images."}]}],
        "multi-turn": [
            {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
            {"role": "user", "content": [{"type": "image", "image": images[3]},
                                         {"type": "text", "text": "How many shapes are there?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "There are 3."}]},
            {"role": "user", "content": [{"type": "text", "text": "What colour is it?"}]}],
    }


def images_of(messages: list[dict]) -> list[Image.Image]:
    return [c["image"] for m in messages for c in m["content"] if c["type"] == "image"]


def real_views(pixel_values: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """transformers' padded ``[B, max_views, C, H, W]`` as minivlm's ``[views, C, H, W]``."""
    if pixel_values.ndim == 4:
        return pixel_values
    return torch.cat([pixel_values[b, :n] for b, n in enumerate(counts)])


def greedy(model, batch: dict, n: int = 32) -> list[int]:
    """minivlm's greedy continuation of one prompt, never stopping early (ids without a token, which
    pad the reference models' vocabularies, are not generated)."""
    out = generate(model, batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                   GenerationConfig(max_new_tokens=n), tokenizer=model.processor.tokenizer)
    return out.tokens[0]


def assert_same_run(parity, name: str, reference, theirs, model, ours: dict, image_token_id: int, pad_id: int) -> None:
    """fp32 logits within the tolerance and 32 identical greedy tokens (the image placeholder and the
    ids padding the vocabulary beyond the tokenizer suppressed for transformers too: minivlm never
    generates them)."""
    with torch.no_grad():
        reference_logits = reference(**theirs).logits
        our_logits = model(ours["input_ids"], pixel_values=ours["pixel_values"],
                           attention_mask=ours["attention_mask"]).logits
    parity(name, our_logits, reference_logits)
    expected = reference.generate(**theirs, max_new_tokens=32, do_sample=False, eos_token_id=None,
                                  suppress_tokens=[image_token_id, *range(len(model.processor.tokenizer),
                                                                          model.config.decoder.vocab_size)],
                                  pad_token_id=pad_id)
    assert greedy(model, ours) == expected[0, theirs["input_ids"].shape[1]:].tolist()
