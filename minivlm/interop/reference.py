"""Small Hugging Face reference checkpoints: the published layouts with random weights and small
trained tokenizers, built with ``transformers`` (a dev dependency) on any machine, offline.

What the parity tests import and compare against, and what ``notebooks/smolvlm_usage.ipynb``
runs when the real weights (``HuggingFaceTB/SmolVLM-Instruct``) are not in the local cache. Each
builder writes what ``save_pretrained`` of the model and of its processor write, so the importer
reads exactly the files a hub download holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: Text the small tokenizers are trained on (the templates' words and the tests' conversations).
CORPUS = [
    "User: Assistant: System: USER: ASSISTANT: What is in this image? Describe the image in detail.",
    "A red square next to a blue circle. The cat sits on a mat. How many shapes are there? There are 3.",
    "Compare the two images. The first one is brighter. What happens in the video? A ball moves left.",
    "You are provided the following series of three frames from a 0:00:03 [H:MM:SS] video. Frame from 00:01:",
    "Answer briefly. Hi. And its size? It is small. What colour is it? Green. <image: 0> <image: 1>",
]


def _train(tokenizer: Any, vocab_size: int, specials: list[str], alphabet: list[str] | None = None) -> Any:
    from tokenizers import trainers

    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet or [],
                                  show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    return tokenizer


def bytelevel_tokenizer(added: list[str], vocab_size: int = 400) -> Any:
    """A SmolLM2-style tokenizer: byte-level BPE, ``<|endoftext|> <|im_start|> <|im_end|>`` at ids
    0-2, ``added`` special tokens after the learnt vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    _train(tokenizer, vocab_size, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], pre_tokenizers.ByteLevel.alphabet())
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    return tokenizer


def llama_tokenizer(added: list[str], vocab_size: int = 400) -> Any:
    """A Llama-style ``tokenizer.json`` (``LlamaTokenizerFast``, legacy): ``"▁"`` for spaces and
    in front of every text piece, byte fallback, ``<s>`` added by the post-processor."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    _train(tokenizer, vocab_size, ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    return tokenizer


def _round_up(n: int, multiple: int = 8) -> int:
    return -(-n // multiple) * multiple


def save_smolvlm(out: str | Path, *, image_size: int = 32, patch_size: int = 8, scale_factor: int = 2,
                 longest_edge: int | None = None, split_image: bool = True, width: int = 32, layers: int = 2,
                 tie_embeddings: bool = False, seed: int = 0, smolvlm2: bool = False) -> Path:
    """An Idefics3 / SmolVLM checkpoint directory (model + ``Idefics3Processor`` files); with
    ``smolvlm2`` the SmolVLM2 classes (``SmolVLMForConditionalGeneration`` + ``SmolVLMProcessor``
    with its video processor; needs ``num2words``)."""
    import transformers
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    prefix = "SmolVLM" if smolvlm2 else "Idefics3"
    config_class, model_class, image_class, processor_class = (
        getattr(transformers, f"{prefix}{name}") for name in
        ("Config", "ForConditionalGeneration", "ImageProcessor", "Processor"))
    added = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", "<video>"] + \
        [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bytelevel_tokenizer(added), bos_token="<|im_start|>",
                                                eos_token="<|im_end|>", pad_token="<|im_end|>",
                                                unk_token="<|endoftext|>")
    image_seq_len = (image_size // patch_size) ** 2 // scale_factor**2
    torch.manual_seed(seed)
    config = config_class(
        vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                           num_attention_heads=2, image_size=image_size, patch_size=patch_size),
        text_config=dict(model_type="llama", hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=_round_up(len(fast)),
                         max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=tie_embeddings,
                         pad_token_id=fast.pad_token_id),
        scale_factor=scale_factor, image_token_id=fast.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=tie_embeddings, pad_token_id=fast.pad_token_id)
    model = model_class(config).eval()
    images = image_class(max_image_size={"longest_edge": image_size},
                         size={"longest_edge": longest_edge or 4 * image_size}, do_image_splitting=split_image)
    extra = {}
    if smolvlm2:
        extra["video_processor"] = transformers.SmolVLMVideoProcessor(
            max_image_size={"longest_edge": image_size}, size={"longest_edge": image_size})
    processor = processor_class(image_processor=images, tokenizer=fast, image_seq_len=image_seq_len,
                                chat_template=DEFAULT_CHAT_TEMPLATE, **extra)
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


#: llava-hf's chat template (the format minivlm's ``llava`` template renders).
def llava_jinja() -> str:
    from minivlm.text.templates import LlavaTemplate

    return LlavaTemplate.jinja


def save_llava(out: str | Path, *, image_size: int = 32, patch_size: int = 8, width: int = 32, layers: int = 2,
               pad_to_square: bool = True, seed: int = 0) -> Path:
    """A llava-hf checkpoint directory (``LlavaForConditionalGeneration`` + ``LlavaProcessor`` files)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaImageProcessor, LlavaProcessor, \
        PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=llama_tokenizer(["<image>", "<pad>"]), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=width, intermediate_size=2 * width,
                           num_hidden_layers=layers + 1, num_attention_heads=2, image_size=image_size,
                           patch_size=patch_size, projection_dim=width),
        text_config=dict(model_type="llama", hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=_round_up(len(fast)),
                         max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=fast.pad_token_id),
        image_token_index=fast.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", pad_token_id=fast.pad_token_id)
    model = LlavaForConditionalGeneration(config).eval()
    images = LlavaImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                                 do_pad=pad_to_square)
    processor = LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=llava_jinja())
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
