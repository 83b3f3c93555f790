# nanosft: `make install && make train` trains the default chat model; `make test` runs the tests.
PY     := .venv/bin/python
ARGS   ?=
RUN    ?= runs/latest
INIT   ?=
DATA   ?=

.PHONY: install train chat test data clean

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

data/train.jsonl: data/generate.py
	$(PY) data/generate.py

data: data/train.jsonl

# make train                                 the default run on the built-in data
# make train INIT=path/to/hf_model DATA=my.jsonl   fine-tune a Llama-family model on your data
train: install data
	$(PY) train.py $(if $(INIT),--init-from $(INIT)) $(if $(DATA),--data $(DATA) --val-data '' --eval-data '') $(ARGS)

chat: install
	$(PY) chat.py --ckpt $(RUN)

test: install .venv/.test-installed
	$(PY) -m pytest $(ARGS)

clean:
	rm -rf runs data/*.jsonl .pytest_cache
