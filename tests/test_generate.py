"""Generation: the static KV cache decodes exactly like a full recompute, batching and streaming change
nothing, stop conditions, logits processors on hand-built logits, seeds, bad input before compute, the
compiled decode step, the chat API and likelihood scoring.

The models are tiny (2 decoder layers of width 32, 48 px images) with weights redrawn at a large
scale and cross-attention gates opened, so that greedy outputs depend on the prompt and the images
(a freshly initialised model repeats one token whatever it is shown, which no test could tell apart).
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minivlm.config import preset
from minivlm.data import build_dataset
from minivlm.eval.choice import pick_option
from minivlm.generate import (
    ChatSession,
    GenerationConfig,
    ReplyText,
    chat,
    chat_batch,
    chat_stream,
    continuation_logprobs,
    decode_step,
    generate,
    generation_config,
    logprob_fn,
    pick_tokens,
    prefill,
    process_logits,
)
from minivlm.model import VisionLanguageModel
from minivlm.train.recipe import attach_tokenizer, build_processor, build_tokenizer
from tinykit import TINY_PARTS

FUSIONS = ("splice", "prefix", "cross_attention")
TINY = TINY_PARTS + (
    "decoder.n_layers=2", "decoder.max_seq_len=160", "data.max_length=160", "data.video_frames=3",
)


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def shapes(n: int = 6) -> tuple[dict, ...]:
    data = build_dataset("shapes", "test", seed=0, image_size=48)
    return tuple(data[i] for i in range(n))


@functools.lru_cache(maxsize=None)
def tokenizer():
    train = build_dataset("shapes", "train", seed=0, image_size=48)
    return build_tokenizer([train[i] for i in range(200)], vocab_size=300)


@functools.lru_cache(maxsize=None)
def lively_model(fusion: str = "splice") -> VisionLanguageModel:
    """A tiny model whose greedy replies depend on its input (see the module docstring)."""
    cfg = attach_tokenizer(preset("tiny").override(*TINY, f"fusion.kind={fusion}"), tokenizer())
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_gate"):
                p.fill_(1.0)
            elif p.ndim >= 2:
                p.normal_(0.0, 0.5)
    model.processor = build_processor(cfg, tokenizer())
    return model


def image(i: int):
    """The PIL image of the i-th shapes test sample."""
    return shapes()[i]["messages"][0]["content"][0]["image"]


def user(text: str, *images) -> dict:
    return {"role": "user", "content": [*({"type": "image", "image": im} for im in images), {"type": "text", "text": text}]}


def conversations() -> list[list[dict]]:
    """Different lengths and image counts (0, 1, 2 images; a system turn; two turns)."""
    return [
        [user("What colour is the circle?", image(0))],
        [user("Hello")],
        [{"role": "system", "content": "Answer briefly."}, user("Which image has more shapes?", image(1), image(2))],
        [user("Describe it.", image(3)), {"role": "assistant", "content": "a red circle"}, user("And the shape?")],
    ]


def greedy_without_cache(model: VisionLanguageModel, conversation: list[dict], n: int) -> list[int]:
    """The reference: re-run the full forward over prompt + generated tokens at every step."""
    batch = model.processor([conversation], add_generation_prompt=True)
    ids, pixels = batch["input_ids"], batch["pixel_values"]
    tokens = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids, pixel_values=pixels).logits[0, -1]
            logits[model.config.image_token_id] = float("-inf")
            tokens.append(int(logits.argmax()))
            ids = torch.cat([ids, torch.tensor([[tokens[-1]]])], dim=1)
    return tokens


def generate_tokens(model, conversations_, **options) -> list[list[int]]:
    batch = model.processor(conversations_, add_generation_prompt=True, padding_side="left")
    out = generate(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], GenerationConfig(**options))
    return out.tokens


# ---- the cache, batching, streaming ------------------------------------------------------------------
@pytest.mark.parametrize("fusion", FUSIONS)
def test_greedy_with_the_static_cache_equals_full_recompute(fusion):
    model = lively_model(fusion)
    for conversation in conversations():
        assert generate_tokens(model, [conversation], max_new_tokens=10)[0] == greedy_without_cache(model, conversation, 10)


def test_replies_depend_on_the_prompt_and_the_images():
    """The precondition of the equality tests: these models do not ignore their input."""
    for fusion in FUSIONS:
        model = lively_model(fusion)
        replies = [generate_tokens(model, [[user("What is it?", image(i))]], max_new_tokens=6)[0] for i in range(4)]
        assert len({tuple(r) for r in replies}) > 1, fusion


def assert_batched_equals_one_by_one(model, batch):
    lengths = {len(model.processor.render(c, add_generation_prompt=True)) for c in batch}
    assert len(lengths) == len(batch)  # really different lengths, so rows are padded differently
    together = generate_tokens(model, batch, max_new_tokens=8)
    alone = [generate_tokens(model, [c], max_new_tokens=8)[0] for c in batch]
    assert together == alone


@pytest.mark.parametrize("fusion", ["splice", "prefix"])
def test_batched_left_padded_equals_one_by_one(fusion):
    assert_batched_equals_one_by_one(lively_model(fusion), conversations())


def test_batched_cross_attention_equals_one_by_one_when_every_row_has_images():
    conversation_with_images = [c for c in conversations() if len(c) > 1 or len(c[0]["content"]) > 1]
    assert_batched_equals_one_by_one(lively_model("cross_attention"), conversation_with_images)


def test_batched_cross_attention_equals_one_by_one_with_a_text_only_row():
    assert_batched_equals_one_by_one(lively_model("cross_attention"), conversations()[:2])


@pytest.mark.parametrize("options", [{}, {"temperature": 0.9, "top_k": 40, "seed": 3}, {"repetition_penalty": 1.5}])
def test_streaming_equals_non_streaming(options):
    model = lively_model()
    for conversation in conversations():
        streamed = list(chat_stream(model, conversation, max_new_tokens=12, **options))
        assert "".join(streamed) == chat(model, conversation, max_new_tokens=12, **options)


@pytest.mark.parametrize("fusion", ["splice", "cross_attention"])
def test_images_are_encoded_once_per_reply(fusion):
    model = lively_model(fusion)
    encoded = []
    handle = model.encoder.register_forward_hook(lambda module, args, out: encoded.append(args[0].shape[0]))
    try:
        chat(model, conversations()[2], max_new_tokens=10)
    finally:
        handle.remove()
    assert encoded == [2]  # one encoder call, for both images, during the prefill


# ---- stopping ---------------------------------------------------------------------------------------
def test_eos_stops_the_row_and_is_not_returned():
    model = lively_model()
    conversation = conversations()[0]
    free = generate_tokens(model, [conversation], max_new_tokens=10)[0]
    stop_at = next(i for i, t in enumerate(free) if t not in free[:i] and i >= 2)
    batch = model.processor([conversation], add_generation_prompt=True)
    out = generate(model, batch["input_ids"], pixel_values=batch["pixel_values"],
                   config=GenerationConfig(max_new_tokens=10), eos_ids=[free[stop_at]])
    assert out.tokens == [free[:stop_at]]
    assert out.finish_reasons == ["eos"]


def test_stop_string_stops_generation_and_is_cut_from_the_text():
    model = lively_model()
    tok = model.processor.tokenizer

    def run(conversation, *stop_strings):
        batch = model.processor([conversation], add_generation_prompt=True)
        config = GenerationConfig(max_new_tokens=12, stop_strings=stop_strings)
        return generate(model, batch["input_ids"], pixel_values=batch["pixel_values"], config=config, tokenizer=tok)

    # The random model writes mostly byte pieces: take the first reply with two whole characters
    # (no partial byte's U+FFFD) after its third, and stop on them.
    for conversation in conversations():
        free = run(conversation)
        text = free.texts[0]
        starts = [i for i in range(3, len(text) - 1) if "\ufffd" not in text[i : i + 2]]
        if starts:
            stop = text[starts[0] : starts[0] + 2]
            break
    stopped = run(conversation, stop)
    assert stopped.finish_reasons == ["stop_string"]
    assert stopped.texts == [text[: text.index(stop)]]
    assert len(stopped.tokens[0]) < len(free.tokens[0])
    streamed = "".join(chat_stream(model, conversation, max_new_tokens=12, stop_strings=[stop]))
    assert streamed == chat(model, conversation, max_new_tokens=12, stop_strings=[stop]) == text[: text.index(stop)].strip()


class CharTokenizer:
    """Each id is one character; ids >= 200 are the halves of a two-byte character (decoded
    as U+FFFD until both have arrived), like sentencepiece's byte fallback."""

    def decode(self, ids, skip_special_tokens=True):
        out, pending = [], None
        for i in ids:
            if i >= 200 and pending is None:
                pending = i
            elif i >= 200:
                out.append("é")
                pending = None
            else:
                out.append(chr(i))
        return "".join(out) + ("\ufffd" if pending is not None else "")


