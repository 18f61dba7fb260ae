# Two entry points: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv with pip if it is missing, install minivlm in editable mode, and run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch 2.14.1 + torchvision 0.29.1 is the pairing that timm/open_clip import with here;
# elsewhere any torch>=2.5 with its matching torchvision works.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1" || $(PY) -m pip install --quiet torch torchvision
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The main job: train the tiny VLM (a fixed number of steps: the same schedule on any machine, ~7-9
# minutes on 2 CPU cores with bf16 instructions, ~10-11 without), then ask it about an easy-VQA test image
# and the course page's bar chart, and retrieve with it both ways among 8 test image-caption pairs
# (the answer is image 3 / caption 4).
demo: $(STAMP)
	$(VENV)/bin/minivlm train --out runs/tiny --overwrite
	$(VENV)/bin/minivlm chat --model runs/tiny/model \
		--image "$$($(PY) -c 'from minivlm.data.easy_vqa import default_data_dir; print(default_data_dir() / "test/images/0.png")')" \
		"what shape is in the image?"
	$(PY) -c 'from minivlm.data.charts import seed_chart_image; seed_chart_image().save("runs/tiny/seed_chart.png")'
	$(VENV)/bin/minivlm chat --model runs/tiny/model --image runs/tiny/seed_chart.png \
		"What is the highest value in the bar chart?"
	$(PY) -c 'import pathlib; from minivlm.data import build_dataset; d = build_dataset("retrieval", "test", image_size=64); \
		out = pathlib.Path("runs/tiny/retrieval"); out.mkdir(exist_ok=True); [d[i]["image"].save(out / f"{i}.png") for i in range(8)]; \
		(out / "captions.txt").write_text("".join(d[i]["caption"] + "\n" for i in range(8)))'
	$(VENV)/bin/minivlm retrieve --model runs/tiny/model --images runs/tiny/retrieval --top 3 \
		--text "$$(sed -n 4p runs/tiny/retrieval/captions.txt)"
	$(VENV)/bin/minivlm retrieve --model runs/tiny/model --image runs/tiny/retrieval/3.png \
		--texts runs/tiny/retrieval/captions.txt --top 3

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs .pytest_cache
