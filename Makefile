# nanosft: `make install && make train` trains the default chat model; `make test` runs the tests.
PY     := .venv/bin/python
ARGS   ?=
RUN    ?= runs/latest
INIT   ?=
DATA   ?=
NGPUS  ?=
NPROC  ?=

# one process by default; NGPUS=N: the deepspeed launcher on N GPUs; NPROC=N: N CPU ranks (gloo),
# to try ZeRO on a laptop. The launcher passes --local_rank; train.py reads its rank from the env.
LAUNCH := $(if $(NGPUS),.venv/bin/deepspeed --num_gpus $(NGPUS),$(if $(NPROC),CUDA_VISIBLE_DEVICES= DS_ACCELERATOR=cpu .venv/bin/deepspeed --num_gpus $(NPROC),$(PY)))

VARIANTS ?=

.PHONY: serve browser install train chat plot evaluate compare test test-all data clean gpu-check lora-demo align align-sft reward reward-max dpo ppo grpo rl

install: .venv/.installed

# deepspeed is a source package that compiles against the installed torch, hence two steps and
# --no-build-isolation (otherwise pip would build it against a second, unpinned torch)
.venv/.installed: requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-build-isolation deepspeed==0.19.8
	touch $@

# test-only references (transformers, safetensors), see requirements-test.txt
.venv/.test-installed: .venv/.installed requirements-test.txt
	$(PY) -m pip install -r requirements-test.txt
	touch $@

# the web page's test runs in Debian's Chromium: installed here when missing and we may (root, apt)
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ; } || \
	  echo "note: no Chromium; tests/test_serve.py's page test needs it (apt-get install chromium)"

data/train.jsonl: data/generate.py
	$(PY) data/generate.py

data: data/train.jsonl

# make train                                 the default run on the built-in data
# make train NGPUS=4 ARGS="--zero-stage 3"    the same on 4 GPUs, ZeRO-3
# make train NPROC=2 ARGS="--zero-stage 2"    2 CPU ranks
# make train INIT=path/to/hf_model DATA=my.jsonl   fine-tune a Llama-family model on your data
train: install data
	$(LAUNCH) train.py $(if $(INIT),--init-from $(INIT)) $(if $(DATA),--data $(DATA) --val-data '' --eval-data '') $(ARGS)

chat: install
	$(PY) chat.py --ckpt $(RUN)

# make serve [RUN=runs/NAME] [ARGS="--port 8080 --api-key KEY"]: an OpenAI-compatible server and a chat
# page at http://127.0.0.1:8000/ (nanosft/serve.py)
serve: install
	$(PY) -m nanosft.serve --ckpt $(RUN) $(ARGS)

# make plot RUN=runs/NAME: redraw runs/NAME/loss.png from the run's monitor CSVs
plot: install
	$(PY) -m nanosft.plot $(RUN)

# make evaluate RUN=runs/NAME [DATA=file]: loss, exact match and BLEU on held-out prompts
evaluate: install data
	$(PY) -m nanosft.evaluate --ckpt $(RUN) $(if $(DATA),--data $(DATA))

# make compare VARIANTS="mha gqa window alibi" [ARGS="--steps 100"]: train each attention variant on
# the same budget, then a table and runs/compare/compare.png (variants: VARIANTS in nanosft/attention.py)
compare: install data
	$(PY) -m nanosft.compare $(if $(VARIANTS),--variants $(VARIANTS)) $(if $(ARGS),-- $(ARGS))

# make lora-demo [RUN=runs/NAME]: after make train, LoRA teaches the trained model a new skill while it
# keeps the old ones, next to a full fine-tune of the same steps (bench/lora_demo.py; 2.5 min on 2 cores)
lora-demo: install
	$(PY) bench/lora_demo.py --base $(RUN) $(ARGS)

# Learning from preferences (README, "Learn from preferences"): data/align/ (data/generate.py --align) is
# the default data with a noisy teacher's answers to max prompts, and preference pairs (half on max).
# make align                   SFT on it, a reward model and DPO (LoRA, with RPO's NLL term and the SFT data's
#                              loss mixed in: README), then a table per family (runs/align/; ~8 min on 2 cores)
# make reward [SFT=run] [DATA=pairs.jsonl]    the reward model alone, from an SFT run
# make dpo [SFT=run] [DATA=pairs.jsonl]       DPO alone
SFT ?= runs/align/sft
PAIRS := $(if $(DATA),--data $(DATA) --val-data '',--data data/align/pairs.jsonl --val-data data/align/pairs_val.jsonl)