def test_stream_text_holds_back_possible_stop_prefixes_and_partial_characters():
    reply = ReplyText(CharTokenizer(), stop_strings=("END",))
    shown = []
    for token in [ord(c) for c in "ab E"] + [200]:
        reply.add(token)
        shown.append(reply.stable_text())
    # "ab E" may become "ab END": the "E" waits; the half character waits for its second byte.
    assert shown == ["a", "ab", "ab ", "ab ", "ab "]
    assert reply.add(201) is False and reply.stable_text() == "ab Eé"
    assert reply.add(ord("E")) is False and reply.stable_text() == "ab Eé"
    assert reply.add(ord("N")) is False and reply.add(ord("D")) is True
    assert reply.text() == "ab Eé"


# ---- logits processing on hand-built logits -------------------------------------------------------------
def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = process_logits(logits, GenerationConfig(repetition_penalty=2.0), seen)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]
    assert process_logits(logits, GenerationConfig(), seen).tolist() == logits.tolist()


def test_greedy_ignores_temperature_filters_and_temperature_scales():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert process_logits(logits, GenerationConfig(top_k=1, top_p=0.1)).tolist() == logits.tolist()
    assert process_logits(logits, GenerationConfig(temperature=2.0)).tolist() == [[0.5, 1.5, 1.0, 0.0]]


