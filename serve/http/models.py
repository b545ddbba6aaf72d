"""The served models: a bundle's runtime predictor behind the server's admission control.

Classifiers run through a micro-batcher (serve.batching) that the server owns, so it can count the batch sizes:
the event loop validates a request, queues its rows and awaits the batch's future; tokenization and the model run
happen on the batcher's worker threads. Generation runs on a thread per active stream (at most
`max_concurrent_generations` per model), feeding tokens to the event loop; a stream whose client went away stops
at its next token. Both refuse new work with 503 (Retry-After) when `max_queue` requests already wait.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serve import runtime
from serve.batching import BatchingConfig, MicroBatcher
from serve.bundle.errors import TuneforgeError
from serve.bundle.manifest import read_manifest
from serve.bundle.tasks import PREDICT_TASKS, Task
from serve.generation import Detokenizer, Prompt, TextGenerator
from serve.http.config import Limits, ModelSpec, ServerConfig
from serve.http.errors import APIError, bad_request, overloaded
from serve.http.metrics import Metrics
from serve.predictors import ImageClassifier, Prediction, TextClassifier, to_predictions

logger = logging.getLogger(__name__)



class ServedModel:
    """A bundle loaded for serving: its name, task, labels and predictor."""

    def __init__(self, spec: ModelSpec, predictor: Any, manifest: Any, limits: Limits, metrics: Metrics):
        self.spec, self.name, self.predictor, self.limits, self.metrics = spec, spec.name, predictor, limits, metrics
        self.task: str = manifest.task
        self.variant: str = spec.variant or manifest.default_variant
        self.labels: list[str] = list(manifest.data.get("labels") or [])
        self.created = int(time.time())
        self.waiting = 0  # admitted, not finished (classifiers) / not yet decoding (generation); event-loop only

    @property
    def is_generator(self) -> bool:
        return self.task == Task.CAUSAL_LM

    def admit(self) -> None:
        """Count one more waiting request, or refuse it (503) when `max_queue` already wait."""
        if self.waiting >= self.limits.max_queue:
            self.metrics.rejected.labels(model=self.name).inc()
            raise overloaded(self.name, self.limits.retry_after_s)
        self.waiting += 1
        self.metrics.queue_depth.labels(model=self.name).set(self.waiting)

    def leave(self) -> None:
        self.waiting -= 1
        self.metrics.queue_depth.labels(model=self.name).set(self.waiting)

    def warm_up(self) -> None:
        """One call, so the first client does not pay ONNX Runtime's first-run cost."""

    def close(self) -> None:
        """Stop worker threads."""


