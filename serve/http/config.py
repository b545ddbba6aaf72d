"""What the HTTP server serves and under which limits: one typed record, filled by the CLI (serve.http.cli), by Ray
(serve.ray) or by a test. Standard library only, so it pickles to Ray replicas and travels as JSON to uvicorn workers.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from serve.errors import ServeError

API_KEY_ENV = "TUNEFORGE_API_KEY"


@dataclass(frozen=True)
class ModelSpec:
    """One served bundle: the name clients use (default: the bundle folder's name) and the variant to run."""

    name: str
    path: str
    variant: str | None = None  # None: the manifest's default_variant


@dataclass(frozen=True)
class Limits:
    """Bounds that keep one client from taking the server down; each refusal is a 4xx (or 503) naming the limit."""

    max_body_bytes: int = 8 * 2**20  # request body; larger -> 413
    max_inputs: int = 64  # texts or images per classify / infer request
    max_text_chars: int = 20_000  # one text (or prompt) in characters, checked before tokenizing
    max_image_pixels: int = 25_000_000  # width x height of one decoded image (a decompression-bomb guard)
    max_prompt_tokens: int | None = None  # None: the model's positions are the only bound
    max_tokens_cap: int = 512  # largest max_tokens a generation request may ask for
    max_concurrent_generations: int = 2  # generations decoding at once per model (threads)
    max_queue: int = 64  # requests waiting per model beyond those running; more -> 503 with Retry-After
    retry_after_s: int = 1  # the Retry-After header of a 503

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is not None and value < 1:
                raise ServeError(f"server limit {name} must be >= 1, got {value}")


@dataclass(frozen=True)
class ServerConfig:
    """The server: its models, limits, API key and how predictors run.

    threads: ONNX Runtime intra-op threads per model run (None: one per physical core).
    batch_workers / max_batch_size / max_wait_ms: the classifiers' micro-batcher (serve.batching.BatchingConfig);
    batch_workers None: one per core. The defaults (1 thread per run, one worker per core, batches of 1 request)
    measured best on CPUs (bench/http_serving.py, docs/serving.md): a transformer's cost per sentence does not drop
    with the batch size there, and a batch of mixed lengths pays for padding to its longest text. Raise
    max_batch_size on GPUs, or for inputs of similar lengths.
    api_key: Bearer token every route but health needs (None: open; the CLI also reads TUNEFORGE_API_KEY).
    demo: mount the Gradio demo on the same bundles at /demo.
    """

    models: tuple[ModelSpec, ...]
    limits: Limits = field(default_factory=Limits)
    api_key: str | None = None
    threads: int | None = 1
    batch_workers: int | None = None
    max_batch_size: int = 1
    max_wait_ms: float = 0.0
    demo: bool = False
    warm_up: bool = True  # run each model once at start-up, so the first request is not the slow one

    def __post_init__(self) -> None:
        if not self.models:
            raise ServeError("nothing to serve; pass one or more bundle folders (python -m compress export)")
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ServeError(f"two bundles are served under the name(s) {duplicates}; rename one with "
                             "--name NAME=BUNDLE")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServerConfig:
        data: dict[str, Any] = json.loads(text)
        data["models"] = tuple(ModelSpec(**m) for m in data["models"])
        data["limits"] = Limits(**data["limits"])
        return cls(**data)


def model_specs(bundles: list[str], names: list[str] | None = None,
                variant: str | None = None) -> tuple[ModelSpec, ...]:
    """Specs for bundle paths (named after their folders) and `NAME=BUNDLE` overrides (`--name`)."""
    specs = {Path(p).resolve(): ModelSpec(name=Path(p).resolve().name, path=os.fspath(p), variant=variant)
             for p in bundles}
    for item in names or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ServeError(f"--name takes NAME=BUNDLE, got {item!r}")
        if "/" in name or name.startswith("."):
            raise ServeError(f"model name {name!r} is used in URLs (/v2/models/NAME); use letters, digits, - _ .")
        specs[Path(path).resolve()] = ModelSpec(name=name, path=path, variant=variant)  # renames a listed bundle
    return tuple(specs.values())