def test_top_k_keeps_the_k_largest_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, -1.0, 5.0, 4.0]])
    out = process_logits(logits, GenerationConfig(temperature=1.0, top_k=2))
    inf = float("-inf")
    assert out.tolist() == [[inf, 3.0, 2.0, inf], [inf, inf, 5.0, 4.0]]


@pytest.mark.parametrize("top_p, kept", [(0.45, 1), (0.6, 2), (0.85, 3), (0.97, 4), (1.0, 4), (1e-6, 1)])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])  # sorted: 0.5, 0.3, 0.15, 0.05
    out = process_logits(probs.log(), GenerationConfig(temperature=1.0, top_p=top_p))
    survivors = torch.isfinite(out[0]).nonzero().flatten().tolist()
    assert sorted(survivors) == sorted([1, 3, 2, 0][:kept])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-8, 8), min_size=2, max_size=30, unique=True), st.floats(0.01, 1.0))
def test_top_p_kept_mass_reaches_p_and_no_smaller_set_does(values, top_p):
    logits = torch.tensor([values], dtype=torch.float64).float()
    out = process_logits(logits, GenerationConfig(temperature=1.0, top_p=top_p))
    probs = torch.softmax(logits[0].double(), 0)
    kept = torch.isfinite(out[0])
    mass = probs[kept].sum().item()
    assert mass >= top_p - 1e-5
    assert mass - probs[kept].min().item() < top_p + 1e-5  # without its least likely token it falls short
    assert probs[~kept].max().item() <= probs[kept].min().item() if (~kept).any() else True


def test_sampling_follows_the_processed_distribution():
    logits = torch.tensor([[math.log(0.7), math.log(0.2), math.log(0.1)]]).expand(4000, 3)
    config = GenerationConfig(temperature=1.0, top_k=2)
    draws = pick_tokens(process_logits(logits, config), config, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=3) / draws.numel()
    assert freq[2] == 0  # removed by top-k
    assert abs(freq[0].item() - 0.7 / 0.9) < 0.03


def test_sampling_is_reproducible_with_a_seed():
    model = lively_model()
    conversation = conversations()[0]
    runs = [generate_tokens(model, [conversation], max_new_tokens=12, temperature=1.0, seed=s) for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


# ---- bad input, before any compute -------------------------------------------------------------------
@pytest.mark.parametrize("options, field", [
    ({"temperature": -0.5}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"stop_strings": "###"}, "stop_strings"), ({"stop_strings": ("",)}, "stop_strings"),
    ({"seed": 1.5}, "seed"), ({"temprature": 0.5}, "unknown generation option"),
])
def test_bad_options_raise_before_any_compute(options, field):
    model = lively_model()
    calls = []
    handle = model.decoder.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=field):
            chat(model, conversations()[0], **options)
        with pytest.raises(ValueError, match=field):
            chat_stream(model, conversations()[0], **options)
    finally:
        handle.remove()
    assert calls == []


