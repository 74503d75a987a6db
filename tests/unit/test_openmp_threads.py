"""One OpenMP pool per serving process (services/common/openmp.py): model loads
run on one intra-op thread, on a side thread, so the caller's thread keeps its
count; the engine's decode loop is the thread that gets all of them."""

from __future__ import annotations

import threading

import pytest
import torch

from services.common import openmp
from services.common.hotswap import ModelSwitcher
from services.common.models import load_causal_lm
from services.policy.engine import Engine
from tests.conftest import make_settings
from tests.unit.test_policy_engine import collect, request


def test_on_side_thread_runs_on_one_thread_and_leaves_the_caller_alone():
    before = torch.get_num_threads()
    seen = openmp.on_side_thread(lambda: (threading.current_thread().name, torch.get_num_threads()), "probe")
    assert seen == ("probe", 1)
    assert torch.get_num_threads() == before

    def broken():
        raise ValueError("bad checkpoint")

    with pytest.raises(ValueError, match="bad checkpoint"):
        openmp.on_side_thread(broken)


def test_compute_thread_takes_the_default_or_the_setting():
    seen = []

    def probe(n):
        openmp.compute_thread(n)
        seen.append(torch.get_num_threads())

    for n in (0, 1):
        worker = threading.Thread(target=probe, args=(n,))
        worker.start()
        worker.join()
    assert seen == [openmp.default_threads(), 1]


def test_loads_run_on_a_side_thread_and_decoding_on_the_engine_thread(tmp_path):
    settings = make_settings(tmp_path)
    caller = torch.get_num_threads()
    loads, steps = [], []

    def load(path, manifest):
        loads.append((threading.current_thread() is threading.main_thread(), torch.get_num_threads()))
        model = load_causal_lm(path)
        model.register_forward_pre_hook(lambda module, args: steps.append(torch.get_num_threads()))
        return model

    engine = Engine(settings)
    switcher = ModelSwitcher(settings, "policy", "policy", load, on_switch=engine.set_model)
    try:
        loaded = switcher.start(follow=False)
        req, events = request(loaded, "Hi", max_new_tokens=3)
        engine.submit(req)
        collect(req, events)
    finally:
        switcher.stop()
        engine.stop()
    assert loads == [(False, 1)]  # not on the caller's thread, one intra-op thread
    assert torch.get_num_threads() == caller
    assert steps and set(steps) == {openmp.default_threads()}
