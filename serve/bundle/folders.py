"""Every deletion or replacement of a file or folder the project makes goes through this module, guarded.

A user's folder is never deleted by mistake: a folder is replaced only when its owner's marks say beyond doubt that
tuneforge wrote it (a run directory's marker file, a bundle's manifest) and it holds nothing that tuneforge never
writes there; temp folders are removed only by their temp names. `tests/test_safety.py` fails on any `rmtree`,
`replace` or `rename` outside this module. Standard library only.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from serve.bundle.errors import TuneforgeError

RUN_MARKER = ".tuneforge-run.json"
# Everything a recipe (or a compress stage writing a run) puts at the top of a run directory.
RUN_ENTRIES = frozenset({RUN_MARKER, "config.yaml", "model", "metrics.json", "checkpoints", "logs", "curves.png",
                         "confusion_matrix.png", "misclassified.png", "samples.md"})
TEMP_PREFIXES = (".tmp-", ".old-")  # the names this project gives its own temp files and folders
EVERYTHING = frozenset({"*"})  # `owned` result: the folder's contents are all ours (e.g. model/ inside a run)


@dataclass(frozen=True)
class FolderGuard:
    """What may be replaced at a path, and how to say no: `owned(path)` lists the entries its owner writes there
    (EVERYTHING: all of them; None: the folder is not of this kind)."""

    kind: str  # e.g. "tuneforge run directory"
    owned: Callable[[Path], Collection[str] | None]
    setting: str  # what asked for the replacement, e.g. train.overwrite
    key: str  # where the user picks another path, e.g. train.output_dir
    error: type[TuneforgeError] = TuneforgeError
    mark: str = ""  # how the kind is recognised, said when a folder lacks it

    def check(self, path: Path) -> None:
        """Raise `error` unless the folder at `path` is absent or empty, or may be replaced."""
        if path.exists() and not path.is_dir():
            raise self.error(f"{path} is a file, not a folder; choose another {self.key}")
        if not path.exists() or not any(path.iterdir()):
            return
        owned = self.owned(path)
        if owned is None:
            raise self.error(f"refusing to replace {path}: it is not a {self.kind}{self.mark}, and {self.setting} "
                             f"only replaces one; choose a new {self.key}")
        if owned is not EVERYTHING:
            foreign = sorted(e.name for e in path.iterdir() if e.name not in owned and not is_temp_name(e.name))
            if foreign:
                shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
                raise self.error(f"refusing to replace {path}: it holds {shown}, which a {self.kind} never holds; "
                                 f"move them out, or choose another {self.key}")
        if Path.cwd().resolve().is_relative_to(path.resolve()):
            raise self.error(f"refusing to replace {path}: the current folder is inside it; choose another {self.key}")


def is_temp_name(name: str) -> bool:
    return name.startswith(TEMP_PREFIXES)


def write_run_marker(run_dir: Path) -> str:
    """Mark `run_dir` as a tuneforge run directory (the mark `overwrite` asks for); returns the run's id."""
    run_id = uuid.uuid4().hex
    marker = {"format": "tuneforge-run", "id": run_id, "created": datetime.now(timezone.utc).isoformat()}
    tmp = run_dir / f".tmp-{RUN_MARKER}"
    tmp.write_text(json.dumps(marker) + "\n")
    replace_file(tmp, run_dir / RUN_MARKER)
    return run_id


def read_run_marker(path: Path) -> dict[str, str] | None:
    """The marker of a run directory, or None when `path` has no valid one."""
    try:
        marker = json.loads((path / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == "tuneforge-run" else None


def run_entries(path: Path) -> Collection[str] | None:
    """`owned` of a run directory: its entries when it carries the marker, else None."""
    return RUN_ENTRIES if read_run_marker(path) is not None else None


def run_dir_guard(*, setting: str, key: str, error: type[TuneforgeError]) -> FolderGuard:
    return FolderGuard("tuneforge run directory", run_entries, setting, key, error, f" (no {RUN_MARKER})")


def _inside_run_or_temp(path: Path) -> Collection[str] | None:
    """model/ or checkpoints/step_N of a run directory, or anything inside one of our temp folders."""
    parents = [path.parent, path.parent.parent]
    if any(read_run_marker(p) is not None for p in parents) or any(is_temp_name(p.name) for p in path.parents):
        return EVERYTHING
    return None


RUN_PART = FolderGuard("part of a tuneforge run directory", _inside_run_or_temp, "saving", "train.output_dir",
                       mark=f" (its run directory has no {RUN_MARKER})")


def clear_folder(path: Path, guard: FolderGuard) -> None:
    """Delete the folder `path` to write a new one there, after `guard` allows it."""
    guard.check(path)
    if path.exists():
        shutil.rmtree(path)


def remove_temp(path: Path) -> None:
    """Delete one of our temp files or folders (named .tmp-* / .old-*); anything else is a bug, refused."""
    if not is_temp_name(path.name):
        raise ValueError(f"remove_temp only deletes temp names ({', '.join(TEMP_PREFIXES)}...), got {path}")
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def temp_path(dest: Path, tag: str = "") -> Path:
    """A fresh temp name next to `dest` (same file system, so it can be renamed into place)."""
    return dest.with_name(f".tmp-{dest.name}-{tag}{uuid.uuid4().hex[:8]}")


def replace_file(tmp: Path, dest: Path) -> None:
    """Atomically move the finished temp file `tmp` onto `dest` (never onto a folder)."""
    if not is_temp_name(tmp.name):
        raise ValueError(f"replace_file moves temp files only, got {tmp}")
    if dest.is_dir():
        raise IsADirectoryError(f"{dest} is a folder; refusing to replace it with a file")
    os.replace(tmp, dest)


def replace_folder(new: Path, dest: Path, guard: FolderGuard) -> None:
    """Move the finished temp folder `new` to `dest`, replacing what is there when `guard` allows it: the old one is
    renamed aside first and deleted last, so a crash in between leaves one of them in place or beside it."""
    if not any(is_temp_name(p.name) for p in (new, *new.parents)):
        raise ValueError(f"replace_folder moves folders made in a temp folder only, got {new}")
    guard.check(dest)
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
    remove_temp(old)


def relative_path(path: Path, base: Path) -> str:
    """`path` relative to the folder `base` (POSIX form): what artifacts record instead of the builder's absolute
    paths, so a bundle or run can move with its neighbours and tells nothing of the machine that built it."""
    return Path(os.path.relpath(Path(path).resolve(), Path(base).resolve())).as_posix()


def move_into_place(src: Path, dest: Path) -> None:
    """Rename `src` to `dest`, which must not exist (POSIX rename would silently replace an empty folder or a
    file there)."""
    if dest.exists():
        raise FileExistsError(f"{dest} exists; refusing to replace it")
    src.rename(dest)