def test_bad_prompts_raise_before_any_compute():
    model = lively_model()
    batch = model.processor([conversations()[0]], add_generation_prompt=True)
    ids, pixels = batch["input_ids"], batch["pixel_values"]
    calls = []
    handle = model.encoder.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match="context of 160 tokens"):
            generate(model, ids, pixel_values=pixels, config=GenerationConfig(max_new_tokens=160))
        with pytest.raises(ValueError, match="image placeholder"):
            generate(model, ids, pixel_values=torch.cat([pixels, pixels]))
        right_padded = torch.ones_like(ids, dtype=torch.bool)
        right_padded[:, -2:] = False
        with pytest.raises(ValueError, match="left-padded"):
            generate(model, ids, right_padded, pixels)
        with pytest.raises(ValueError, match="image file"):
            chat(model, [user("What is it?", "/no/such/image.png")])
    finally:
        handle.remove()
    assert calls == []


# ---- interruption -------------------------------------------------------------------------------------
def test_an_interrupted_stream_leaves_the_model_and_autograd_as_they_were():
    model = lively_model()
    fresh = copy.deepcopy(model)
    first, second = conversations()[0], conversations()[2]
    stream = chat_stream(model, first, max_new_tokens=12)
    next(stream)
    assert torch.is_grad_enabled()  # no no_grad() leaking out of the suspended generator
    for _ in stream:
        break  # abandon it half-way
    assert chat(model, second, max_new_tokens=12) == chat(fresh, second, max_new_tokens=12)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_generate_interrupted_by_its_tokenizer_leaves_inference_mode_and_the_packed_weights():
    """generate() holds inference mode and the packed weights across its own loop; whatever stops
    the loop (here the tokenizer raising on the third token) leaves neither behind."""
    model = lively_model()
    batch = model.processor(conversations()[:1], add_generation_prompt=True, padding_side="left")

    class FailingTokenizer:
        calls = 0

        def __len__(self):
            return len(model.processor.tokenizer)

        def decode(self, ids, skip_special_tokens=True):
            FailingTokenizer.calls += 1
            if FailingTokenizer.calls == 3:
                raise RuntimeError("tokenizer broke")
            return "x" * len(ids)

    with pytest.raises(RuntimeError, match="tokenizer broke"):
        generate(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                 GenerationConfig(max_new_tokens=8), tokenizer=FailingTokenizer())
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    assert all(getattr(m, "packed", None) is None for m in model.modules())
    model(batch["input_ids"], batch["pixel_values"]).logits.sum().backward()  # training works as before


# ---- the compiled decode step ----------------------------------------------------------------------------
def counting_compiled_step():
    """``(decode_step compiled in one graph or failing, the list of graphs it captured)``."""
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    return torch.compile(decode_step, backend=counting_backend, fullgraph=True, dynamic=False), graphs


def greedy_with_step(model, step, conversations_, new_tokens) -> list[list[int]]:
    """Prefill ``conversations_`` into a whole-buffer cache, then ``new_tokens`` greedy ``step`` calls."""
    batch = model.processor(conversations_, add_generation_prompt=True, padding_side="left")
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    cache = model.decoder.new_cache(ids.shape[0], model.config.decoder.max_seq_len)
    tokens = []
    with torch.no_grad():
        logits = prefill(model, cache, ids, mask, batch["pixel_values"])
        for _ in range(new_tokens):
            logits[:, model.config.image_token_id] = float("-inf")
            tokens.append(logits.argmax(-1))
            logits = step(model, cache, tokens[-1])
    return torch.stack(tokens, 1).tolist()


@pytest.mark.parametrize("fusion", FUSIONS)
def test_decode_step_is_captured_as_one_graph_for_every_step(fusion):
    model = lively_model(fusion)
    step, graphs = counting_compiled_step()
    tokens = greedy_with_step(model, step, conversations()[:3], 6)
    assert len(graphs) == 1
    assert tokens == generate_tokens(model, conversations()[:3], max_new_tokens=6)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_a_second_prompt_reuses_the_compiled_step(fusion):
    """A new prompt of the same shape is a new cache for the same graph: no recompilation. (The
    cross-attention images once lived in a weak dictionary keyed by the cache; the compiler
    guarded on its entries, so every prompt recompiled, and a dead cache collected while it
    traced crashed the compilation.)"""
    model = lively_model(fusion)
    step, graphs = counting_compiled_step()
    first, second = conversations()[:3], conversations()[1:4]
    replies = [greedy_with_step(model, step, batch, 4) for batch in (first, second, first)]
    assert len(graphs) == 1
    assert replies[0] == replies[2] == generate_tokens(model, first, max_new_tokens=4)
    assert replies[1] == generate_tokens(model, second, max_new_tokens=4)


