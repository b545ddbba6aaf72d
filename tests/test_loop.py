"""finetune.loop: mixed precision resolved for the hardware at hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune import loop
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
