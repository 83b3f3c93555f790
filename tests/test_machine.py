"""machine.py promises: a choice of threads is the faster of the candidates as measured, left set
afterwards, and not made at all when OMP_NUM_THREADS says it; a dtype asked for is kept, and
"auto" on a CPU picks bf16 only when bf16 matmuls measured clearly faster, saying by how much."""

import re
import time

import pytest
import torch

from nanosft import machine
from nanosft.model import ModelConfig, Transformer


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_faster_thread_count_is_chosen_and_left_set():
    slow_on = {1: 2, 2: 1}  # which count a fake workload is slow on
    for slow in (1, 2):
        calls = []

        def work():
            calls.append(torch.get_num_threads())
            time.sleep(0.02 if torch.get_num_threads() == slow_on[slow] else 0.002)
        n, times = machine.fastest_threads(work, candidates=[1, 2])
        assert n == {1: 1, 2: 2}[slow] == torch.get_num_threads() and times[n] < times[3 - n]
        assert calls == [1, 2] * 5  # taking turns: a warm-up and 4 timed calls each


def test_omp_num_threads_is_a_choice_already_made(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    assert machine.fastest_threads(lambda: pytest.fail("no probe with OMP_NUM_THREADS")) == (1, {})
    assert machine.why_threads(1, {}) == "1 thread (OMP_NUM_THREADS or --threads)"


def test_decoding_and_training_probes_time_the_model_and_change_nothing_else():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layer=2, n_head=4, max_seq_len=64)).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for probe in (lambda: machine.decoding_threads(model), lambda: machine.training_threads(model, 2, 16)):
        n, times = probe()
        assert n in times and set(times) == {1, machine.CORES} and torch.get_num_threads() == n
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert re.fullmatch(r"2 threads \(1 thread: \d+\.\dx slower\)", machine.why_threads(2, {1: 0.3, 2: 0.1}))


def test_a_dtype_asked_for_is_kept_and_auto_says_what_it_measured():
    assert machine.pick_dtype("fp32", torch.device("cpu")) == ("fp32", "as asked")
    assert machine.pick_dtype("bf16", torch.device("cpu")) == ("bf16", "as asked")
    dtype, why = machine.pick_dtype("auto", torch.device("cpu"), dim=64)
    ratio = float(re.search(r"measured (?:only )?(\d+\.\d)x (faster|slower)", why)[1])
    assert dtype == ("bf16" if "faster" in why and "only" not in why else "fp32")
    assert ratio >= 1.0 and (dtype == "fp32" or ratio >= 1.5)


def test_using_threads_restores_the_count():
    torch.set_num_threads(2)
    with machine.using_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_auto_dtype_on_a_gpu_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    gpu = torch.device("cuda", 0)  # a device object needs no GPU
    emulated_only = lambda including_emulation=True: including_emulation  # noqa: E731  (a V100, a T4)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", emulated_only)
    assert machine.pick_dtype("auto", gpu) == ("fp16", "the GPU has no bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100, H100
    assert machine.pick_dtype("auto", gpu) == ("bf16", "the GPU has bf16")