@pytest.mark.parametrize("fusion", ["splice", "cross_attention"])
def test_compile_option_gives_the_same_tokens(fusion):
    model = lively_model(fusion)
    batch = conversations()[:3]
    eager = chat_batch(model, batch, max_new_tokens=8)
    assert chat_batch(model, batch, max_new_tokens=8, compile=True, compile_backend="aot_eager") == eager


# ---- chat API ---------------------------------------------------------------------------------------------
def test_multi_turn_session_keeps_earlier_images_in_the_prompt():
    model = lively_model()
    session = ChatSession(model, system="Answer briefly.", max_new_tokens=6)
    first = session.ask("What colour is the circle?", images=[image(0)])
    encoded = []
    handle = model.encoder.register_forward_hook(lambda module, args, out: encoded.append(args[0].shape[0]))
    try:
        second = session.ask("And its shape?")
    finally:
        handle.remove()
    assert encoded == [1]  # the first turn's image is part of the second turn's prompt
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    expected = chat(model, session.messages[:-1], max_new_tokens=6)
    assert (first, second) == (session.messages[2]["content"][0]["text"], expected)


def test_an_interrupted_session_turn_is_not_recorded():
    session = ChatSession(lively_model(), max_new_tokens=6)
    for _ in session.ask_stream("Hello"):
        break
    assert session.messages == []


def test_video_questions_encode_every_sampled_frame():
    model = lively_model()
    clip = build_dataset("video", "test", seed=0, image_size=48)[0]
    encoded = []
    handle = model.encoder.register_forward_hook(lambda module, args, out: encoded.append(tuple(args[0].shape[:2])))
    try:
        reply = chat(model, clip["messages"][:-1], max_new_tokens=4)
    finally:
        handle.remove()
    assert isinstance(reply, str)
    # Once, at prefill: the sampled frames in groups of temporal_patch_size, stacked on channels.
    t, frames = model.config.encoder.temporal_patch_size, model.config.data.video_frames
    assert encoded == [(-(-frames // t), 3 * t)]


# ---- likelihood scoring -----------------------------------------------------------------------------------
def test_continuation_logprobs_match_a_full_forward():
    model = lively_model("prefix")
    conversation = [user("What shape is it?", image(1))]
    options = ["circle", "a red triangle"]
    scored = continuation_logprobs(model, conversation, options)
    prompt = model.processor.render(conversation, add_generation_prompt=True)
    for option, logprobs in zip(options, scored):
        cont = model.processor.tokenizer.encode(option)
        ids = torch.tensor([prompt.input_ids + cont])
        with torch.no_grad():
            logits = model(ids, pixel_values=prompt.pixel_values).logits[0].log_softmax(-1)
        P = len(prompt.input_ids)
        expected = torch.stack([logits[P - 1 + i, t] for i, t in enumerate(cont)])
        torch.testing.assert_close(logprobs, expected, rtol=1e-5, atol=1e-5)


def test_logprob_fn_plugs_into_multiple_choice_scoring():
    model = lively_model()
    tok = model.processor.tokenizer
    prompt = model.processor.render([user("What shape is it?", image(1))], add_generation_prompt=True)
    with torch.no_grad():
        next_logits = model(torch.tensor([prompt.input_ids]), pixel_values=prompt.pixel_values).logits[0, -1]
    # Options of one token each (their text encodes back to that token): the one the model finds
    # most likely next must win.
    singles = [t for t in range(8, tok.vocab_size) if tok.encode(tok.decode([t])) == [t]]
    best = max(singles, key=lambda t: next_logits[t].item())
    others = [t for t in singles if t != best]
    options = [tok.decode([t]) for t in (others[0], best, others[-1])]
    assert pick_option(logprob_fn(model, [image(1)]), "What shape is it?", options, normalize="sum") == 1


def test_generation_config_rejects_unknown_options_by_name():
    with pytest.raises(ValueError, match="temprature"):
        generation_config(temprature=1.0)
    assert generation_config(GenerationConfig(top_k=5), temperature=0.5) == GenerationConfig(top_k=5, temperature=0.5)
