"""``minivlm retrieve``: text -> images and image -> texts, ranked as the Python API ranks them."""

from __future__ import annotations

import json

import pytest

import minivlm.retrieval
from minivlm.cli import main
from minivlm.model import VisionLanguageModel
from minivlm.retrieval import embed_images, embed_texts, rank


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["retrieve", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_text_to_images_over_a_directory(capsys, checkpoint, image_dir, samples, model):
    query = samples[2]["caption"]
    code, out, _ = run(capsys, "--model", checkpoint, "--images", image_dir, "--text", query, "--top", 4, "--json")
    assert code == 0
    report = json.loads(out)
    files = sorted(image_dir.glob("*.png"))  # notes.txt is skipped
    indices, scores = rank(embed_texts(model, [query])[0], embed_images(model, [str(f) for f in files]), k=4)
    assert report["query"] == query
    assert [r["image"] for r in report["results"]] == [str(files[i]) for i in indices.tolist()]
    assert [r["score"] for r in report["results"]] == pytest.approx(scores.tolist(), abs=1e-4)
    assert [r["rank"] for r in report["results"]] == [1, 2, 3, 4]


def test_image_to_texts_from_a_file(capsys, checkpoint, image_dir, samples, tmp_path, model):
    captions = [s["caption"] for s in samples]
    texts = tmp_path / "captions.txt"
    texts.write_text("\n".join(captions[:3]) + "\n\n" + "\n".join(captions[3:]) + "\n")
    image = image_dir / "pair_1.png"
    code, out, _ = run(capsys, "--model", checkpoint, "--image", image, "--texts", texts)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"query: {image}"
    indices, scores = rank(embed_images(model, [str(image)])[0], embed_texts(model, captions))
    assert [line.split(maxsplit=2)[2] for line in lines[1:]] == [captions[i] for i in indices.tolist()]
    assert [float(line.split()[1]) for line in lines[1:]] == pytest.approx(scores.tolist(), abs=1e-4)


def test_a_model_without_retrieval_head_is_refused(capsys, checkpoint, image_dir, tmp_path):
    model = VisionLanguageModel.from_pretrained(checkpoint)
    del model.retrieval_head  # the checkpoint carries one; save the model without it
    model.save_pretrained(tmp_path)
    code, _, err = run(capsys, "--model", tmp_path, "--images", image_dir, "--text", "a red circle")
    assert code == 2 and "no retrieval head" in err


@pytest.mark.parametrize("argv, message", [
    (["--text", "a red circle"], "either --text with --images"),
    (["--text", "a", "--images", "{images}", "--image", "{image}"], "either --text with --images"),
    (["--image", "{missing}", "--texts", "{texts}"], "missing.png"),
    (["--images", "{missing}", "--text", "a"], "neither a file nor a directory"),
    (["--images", "{notes}", "--text", "a"], "notes.txt"),
    (["--images", "{images}", "--text", "a", "--top", "0"], "--top must be >= 1"),
])
def test_bad_arguments_exit_with_2_before_loading_the_model(capsys, monkeypatch, checkpoint, image_dir, tmp_path,
                                                           argv, message):
    monkeypatch.setattr(minivlm.retrieval, "load_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    texts = tmp_path / "texts.txt"
    texts.write_text("a red circle\n")
    paths = {"images": image_dir, "image": image_dir / "pair_0.png", "missing": image_dir / "missing.png",
             "texts": texts, "notes": image_dir / "notes.txt"}
    code, _, err = run(capsys, "--model", checkpoint, *[a.format(**paths) for a in argv])
    assert code == 2 and message in err