class Classifier(ServedModel):
    """Text or image classification (or text regression) through the server's micro-batcher."""

    def __init__(self, spec: ModelSpec, predictor: TextClassifier | ImageClassifier, manifest: Any, limits: Limits,
                 metrics: Metrics, batching: BatchingConfig):
        super().__init__(spec, predictor, manifest, limits, metrics)
        self.is_image = isinstance(predictor, ImageClassifier)
        self.pair_column: str | None = None if self.is_image else predictor.pair_column
        # The runtime's own batcher is left off (batching=None at load): this one records each batch's size.
        run = predictor._run_pixels if self.is_image else predictor._run_items
        batch_sizes = metrics.batch_size.labels(model=self.name)

        def observed(items: list[Any]) -> Any:
            batch_sizes.observe(len(items))
            return run(items)

        self.run_batch = observed  # one model run over a batch of rows (the batch size counted)
        self.batcher: MicroBatcher[Any, Any] = MicroBatcher(observed, batching, name=f"{self.name} batcher")
        # Another batcher in its place (serve.ray's @serve.batch option): rows -> awaitable results, or None.
        self.batch_fn: Callable[[list[Any]], Awaitable[list[Any]]] | None = None

    def check_count(self, count: int, what: str) -> None:
        if count == 0:
            raise bad_request(f"{what} is empty; send at least one input", param=what)
        if count > self.limits.max_inputs:
            raise bad_request(f"{what} has {count} inputs; this server takes at most {self.limits.max_inputs} per "
                              "request: split it", param=what)

    async def classify_texts(self, texts: Sequence[Any], pairs: Sequence[Any] | None = None) -> list[Prediction]:
        """Predictions for texts (and their pairs, for pair models), micro-batched with concurrent requests."""
        if self.is_image:
            raise bad_request(f"model {self.name!r} classifies images; send images, not texts", param="inputs")
        self.check_count(len(texts), "inputs")
        for i, text in enumerate([*texts, *(pairs or [])]):
            if isinstance(text, str) and len(text) > self.limits.max_text_chars:
                raise bad_request(f"input {i} has {len(text):,} characters; this server takes at most "
                                  f"{self.limits.max_text_chars:,} per text", param="inputs")
        try:
            rows = self.predictor._rows(texts, pairs)  # the runtime's checks: str items, one pair per text
        except TuneforgeError as err:
            raise bad_request(str(err), param="inputs") from None
        results = await self._batched(rows)
        logits = np.stack([r[0] for r in results])
        return to_predictions(logits, self.predictor.labels, regression=self.task == Task.TEXT_REGRESSION,
                              truncated=[r[1] for r in results])

    async def classify_images(self, images: list[bytes] | np.ndarray) -> list[Prediction]:
        """Predictions for encoded image files (bytes) or a uint8 batch [N, H, W(, C)]."""
        if not self.is_image:
            raise bad_request(f"model {self.name!r} classifies text; send texts, not images", param="inputs")
        self.check_count(len(images), "inputs")
        if not isinstance(images, np.ndarray):
            for i, data in enumerate(images):
                self._check_image_header(i, data)
        try:
            pixels = await asyncio.to_thread(self.predictor.preprocess, images)  # decoding is CPU work
        except TuneforgeError as err:
            raise bad_request(str(err), param="inputs") from None
        results = await self._batched(list(pixels))
        return to_predictions(np.stack(results), self.predictor.labels)

    def _check_image_header(self, index: int, data: bytes) -> None:
        """Refuse an undecodable file or one over max_image_pixels from its header, before decoding it."""
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as header:
                width, height = header.size
        except Exception:  # Pillow raises several types for files it cannot identify
            raise bad_request(f"image {index} ({len(data)} bytes) is not an image file Pillow can read; send PNG, "
                              "JPEG, BMP, GIF, WebP or TIFF bytes", param="inputs") from None
        if width * height > self.limits.max_image_pixels:
            raise bad_request(f"image {index} is {width}x{height} pixels; this server takes at most "
                              f"{self.limits.max_image_pixels:,} pixels per image", param="inputs")

    async def _batched(self, items: list[Any]) -> list[Any]:
        self.admit()
        try:
            if self.batch_fn is not None:
                results = await self.batch_fn(items)
            else:
                results = await asyncio.wrap_future(self.batcher.submit(items))
        except TuneforgeError as err:  # raised while tokenizing / running this request's rows
            raise bad_request(str(err), param="inputs") from None
        finally:
            self.leave()
        self.metrics.inputs.labels(model=self.name).inc(len(items))
        return results

    async def explain(self, input: Any, **settings: Any) -> dict[str, Any]:
        """Why the model decides what it does on one input (serve.explain: the model's own graph scores masked copies
        in batched runs, on a worker thread), as JSON; admitted like a classify request."""
        from serve.explain import explain

        if self.is_image:
            self._check_image_header(0, input)
        elif not isinstance(input, str) or len(input) > self.limits.max_text_chars:
            raise bad_request(f"'input' must be one text of at most {self.limits.max_text_chars:,} characters",
                              param="input")
        self.admit()
        try:
            why = await asyncio.to_thread(explain, self.predictor, input, **settings)
        except TuneforgeError as err:
            raise bad_request(str(err), param="input") from None
        finally:
            self.leave()
        return why.to_dict()

    def warm_up(self) -> None:
        if self.is_image:
            size = self.predictor.spec.size
            self.predictor._run_pixels(list(self.predictor.preprocess(np.zeros((1, *size, 3), np.uint8))))
        else:
            self.predictor._run_items(self.predictor._rows(["warm up"], ["warm up"] if self.pair_column else None))

    def close(self) -> None:
        self.batcher.close()


