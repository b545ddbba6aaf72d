"""The run directory: resolved config, model/, metrics.json, checkpoints/, logs/, plots."""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

from finetune.errors import ConfigError, TuneforgeError

logger = logging.getLogger(__name__)

MODEL_DIR = "model"
TASK_FILE = "tuneforge.json"  # task metadata that compress/ and serve/ read next to the weights


def prepare_run_dir(accelerator: Any, path: str | Path, *, resume: bool, overwrite: bool) -> Path:
    """Create the run directory; refuse to mix a new run into an old one unless resuming or overwriting.

    Every process checks before any changes (so all fail alike), then only the main process deletes or creates.
    """
    run_dir = Path(path)
    occupied = run_dir.exists() and any(run_dir.iterdir())
    if occupied and not resume:
        if not overwrite:
            raise ConfigError(f"run directory {run_dir} already holds a run; set checkpoint.resume_from=latest to "
                              "continue it, train.overwrite=true to replace it, or another train.output_dir")
        check_replaceable(run_dir, is_run_dir(run_dir), kind="run directory (no config.yaml and logs/)",
                          setting="train.overwrite", key="train.output_dir", error=ConfigError)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if occupied and not resume:
            shutil.rmtree(run_dir)
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return run_dir


def check_replaceable(path: Path, of_its_kind: bool, *, kind: str, setting: str, key: str,
                      error: type[TuneforgeError]) -> None:
    """Raise `error` unless the occupied folder `path` may be deleted to write a new one there: it must be what
    `setting` replaces (`of_its_kind`), and must not hold the folder we run in."""
    if not of_its_kind:
        raise error(f"refusing to replace {path}: it is not a {kind}, and {setting} only replaces one; choose a new "
                    f"{key}")
    if Path.cwd().resolve().is_relative_to(path.resolve()):
        raise error(f"refusing to replace {path}: the current folder is inside it; choose another {key}")


def is_run_dir(path: str | Path) -> bool:
    """Whether `path` looks like a run directory a recipe wrote (its config.yaml and logs/)."""
    return (Path(path) / "config.yaml").is_file() and (Path(path) / "logs").is_dir()


def replace_folder(new: Path, dest: Path) -> None:
    """Move the finished folder `new` to `dest`, replacing what is there: the old one is renamed aside first and
    deleted last, so a crash in between leaves one of them in place or beside it, never neither."""
    if not dest.exists():
        new.rename(dest)
        return
    old = dest.with_name(f".old-{dest.name}-{uuid.uuid4().hex[:8]}")
    dest.rename(old)
    try:
        new.rename(dest)
    except BaseException:
        old.rename(dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename): readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    tmp.replace(path)


def save_model_dir(accelerator: Any, model: Any, processor: Any, path: str | Path, task: dict[str, Any]) -> None:
    """save_pretrained (safetensors) + tokenizer/processor + task metadata, atomically; every process calls it.

    The state dict is gathered through the accelerator, so this works under DDP, FSDP and DeepSpeed. A LoRA model
    is saved with its adapters merged: a plain model that loads without peft.
    """
    from finetune.lora import is_peft_model, merged_adapters

    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")

    def write(plain_model: Any, state_dict: dict[str, Any]) -> None:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            plain_model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            if processor is not None:
                processor.save_pretrained(tmp)
            write_json(tmp / TASK_FILE, task)
            replace_folder(tmp, path)

    unwrapped = accelerator.unwrap_model(model)
    if is_peft_model(unwrapped):  # every process merges and unmerges, so the replicas stay identical
        with merged_adapters(unwrapped) as (base, state_dict):
            write(base, state_dict)
    else:
        write(unwrapped, accelerator.get_state_dict(model))
    accelerator.wait_for_everyone()
