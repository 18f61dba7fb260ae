"""The chat API: conversations in the Hugging Face message format (system / user / assistant;
text, images, video) rendered with the model's :class:`~minivlm.text.processor.Processor`, answered
by :func:`~minivlm.generate.decoding.generate` (whole replies, batches, streams, sessions)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing
from typing import Any

from torch import Tensor

from minivlm.generate.config import GenerationConfig, generation_config
from minivlm.generate.decoding import ReplyText, generate, stream_tokens

Messages = Sequence[Mapping[str, Any]]


def processor_of(model, processor=None):
    """The processor to render conversations with: the given one, else the model's own."""
    processor = processor if processor is not None else getattr(model, "processor", None)
    if processor is None:
        raise ValueError("this model has no processor attached; pass processor= or load a checkpoint "
                         "directory that holds processor_config.json")
    return processor


def _eos_ids(tokenizer) -> list[int]:
    return [i for i in (tokenizer.im_end_id, tokenizer.eos_id) if i is not None]


def _render(model, conversations: Sequence[Messages], processor) -> dict[str, Any]:
    """Left-padded generation prompts; unreadable media and over-long prompts raise here."""
    if isinstance(conversations, (str, Mapping)) or not isinstance(conversations, Sequence):
        raise ValueError(f"expected a list of conversations, got {type(conversations).__name__}")
    return processor(list(conversations), add_generation_prompt=True, padding_side="left")


def chat_batch(model, conversations: Sequence[Messages], *, processor=None, config: GenerationConfig | None = None,
               **options: Any) -> list[str]:
    """Answer each conversation; returns the assistant replies, whitespace-stripped.

    Args:
        conversations: each a message list in the Hugging Face chat format (``system`` /
            ``user`` / ``assistant``; content a string or text / image / video items). Earlier
            turns, their images included, are part of every prompt.
        processor: renders the conversations (default: ``model.processor``).
        config, options: decoding settings (:func:`generation_config`), checked first.
    """
    config = generation_config(config, **options)
    processor = processor_of(model, processor)
    batch = _render(model, conversations, processor)
    tokenizer = processor.tokenizer
    out = generate(model, batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"), config,
                   eos_ids=_eos_ids(tokenizer), tokenizer=tokenizer)
    return [text.strip() for text in out.texts]


def chat(model, messages: Messages, *, processor=None, config: GenerationConfig | None = None, **options: Any) -> str:
    """One conversation in, the assistant's reply out (see :func:`chat_batch`).

    Example::

        chat(model, [{"role": "user", "content": [{"type": "image", "image": "cat.png"},
                                                  {"type": "text", "text": "What is this?"}]}])
    """
    return chat_batch(model, [messages], processor=processor, config=config, **options)[0]


def chat_stream(model, messages: Messages, *, processor=None, config: GenerationConfig | None = None,
                **options: Any) -> Iterator[str]:
    """The reply of :func:`chat` as text pieces while it is generated; ``"".join`` equals it.

    Options, the conversation and its media are checked (and rendered) before this returns;
    the model runs as the iterator is consumed, and breaking out of it leaves the model
    usable.
    """
    config = generation_config(config, **options)
    processor = processor_of(model, processor)
    batch = _render(model, [messages], processor)
    tokens = stream_tokens(model, batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"), config,
                           len(processor.tokenizer))
    return _stream_text(tokens, processor.tokenizer, config)


def _stream_text(tokens: Iterator[Tensor], tokenizer, config: GenerationConfig) -> Iterator[str]:
    reply = ReplyText(tokenizer, config.stop_strings)
    eos = set(_eos_ids(tokenizer))
    shown = ""
    with closing(tokens):
        for step in tokens:
            token = int(step[0])
            if token in eos or reply.add(token):
                break
            # Leading and trailing whitespace is stripped from the final reply; holding back the
            # trailing part keeps every piece shown a prefix of it.
            visible = reply.stable_text().strip()
            if len(visible) > len(shown) and visible.startswith(shown):
                yield visible[len(shown):]
                shown = visible
    final = reply.text().strip()
    if len(final) > len(shown):
        yield final[len(shown):]


class ChatSession:
    """A multi-turn conversation with a model; every turn sees all earlier turns and their images.

    Example::

        session = ChatSession(model, system="Answer in one word.")
        session.ask("What colour is the circle?", images=["shapes.png"])
        session.ask("And its shape?")   # the image of the first turn is still in the prompt
    """

    def __init__(self, model, *, system: str | None = None, processor=None,
                 config: GenerationConfig | None = None, **options: Any):
        self.model = model
        self.processor = processor_of(model, processor)
        self.config = generation_config(config, **options)
        self.messages: list[dict[str, Any]] = []
        if system is not None:
            self.messages.append({"role": "system", "content": [{"type": "text", "text": system}]})

    @staticmethod
    def user_message(text: str, images: Sequence[Any] = (), video: Any = None) -> dict[str, Any]:
        """A user turn: the images, then the video, then the text (LLaVA puts media first)."""
        content: list[dict[str, Any]] = [{"type": "image", "image": image} for image in images]
        if video is not None:
            content.append({"type": "video", "video": video})
        content.append({"type": "text", "text": text})
        return {"role": "user", "content": content}

    def ask(self, text: str, images: Sequence[Any] = (), video: Any = None) -> str:
        """Add a user turn, answer it, and keep the answer in the conversation."""
        return "".join(self.ask_stream(text, images, video))

    def ask_stream(self, text: str, images: Sequence[Any] = (), video: Any = None) -> Iterator[str]:
        """:meth:`ask` as pieces; the turn is kept only if the reply is read to its end."""
        messages = [*self.messages, self.user_message(text, images, video)]
        pieces = chat_stream(self.model, messages, processor=self.processor, config=self.config)
        return self._record(messages, pieces)

    def _record(self, messages: list[dict[str, Any]], pieces: Iterator[str]) -> Iterator[str]:
        reply = []
        with closing(pieces):
            for piece in pieces:
                reply.append(piece)
                yield piece
        self.messages = [*messages, {"role": "assistant", "content": [{"type": "text", "text": "".join(reply)}]}]
