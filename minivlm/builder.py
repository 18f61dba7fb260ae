"""``minivlm.build``: a preset (or config) as a model *and* the processor that feeds it.

A model built from a config alone has token ids but no tokenizer; training (``minivlm train``)
trains one on its data before building the model. :func:`build` does the same on a small corpus
that ships with the package: the template text of synthetic samples (shapes, charts, several
images, video, retrieval captions; rendered on the fly, so nothing is downloaded), then sizes the
decoder's vocabulary to the tokenizer, as a training run does::

    model, processor = minivlm.build("tiny")
    batch = processor([messages])   # input_ids, labels, pixel_values, ...
    loss = model(**batch).loss
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from minivlm.config import VLMConfig, preset

#: The built-in tokenizer corpus: the synthetic tasks, each equally likely.
BUILTIN_CORPUS = "shapes,charts,multi_image,video,retrieval"


def build(config: str | VLMConfig = "tiny", *overrides: str, corpus: Sequence[Any] | None = None,
          corpus_samples: int = 600, seed: int = 0) -> tuple[Any, Any]:
    """A randomly initialised :class:`~minivlm.model.VisionLanguageModel` and its
    :class:`~minivlm.text.processor.Processor` (also attached as ``model.processor``, so
    ``save_pretrained`` writes it and ``minivlm chat`` can load the result).

    Args:
        config: a preset name (``"tiny"``, ``"small"``, ...) or a :class:`~minivlm.config.VLMConfig`.
        overrides: dotted config overrides, e.g. ``"projector=resampler"``.
        corpus: samples (chat sample dicts) to train the tokenizer on; default the built-in
            synthetic corpus (:data:`BUILTIN_CORPUS`, ``corpus_samples`` samples of it).
        seed: seeds the corpus and the model's initialisation.

    The decoder's ``vocab_size`` and ``image_token_id`` follow the tokenizer (a corpus too small
    for the preset's vocabulary gives a smaller one).
    """
    import torch

    from minivlm.data import build_dataset
    from minivlm.model import VisionLanguageModel
    from minivlm.train.recipe import attach_tokenizer, build_processor, build_tokenizer

    cfg = (preset(config) if isinstance(config, str) else config).override(*overrides)  # a copy
    if corpus is None:
        corpus = build_dataset(BUILTIN_CORPUS, "train", seed=seed, image_size=cfg.encoder.image_size,
                               length=corpus_samples)
    tokenizer = build_tokenizer(corpus, cfg.decoder.vocab_size, n_samples=corpus_samples)
    cfg = attach_tokenizer(cfg, tokenizer)
    cfg.validate()
    processor = build_processor(cfg, tokenizer)
    torch.manual_seed(seed)
    model = VisionLanguageModel(cfg)
    model.processor = processor
    return model, processor
