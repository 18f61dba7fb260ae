"""``minivlm chat``: one-shot, JSON, streaming and interactive answers equal the Python chat API; bad
input fails with exit code 2 before the model is loaded."""

from __future__ import annotations

import io
import json

import pytest

import minivlm.retrieval
from minivlm.cli import main
from minivlm.data import build_dataset
from minivlm.generate import ChatSession, chat

QUESTION = "What colour is the large shape?"


def user(text, *images):
    return {"role": "user", "content": [*({"type": "image", "image": im} for im in images), {"type": "text", "text": text}]}


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["chat", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_answers_a_question_about_an_image(capsys, checkpoint, image_dir, model):
    image = image_dir / "pair_0.png"
    code, out, _ = run(capsys, "--model", checkpoint, "--image", image, "--max-new-tokens", 8, QUESTION)
    assert code == 0
    assert out == chat(model, [user(QUESTION, str(image))], max_new_tokens=8) + "\n"


def test_json_streaming_and_system_prompt(capsys, checkpoint, image_dir, model):
    images = [image_dir / "pair_1.png", image_dir / "pair_2.png"]
    common = ["--model", checkpoint, "--image", images[0], "--image", images[1], "--system", "Be brief.",
              "--max-new-tokens", 8, "--temperature", 0.8, "--top-p", 0.9, "--seed", 5]
    expected = chat(model, [{"role": "system", "content": "Be brief."}, user(QUESTION, *map(str, images))],
                    max_new_tokens=8, temperature=0.8, top_p=0.9, seed=5)
    code, out, _ = run(capsys, *common, "--json", QUESTION)
    assert code == 0 and json.loads(out) == {"answer": expected}
    code, out, _ = run(capsys, *common, "--stream", QUESTION)
    assert code == 0 and out == expected + "\n"


def test_interactive_session_is_multi_turn_and_keeps_the_images(capsys, monkeypatch, checkpoint, image_dir, model):
    image = image_dir / "pair_3.png"
    monkeypatch.setattr("sys.stdin", io.StringIO("What is it?\n\nAnd where?\nexit\nNever asked\n"))
    code, out, _ = run(capsys, "--model", checkpoint, "--image", image, "--max-new-tokens", 6, "--json")
    assert code == 0
    session = ChatSession(model, max_new_tokens=6)
    expected = [session.ask("What is it?", images=[str(image)]), session.ask("And where?")]
    assert [json.loads(line)["answer"] for line in out.splitlines()] == expected


def test_video_question(capsys, checkpoint, tmp_path, model):
    clip = build_dataset("video", "test", seed=0, image_size=48)[0]
    frames = clip["messages"][0]["content"][0]["video"]
    for i, frame in enumerate(frames):
        frame.save(tmp_path / f"frame_{i:02d}.png")
    question = "Which way does the shape move?"
    code, out, _ = run(capsys, "--model", checkpoint, "--video", tmp_path, "--max-new-tokens", 5, question)
    assert code == 0
    messages = [{"role": "user", "content": [{"type": "video", "video": str(tmp_path)}, {"type": "text", "text": question}]}]
    assert out == chat(model, messages, max_new_tokens=5) + "\n"


@pytest.fixture
def model_must_not_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although the input was invalid")

    monkeypatch.setattr(minivlm.retrieval, "load_pretrained", refuse)


@pytest.mark.parametrize("argv, message", [
    (["--image", "{missing}", QUESTION], "missing.png"),
    (["--image", "{not_an_image}", QUESTION], "notes.txt"),
    (["--temperature", "-1", QUESTION], "temperature"),
    (["--top-p", "1.5", QUESTION], "top_p"),
    (["--max-new-tokens", "0", QUESTION], "max_new_tokens"),
    (["--video", "{missing}", QUESTION], "missing.png"),
])
def test_bad_input_exits_with_2_before_loading_the_model(capsys, checkpoint, image_dir, model_must_not_load,
                                                        argv, message):
    paths = {"missing": image_dir / "missing.png", "not_an_image": image_dir / "notes.txt"}
    argv = [a.format(**paths) for a in argv]
    code, out, err = run(capsys, "--model", checkpoint, *argv)
    assert code == 2
    assert out == ""
    assert err.startswith("minivlm chat: error:") and message in err


def test_a_directory_that_is_no_checkpoint_is_a_clear_error(capsys, tmp_path):
    code, _, err = run(capsys, "--model", tmp_path, QUESTION)
    assert code == 2 and "config.json is missing" in err