@dataclass
class GenerationJob:
    """One validated generation request; `finish_reason` and `completion_tokens` are set as it runs."""

    prompt: Prompt
    prompt_tokens: int
    settings: dict[str, Any]
    stop: list[str]
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length"
    completion_tokens: int = 0
    created: int = field(default_factory=lambda: int(time.time()))


class Generator(ServedModel):
    """A causal LM: validated jobs decoded on a bounded pool of threads, streamed to the event loop."""

    def __init__(self, spec: ModelSpec, predictor: TextGenerator, manifest: Any, limits: Limits, metrics: Metrics):
        super().__init__(spec, predictor, manifest, limits, metrics)
        self.generator = predictor
        self.executor = ThreadPoolExecutor(limits.max_concurrent_generations, thread_name_prefix=f"{self.name} gen")
        self._slots: asyncio.Semaphore | None = None  # made on the event loop at first use
        eos = predictor.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    @property
    def slots(self) -> asyncio.Semaphore:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limits.max_concurrent_generations)
        return self._slots

    def prepare(self, prompt: Prompt, *, max_tokens: int | None, temperature: float | None = None,
                top_p: float | None = None, seed: int | None = None, stop: str | list[str] | None = None,
                top_k: int | None = None, repetition_penalty: float | None = None,
                prompt_param: str = "prompt") -> GenerationJob:
        """Check a request against the model and the limits (APIError 400 naming the problem); nothing runs yet."""
        gen, limits = self.generator, self.limits
        if isinstance(prompt, str) and len(prompt) > limits.max_text_chars:
            raise bad_request(f"the prompt has {len(prompt):,} characters; this server takes at most "
                              f"{limits.max_text_chars:,}", param=prompt_param)
        try:
            ids = gen.prompt_ids(prompt)
        except TuneforgeError as err:
            raise bad_request(str(err), param=prompt_param) from None
        if limits.max_prompt_tokens and len(ids) > limits.max_prompt_tokens:
            raise bad_request(f"the prompt has {len(ids)} tokens; this server takes at most "
                              f"{limits.max_prompt_tokens}: shorten it", param=prompt_param,
                              code="context_length_exceeded")
        positions = gen.max_positions
        if positions and len(ids) >= positions:
            raise bad_request(f"the prompt has {len(ids)} tokens, but the model has only {positions} positions for "
                              "prompt and completion together: shorten it", param=prompt_param,
                              code="context_length_exceeded")
        if max_tokens is None:  # the bundle's default, within the cap and the positions left
            max_tokens = min(gen.defaults.max_new_tokens, limits.max_tokens_cap,
                             positions - len(ids) if positions else limits.max_tokens_cap)
        elif max_tokens < 1:
            raise bad_request(f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
        elif max_tokens > limits.max_tokens_cap:
            raise bad_request(f"max_tokens={max_tokens} is over this server's cap of {limits.max_tokens_cap}; ask "
                              "for fewer", param="max_tokens")
        elif positions and len(ids) + max_tokens > positions:
            raise bad_request(f"the prompt has {len(ids)} tokens and max_tokens={max_tokens}: together over the "
                              f"model's {positions} positions; ask for at most {positions - len(ids)} tokens or "
                              "shorten the prompt", param="max_tokens", code="context_length_exceeded")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
            raise bad_request("stop takes a non-empty string or a list of up to 4 of them", param="stop")
        overrides: dict[str, Any] = {"max_new_tokens": max_tokens, "top_p": top_p, "seed": seed, "top_k": top_k,
                                     "repetition_penalty": repetition_penalty}
        if temperature is not None:
            overrides.update(temperature=temperature, do_sample=temperature > 0)
        try:
            gen.settings(**overrides)  # validates ranges (temperature >= 0, 0 < top_p <= 1, ...)
        except TuneforgeError as err:
            raise bad_request(str(err)) from None
        # The runtime keeps the prompt's last `max_length` tokens (the training block) when it is longer: count those.
        limit = gen.max_length or len(ids)
        if positions:
            limit = min(limit, positions - max_tokens)
        return GenerationJob(prompt=prompt, prompt_tokens=min(len(ids), limit),
                             settings={k: v for k, v in overrides.items() if v is not None}, stop=stops)

    async def run(self, job: GenerationJob) -> AsyncIterator[str]:
        """Stream the text of `job` (call `admit()` first, before the response starts). Stop strings are cut off,
        as OpenAI does; text that may begin one is held back until it is clear."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = threading.Event()
        started = time.perf_counter()
        try:
            await self.slots.acquire()
        finally:
            self.leave()
        self.metrics.running.labels(model=self.name).inc()
        self.metrics.prompt_tokens.labels(model=self.name).inc(job.prompt_tokens)

        def produce() -> None:
            try:
                for token in self.generator.tokens(job.prompt, **job.settings):
                    if cancel.is_set():
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, ("token", token))
                loop.call_soon_threadsafe(queue.put_nowait, ("end", None))
            except Exception as err:  # handed to the event loop, which answers the client
                loop.call_soon_threadsafe(queue.put_nowait, ("error", err))
            finally:
                loop.call_soon_threadsafe(self._release)

        loop.run_in_executor(self.executor, produce)
        text, held = Detokenizer(self.generator.tokenizer), ""
        generated = self.metrics.generated_tokens.labels(model=self.name)
        done = False
        try:
            while not done:
                # Every event waiting now goes out as one piece: under load, fewer and larger chunks.
                events = [await queue.get()]
                while not queue.empty():
                    events.append(queue.get_nowait())
                out = ""
                for kind, value in events:
                    if kind == "error":
                        raise value
                    if kind == "end":
                        held += text.flush()
                        job.finish_reason = job.finish_reason or "length"
                        emit, held, _ = split_stop(held, job.stop, final=True)
                        out, done = out + emit, True
                        break
                    job.completion_tokens += 1
                    generated.inc()
                    if job.completion_tokens == 1:
                        self.metrics.first_token.labels(model=self.name).observe(time.perf_counter() - started)
                    if value in self.eos_ids:
                        job.finish_reason = "stop"
                    held += text.push(value)
                    emit, held, stopped = split_stop(held, job.stop)
                    out += emit
                    if stopped:
                        job.finish_reason, held, done = "stop", "", True
                        break
                if out:
                    yield out
        except (asyncio.CancelledError, GeneratorExit):  # the client went away (or its request was cancelled)
            self.metrics.cancelled.labels(model=self.name).inc()
            logger.info("%s: a generation was stopped after %d tokens (client gone)", self.name, job.completion_tokens)
            raise
        finally:
            cancel.set()  # the thread stops at its next token (client gone, a stop string, or an error)

    def _release(self) -> None:
        self.slots.release()
        self.metrics.running.labels(model=self.name).dec()

    def warm_up(self) -> None:
        for _ in self.generator.tokens("Hello", max_new_tokens=1):
            pass

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def split_stop(held: str, stops: list[str], *, final: bool = False) -> tuple[str, str, bool]:
    """(text to emit now, text to hold back, whether a stop string was met) for the not-yet-emitted text `held`."""
    if not stops:
        return held, "", False
    found = [i for i in (held.find(s) for s in stops) if i >= 0]
    if found:
        return held[:min(found)], "", True
    if final:
        return held, "", False
    keep = max((n for s in stops for n in range(1, len(s)) if held.endswith(s[:n])), default=0)
    return held[:len(held) - keep], held[len(held) - keep:], False


def load_models(config: ServerConfig, metrics: Metrics) -> dict[str, ServedModel]:
    """Every bundle of `config`, loaded (and warmed up) for serving, by name."""
    batching = BatchingConfig(config.max_batch_size, config.max_wait_ms, config.batch_workers or os.cpu_count() or 1)
    models: dict[str, ServedModel] = {}
    for spec in config.models:
        manifest = read_manifest(spec.path, verify=False)
        predictor = runtime.load(spec.path, spec.variant, threads=config.threads)
        if manifest.task == Task.CAUSAL_LM:
            model: ServedModel = Generator(spec, predictor, manifest, config.limits, metrics)
        elif manifest.task in PREDICT_TASKS:
            model = Classifier(spec, predictor, manifest, config.limits, metrics, batching)
        else:
            raise APIError(500, f"bundle {spec.path} has task {manifest.task!r}, which this server does not serve")
        if config.warm_up:
            model.warm_up()
        logger.info("serving %s (%s, variant %s) as %r", spec.path, model.task, model.variant, model.name)
        models[spec.name] = model
    return models
