"""finetune.loop: mixed precision resolved for the hardware at hand; the cadence and the timer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune import loop
from finetune.checkpoint import CheckpointConfig, TrainState
from finetune.errors import ConfigError

CPUINFO = Path("/proc/cpuinfo")


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "no")])
def test_auto_precision_uses_bf16_only_where_the_hardware_has_it(monkeypatch, native, expected):
    monkeypatch.setattr(loop, "native_bf16", lambda: native)
    assert loop.resolve_mixed_precision("auto") == expected


@pytest.mark.parametrize("requested", ["no", "bf16"])
def test_explicit_precision_is_kept(requested):
    assert loop.resolve_mixed_precision(requested) == requested


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is allowed on a GPU")
def test_fp16_without_a_gpu_names_the_fix():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU; use bf16, auto or no"):
        loop.resolve_mixed_precision("fp16")


@pytest.mark.skipif(torch.cuda.is_available() or not CPUINFO.exists(), reason="compares with Linux CPU flags")
def test_native_bf16_matches_the_cpu_flags():
    flags = CPUINFO.read_text().split()
    assert loop.native_bf16() == ("avx512_bf16" in flags or "amx_tile" in flags)


def test_cadence_counts_steps_per_epoch_and_in_all():
    train = loop.TrainConfig(epochs=3, gradient_accumulation_steps=2)
    cadence = loop.Cadence(train, CheckpointConfig(), num_batches=7)
    assert (cadence.epoch_steps, cadence.total_steps) == (4, 12)  # 7 batches: 3 full accumulations and a short one
    train.max_steps, train.max_steps_per_epoch = 5, 3
    capped = loop.Cadence(train, CheckpointConfig(), num_batches=7)
    assert (capped.epoch_steps, capped.total_steps) == (3, 5)


def test_cadence_evaluates_and_saves_at_epoch_ends_the_last_step_and_every_n():
    train = loop.TrainConfig(epochs=2, eval_every_n_steps=3, log_every_n_steps=2)
    cadence = loop.Cadence(train, CheckpointConfig(every_n_steps=4, at_epoch_end=False), num_batches=5)
    seen = {"log": [], "eval": [], "save": []}
    for step in range(1, 11):
        state = TrainState(global_step=step, epoch=step // 5)
        epoch_end = step % 5 == 0
        for name, due in (("log", cadence.time_to_log(state)), ("eval", cadence.time_to_evaluate(state, epoch_end)),
                          ("save", cadence.time_to_checkpoint(state, epoch_end))):
            if due:
                seen[name].append(step)
    assert seen == {"log": [2, 4, 6, 8, 10], "eval": [3, 5, 6, 9, 10], "save": [4, 8, 10]}
    assert cadence.finished(TrainState(global_step=10)) and not cadence.finished(TrainState(global_step=9))


class _Accelerator:
    num_processes = 2


def test_timer_counts_samples_of_all_processes_and_pauses(monkeypatch):
    now = iter([0.0, 2.0, 10.0, 13.0, 20.0])  # perf_counter at: start, pause, next request, pause, next request (s)
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(now))
    state = TrainState(samples_seen=100)
    timer = loop.TrainTimer(_Accelerator(), state)
    for _ in timer.timed([{"labels": [0, 1, 2]}, {"labels": [0]}]):
        timer.pause()  # evaluation and checkpoints between the two batches are not timed
    assert (timer.seconds, timer.samples, state.samples_seen) == (5.0, 8, 108)
    assert timer.samples_per_second() == 1.6
