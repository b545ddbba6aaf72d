"""The run directory: resolved config, model/, metrics.json, checkpoints/, logs/, plots."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from finetune.errors import ConfigError
from serve.bundle.folders import (
    RUN_PART,
    clear_folder,
    read_run_marker,
    remove_temp,
    replace_file,
    replace_folder,
    run_dir_guard,
    temp_path,
    write_run_marker,
)
from serve.bundle.records import RunRecord, write_run_record

logger = logging.getLogger(__name__)

MODEL_DIR = "model"
RUN_DIR_GUARD = run_dir_guard(setting="train.overwrite", key="train.output_dir", error=ConfigError)


def check_run_dir(path: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse, before anything is written, an output_dir that a new run may not take: a file, or a folder holding a
    run (or anything else) when not resuming, unless `overwrite` may replace it (see serve.bundle.folders)."""
    run_dir = Path(path)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"train.output_dir {run_dir} is a file, not a folder; choose another train.output_dir")
    if resume or not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if is_failed_start(run_dir):  # replaced without train.overwrite, but only if it holds nothing else
        RUN_DIR_GUARD.check(run_dir)
        return
    if not overwrite:
        raise ConfigError(f"run directory {run_dir} already holds a run; set checkpoint.resume_from=latest to "
                          "continue it, train.overwrite=true to replace it, or another train.output_dir")
    RUN_DIR_GUARD.check(run_dir)


def open_run_dir(accelerator: Any, path: str | Path, *, resume: bool, overwrite: bool) -> Path:
    """Create the run directory (marked as tuneforge's), replacing an old run when `overwrite` allows it (or a failed
    start, which has no checkpoint and no model). Call after the data and model loaded, so that a bad input leaves
    nothing behind. Every process checks again first (so all fail alike); only the main process writes."""
    run_dir = Path(path)
    check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        occupied = run_dir.exists() and any(run_dir.iterdir())
        if occupied and not resume:
            if is_failed_start(run_dir):
                logger.info("replacing %s: a run that stopped before its first checkpoint or model", run_dir)
            clear_folder(run_dir, RUN_DIR_GUARD)
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        if read_run_marker(run_dir) is None:
            write_run_marker(run_dir)
    accelerator.wait_for_everyone()
    return run_dir


def is_failed_start(path: Path) -> bool:
    """A run directory that tuneforge marked but that got no checkpoint and no model: a start that failed (or was
    killed); a rerun may replace it without train.overwrite."""
    if read_run_marker(path) is None or (path / MODEL_DIR).exists():
        return False
    checkpoints = path / "checkpoints"
    return not (checkpoints.is_dir() and any(checkpoints.iterdir()))


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename): readers never see half a file."""
    path = Path(path)
    tmp = temp_path(path)
    tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    replace_file(tmp, path)


def save_model_dir(accelerator: Any, model: Any, processor: Any, path: str | Path, record: RunRecord) -> None:
    """save_pretrained (safetensors) + tokenizer/processor + the run record (tuneforge.json), atomically; every
    process calls it.

    The state dict is gathered through the accelerator, so this works under DDP, FSDP and DeepSpeed. A LoRA model
    is saved with its adapters merged: a plain model that loads without peft.
    """
    from finetune.lm.lora import is_peft_model, merged_adapters

    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")

    def write(plain_model: Any, state_dict: dict[str, Any]) -> None:
        if accelerator.is_main_process:
            remove_temp(tmp)
            plain_model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            if processor is not None:
                processor.save_pretrained(tmp)
            write_run_record(tmp, record)
            replace_folder(tmp, path, RUN_PART)

    unwrapped = accelerator.unwrap_model(model)
    if is_peft_model(unwrapped):  # every process merges and unmerges, so the replicas stay identical
        with merged_adapters(unwrapped) as (base, state_dict):
            write(base, state_dict)
    else:
        write(unwrapped, accelerator.get_state_dict(model))
    accelerator.wait_for_everyone()