data/align/train.jsonl: data/generate.py
	$(PY) data/generate.py --align --out data/align

align-sft: install data/align/train.jsonl
	$(LAUNCH) train.py --data data/align/train.jsonl --val-data data/align/val.jsonl \
	  --eval-data data/align/eval.jsonl --out $(SFT) $(ARGS)

reward: install data/align/train.jsonl
	$(LAUNCH) train.py --stage reward --init-from $(SFT) $(PAIRS) --out runs/align/reward \
	  --lr 1e-3 --epochs 3 $(ARGS)

dpo: install data/align/train.jsonl
	$(LAUNCH) train.py --stage dpo --init-from $(SFT) $(PAIRS) --eval-data $(if $(DATA),'',data/align/eval.jsonl) \
	  --out runs/align/dpo --lora-rank 8 --lora-lr 1e-3 --beta 1.0 --rpo-alpha 2 --epochs 4 \
	  $(if $(DATA),,--sft-data data/align/train.jsonl) $(ARGS)

align: align-sft reward dpo
	$(PY) -m nanosft.evaluate --report $(SFT) runs/align/reward runs/align/dpo

# Reinforcement learning (README, "Reinforcement learning"), after make align, from its SFT run:
# make reward-max [SFT=run]  PPO's reward model: make align's pairs and data/align/max_pairs.jsonl's 64,000,
#                            centred (runs/align/reward_max; ~8 min on 2 cores)
# make ppo [SFT=run]         PPO with it on max prompts half close calls (runs/align/ppo; ~6-9 min)
# make grpo [SFT=run]        GRPO, exact match the reward, on the same prompts (runs/align/grpo; ~4 min)
# make rl                    all three, then a table beside the SFT run
reward-max: install data/align/train.jsonl
	$(LAUNCH) train.py --stage reward --init-from $(SFT) --data data/align/pairs.jsonl data/align/max_pairs.jsonl \
	  --val-data data/align/pairs_val.jsonl --out runs/align/reward_max --lr 1e-3 --epochs 2 --center-rewards 0.01 $(ARGS)

ppo: install data/align/train.jsonl
	$(LAUNCH) train.py --stage ppo --init-from $(SFT) --reward-model runs/align/reward_max --data data/align/max_prompts.jsonl \
	  --eval-data data/align/eval.jsonl --out runs/align/ppo --lora-rank 8 --lora-lr 3e-3 --critic-lr 1e-4 \
	  --batch-size 64 --epochs 8 --temperature 1.5 --kl-coef 0.2 --ppo-epochs 2 --whiten --ema 0.95 \
	  --sft-data data/align/train.jsonl $(ARGS)

grpo: install data/align/train.jsonl
	$(LAUNCH) train.py --stage grpo --init-from $(SFT) --data data/align/max_prompts.jsonl \
	  --eval-data data/align/eval.jsonl --out runs/align/grpo --lora-rank 8 --lora-lr 3e-3 --group 8 --batch-size 8 \
	  --kl-coef 0.04 --epochs 2 --ema 0.95 --sft-data data/align/train.jsonl $(ARGS)

rl: reward-max ppo grpo
	$(PY) -m nanosft.evaluate --report $(SFT) runs/align/ppo runs/align/grpo

# make gpu-check: every path only a GPU takes, run once, one table (bench/gpu_check.py). It runs with
# the Python that already holds CUDA PyTorch (GPU_PY), never .venv and its CPU wheel: README, "On a GPU"
GPU_PY ?= python3
gpu-check:
	$(GPU_PY) bench/gpu_check.py $(ARGS)

# make test: the suite without the tests marked slow (multi-process and end-to-end runs); make test-all: all
test: install .venv/.test-installed browser
	$(PY) -m pytest -m "not slow" $(ARGS)

test-all: install .venv/.test-installed browser
	$(PY) -m pytest $(ARGS)

clean:
	rm -rf runs data/*.jsonl data/cache .pytest_cache
