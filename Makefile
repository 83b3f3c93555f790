# nanosft: `make install && make train` trains the default chat model; `make test` runs the tests.
PY     := .venv/bin/python
ARGS   ?=
RUN    ?= runs/latest

.PHONY: install train chat test data clean

install: .venv/.installed

# deepspeed is a source package that compiles against the installed torch, hence two steps and
# --no-build-isolation (otherwise pip would build it against a second, unpinned torch)
.venv/.installed: requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-build-isolation deepspeed==0.19.8
	touch $@

data/train.jsonl: data/generate.py
	$(PY) data/generate.py

data: data/train.jsonl

train: install data
	$(PY) train.py $(ARGS)

chat: install
	$(PY) chat.py --ckpt $(RUN)

test: install
	$(PY) -m pytest $(ARGS)

clean:
	rm -rf runs data/*.jsonl .pytest_cache
