"""The Gradio demo: a tab per task over bundles (each ONNX variant) and run directories (PyTorch), side by side.

    python -m serve bundles/reviews [more bundles or run dirs] [--port 7860] [--share] [--auth-file login.txt]
    TUNEFORGE_DEMO_AUTH=user:pass tuneforge-demo bundles/reviews  # the same, as the console script, with a login

Named endpoints for gradio_client (`Client(url).view_api()` lists their parameters):
    /classify_text (text, pair, variants)            /classify_image (image file, variants)
    /classify_sketch (sketchpad value, variants)     /generate (prompt, settings..., variants), streamed
    /explain_text (text, pair, explain, method, variants)   /explain_image, /explain_sketch (input, explain, method,
    variants): the first selected variant's explanation (serve.app_explain), hidden when explain is false
Each classify endpoint returns one output per variant (hidden when not selected) and a table of label, score and
latency per variant; in the page, an explanation follows a classification when the "explain" box is ticked.
Concurrent requests to a classifier are micro-batched by the runtime (serve.batching), not by gradio, so a bad
request fails alone. Predictors are shared by all users; no per-user state is kept.

What a visitor leaves on disk does not outlive the server: uploads (refused ones too) and the images it returns sit in
Gradio's cache, deleted after an hour and all at once when the server stops (gr.Blocks' delete_cache); the example
images live in a temp folder removed when the demo is garbage-collected or the process exits. `main` turns SIGTERM
into the same clean stop as Ctrl-C. Logins are checked by serve.login.LoginThrottle (slow, then locked, for guessers).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from serve.app_explain import Explainer
from serve.app_explain import controls as explain_controls
from serve.batching import BatchingConfig
from serve.bundle.errors import TuneforgeError, exit_on_user_error
from serve.bundle.tasks import Task
from serve.errors import ServeError
from serve.generation import Detokenizer
from serve.login import LoginThrottle, demo_auth, warn_if_exposed
from serve.predictors import MAX_IMAGE_PIXELS, check_threads
from serve.sources import DemoModel, Source, demo_models, image_examples, open_source, report_markdown, text_examples

if TYPE_CHECKING:
    import gradio

logger = logging.getLogger(__name__)

MAX_TEXT_CHARS = 20_000
# Gradio's cache (uploads, returned images): every 10 minutes delete files older than an hour; all on shutdown.
DELETE_CACHE = (600, 3600)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TAB_TITLES = {Task.TEXT_CLASSIFICATION: "Text classification", Task.TEXT_REGRESSION: "Text regression",
              Task.IMAGE_CLASSIFICATION: "Image classification", Task.CAUSAL_LM: "Text generation"}
TABLE_HEADERS = ["variant", "prediction", "score", "latency (ms)"]
TRADEOFF_PLOT = "tradeoff.png"  # written next to report.md by compress's report


def build_demo(sources: Sequence[Source | str | Path], *, threads: int | None = None,
               batching: BatchingConfig | None = None, concurrency_limit: int = 8, generation_concurrency: int = 2,
               max_upload_mb: float = 5.0, preload: bool = True, title: str = "tuneforge demo") -> gradio.Blocks:
    """A gr.Blocks with one tab per task among `sources` (bundles or run directories; paths are opened here).

    threads: intra-op threads per model run; batching: micro-batching of concurrent classifier requests (default
    BatchingConfig()); concurrency_limit: classifier requests run at once (generation: generation_concurrency);
    preload: load (and run once) every variant now rather than at its first request.
    """
    gr = _gradio()
    check_threads(threads)
    opened = [s if isinstance(s, Source) else open_source(s) for s in sources]
    if not opened:
        raise ServeError("nothing to serve; pass one or more bundles or run directories")
    models = demo_models(opened, threads=threads, batching=batching or BatchingConfig())
    if preload:
        for group in models.values():
            for model in group:
                model.warm_up()
    limits = {"classify": concurrency_limit, "generate": generation_concurrency, "upload_bytes": max_upload_mb * 1e6}
    workspace = tempfile.TemporaryDirectory(prefix="tuneforge-demo-")  # example images written for gr.Examples
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(f"# {title}\n" + "\n".join(f"- `{s.path}`: {s.kind}, {s.task}, variants: {', '.join(s.variants)}"
                                              for s in opened))
        with gr.Tabs():
            for task, group in models.items():
                with gr.Tab(TAB_TITLES.get(task, task)):
                    if task == Task.CAUSAL_LM:
                        _generation_tab(gr, group, limits)
                    elif task == Task.IMAGE_CLASSIFICATION:
                        _image_tab(gr, group, limits, Path(workspace.name))
                    else:
                        _text_tab(gr, group, limits)
                    with gr.Accordion("Report", open=False):
                        for source in dict.fromkeys(m.source for m in group):
                            gr.Markdown(report_markdown(source))
                            if (source.path / TRADEOFF_PLOT).is_file():
                                gr.Image(str(source.path / TRADEOFF_PLOT), label=f"{source.name}: size, speed and "
                                         "accuracy of the variants", interactive=False)
    demo.queue(default_concurrency_limit=concurrency_limit, max_size=64 * concurrency_limit)
    weakref.finalize(demo, workspace.cleanup)  # the folder lives as long as the demo (or until the process exits)
    return demo


# --- tabs ----------------------------------------------------------------------------------------------------------

def _variant_picker(gr: Any, group: list[DemoModel]) -> Any:
    return gr.CheckboxGroup([m.key for m in group], value=[group[0].key], label="Variants (pick several to compare)")


def _label_outputs(gr: Any, group: list[DemoModel]) -> list[Any]:
    with gr.Row():
        return [gr.Label(label=m.key, num_top_classes=5, visible=i == 0) for i, m in enumerate(group)]


def _show_selected(gr: Any, picker: Any, outputs: list[Any], group: list[DemoModel]) -> None:
    picker.change(lambda chosen: [gr.update(visible=m.key in chosen) for m in group], picker, outputs,
                  queue=False, api_visibility="private")


def _text_tab(gr: Any, group: list[DemoModel], limits: dict[str, Any]) -> None:
    pair_column = next((m.source.pair_column for m in group if m.source.pair_column), None)
    text = gr.Textbox(label="Text", lines=3, placeholder="Type a sentence to classify", elem_id="text-input")
    pair = gr.Textbox(label=f"Second text ({pair_column})", lines=2, visible=pair_column is not None)
    picker = _variant_picker(gr, group)
    explain_on, method = explain_controls(gr, group, Task.TEXT_CLASSIFICATION, "text")
    button = gr.Button("Classify", variant="primary", elem_id="classify-text")
    labels = _label_outputs(gr, group)
    why = gr.HighlightedText(label="Why: each word's push toward the predicted label (red: toward, purple: against)",
                             visible=False, elem_id="text-explanation")
    table = gr.Dataframe(headers=TABLE_HEADERS, label="Per variant", interactive=False)
    examples = text_examples(group[0].source)
    if examples:
        gr.Examples(examples, [text, pair] if pair_column else [text], label="Examples")
    _show_selected(gr, picker, labels, group)

    def classify_text(text: str, pair: str, chosen: list[str]) -> list[Any]:
        text = _checked_text(gr, text, "text to classify")
        pair_text = _checked_text(gr, pair, f"second text ({pair_column})") if pair_column else None
        return _run_classifiers(gr, group, chosen,
                                lambda p: p.predict([text], [pair_text] if p.pair_column else None)[0])

    explainer = Explainer()

    def explain_text(text: str, pair: str, on: bool, method: str, chosen: list[str]) -> Any:
        if not on:
            return gr.update(visible=False)
        text = _checked_text(gr, text, "text to explain")
        pair_text = _checked_text(gr, pair, f"second text ({pair_column})") if pair_column else None
        return explainer.text(gr, _selected(gr, group, chosen)[0], text, pair_text, method)

    # batch=False: the runtime's micro-batcher groups concurrent requests instead (a bad request then fails alone).
    gr.on([button.click, text.submit], classify_text, [text, pair, picker], [*labels, table], api_name="classify_text",
          concurrency_limit=limits["classify"], batch=False).success(
        explain_text, [text, pair, explain_on, method, picker], [why], api_name="explain_text",
        concurrency_limit=limits["classify"], batch=False)


def _image_tab(gr: Any, group: list[DemoModel], limits: dict[str, Any], workspace: Path) -> None:
    from PIL import Image

    from serve.sketch import sketch_to_image

    with gr.Row():
        with gr.Column():
            upload = gr.File(label="Upload an image", file_types=["image"], type="filepath")
            upload_button = gr.Button("Classify the upload", variant="primary")
        with gr.Column():
            sketch = gr.Sketchpad(label="Or draw (e.g. a digit)", type="numpy", image_mode="RGBA",
                                  canvas_size=(280, 280), brush=gr.Brush(default_size=18, colors=["#000000"],
                                                                         color_mode="fixed"))
            sketch_button = gr.Button("Classify the drawing", variant="primary")
        seen = gr.Image(label="What the model sees", type="numpy", interactive=False, height=160)
        why = gr.Image(label="Why", type="numpy", interactive=False, height=160, visible=False,
                       elem_id="image-explanation")
    picker = _variant_picker(gr, group)
    explain_on, method = explain_controls(gr, group, Task.IMAGE_CLASSIFICATION, "image")
    labels = _label_outputs(gr, group)
    table = gr.Dataframe(headers=TABLE_HEADERS, label="Per variant", interactive=False)
    examples = image_examples(group[0].source, workspace / "examples")
    if examples:
        gr.Examples([[p] for p in examples], [upload], label="Examples from the eval split")
    _show_selected(gr, picker, labels, group)

    def classify(image: Image.Image, chosen: list[str]) -> list[Any]:
        outputs = _run_classifiers(gr, group, chosen, lambda p: p.predict([image])[0])
        first = _selected(gr, group, chosen)[0].predictor()
        pixels = first.preprocess([image])[0]  # normalized [C, H, W]: shown rescaled to 0..255
        view = (pixels - pixels.min()) / max(float(np.ptp(pixels)), 1e-6) * 255
        view = np.repeat(view, 3, axis=0) if view.shape[0] == 1 else view
        shown = Image.fromarray(view.transpose(1, 2, 0).astype(np.uint8)).resize((140, 140), Image.Resampling.NEAREST)
        return [*outputs, np.asarray(shown)]

    def classify_image(path: str | None, chosen: list[str]) -> list[Any]:
        return classify(_checked_image(gr, path, limits["upload_bytes"]), chosen)

    def classify_sketch(value: dict[str, Any] | None, chosen: list[str]) -> list[Any]:
        canvas = (value or {}).get("composite")
        spec = _selected(gr, group, chosen)[0].predictor().spec
        image = sketch_to_image(np.asarray(canvas), spec) if canvas is not None else None
        if image is None:
            raise gr.Error("Draw something on the sketchpad first.")
        return classify(image, chosen)

    explainer = Explainer()

    def explain_image(path: str | None, on: bool, method: str, chosen: list[str]) -> Any:
        if not on:
            return gr.update(visible=False)
        image = _checked_image(gr, path, limits["upload_bytes"])
        return explainer.image(gr, _selected(gr, group, chosen)[0], image, method)

    def explain_sketch(value: dict[str, Any] | None, on: bool, method: str, chosen: list[str]) -> Any:
        if not on:
            return gr.update(visible=False)
        canvas = (value or {}).get("composite")
        model = _selected(gr, group, chosen)[0]
        image = sketch_to_image(np.asarray(canvas), model.predictor().spec) if canvas is not None else None
        if image is None:
            raise gr.Error("Draw something on the sketchpad first.")
        return explainer.image(gr, model, image, method)

    gr.on([upload_button.click], classify_image, [upload, picker], [*labels, table, seen], api_name="classify_image",
          concurrency_limit=limits["classify"], batch=False).success(
        explain_image, [upload, explain_on, method, picker], [why], api_name="explain_image",
        concurrency_limit=limits["classify"], batch=False)
    gr.on([sketch_button.click], classify_sketch, [sketch, picker], [*labels, table, seen],
          api_name="classify_sketch", concurrency_limit=limits["classify"], batch=False).success(
        explain_sketch, [sketch, explain_on, method, picker], [why], api_name="explain_sketch",
        concurrency_limit=limits["classify"], batch=False)


def _generation_tab(gr: Any, group: list[DemoModel], limits: dict[str, Any]) -> None:
    defaults = group[0].predictor().defaults
    chat = any(m.predictor().chat_template for m in group)
    prompt = gr.Textbox(label="Prompt", lines=3, placeholder="Once upon a time", elem_id="prompt-input")
    use_chat = gr.Checkbox(label="Send as a chat message (the model's chat template)", value=chat, visible=chat)
    with gr.Accordion("Sampling", open=False):
        max_new_tokens = gr.Slider(1, 512, value=defaults.max_new_tokens, step=1, label="max new tokens")
        temperature = gr.Slider(0.0, 2.0, value=defaults.temperature if defaults.do_sample else 0.0, step=0.05,
                                label="temperature (0: greedy)")
        top_k = gr.Slider(0, 200, value=defaults.top_k, step=1, label="top-k (0: off)")
        top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.01, label="top-p")
        repetition_penalty = gr.Slider(1.0, 2.0, value=defaults.repetition_penalty, step=0.01,
                                       label="repetition penalty")
        seed = gr.Number(value=0, precision=0, label="seed (-1: random)")
    picker = _variant_picker(gr, group)
    button = gr.Button("Generate", variant="primary", elem_id="generate")
    with gr.Row():
        texts = [gr.Textbox(label=m.key, lines=6, visible=i == 0, interactive=False) for i, m in enumerate(group)]
    table = gr.Dataframe(headers=["variant", "tokens", "first token (ms)", "tokens/s"], label="Per variant",
                         interactive=False)
    examples = [[row[0][:80]] for row in text_examples(group[0].source)]
    gr.Examples(examples, [prompt], label="Example prompts")
    _show_selected(gr, picker, texts, group)

    def generate(prompt: str, as_chat: bool, max_new_tokens: float, temperature: float, top_k: float, top_p: float,
                 repetition_penalty: float, seed: float | None, chosen: list[str]) -> Iterator[list[Any]]:
        prompt = _checked_text(gr, prompt, "prompt")
        selected = _selected(gr, group, chosen)
        settings = {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature), "top_k": int(top_k),
                    "top_p": float(top_p), "repetition_penalty": float(repetition_penalty),
                    "do_sample": float(temperature) > 0, "seed": None if seed is None or seed < 0 else int(seed)}
        outputs: dict[str, str] = {m.key: "" for m in selected}
        rows: list[list[Any]] = []
        for model in selected:
            generator = model.predictor()
            text = [{"role": "user", "content": prompt}] if as_chat and generator.chat_template else prompt
            start, first, count, pieces = time.perf_counter(), None, 0, Detokenizer(generator.tokenizer)
            try:
                for token in generator.tokens(text, **settings):
                    first = first if first is not None else time.perf_counter() - start
                    count += 1
                    if piece := pieces.push(token):
                        outputs[model.key] += piece
                        yield _stream_update(gr, group, outputs, rows)
            except TuneforgeError as err:
                raise gr.Error(str(err)) from None
            outputs[model.key] += pieces.flush()
            elapsed = time.perf_counter() - start
            rows.append([model.key, count, round((first or elapsed) * 1000, 1), round(count / max(elapsed, 1e-9), 1)])
            yield _stream_update(gr, group, outputs, rows)

    inputs = [prompt, use_chat, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, picker]
    gr.on([button.click, prompt.submit], generate, inputs, [*texts, table], api_name="generate",
          concurrency_limit=limits["generate"], batch=False)


def _stream_update(gr: Any, group: list[DemoModel], outputs: dict[str, str], rows: list[list[Any]]) -> list[Any]:
    return [gr.update(value=outputs[m.key], visible=True) if m.key in outputs else gr.update(visible=False)
            for m in group] + [rows]


# --- shared steps --------------------------------------------------------------------------------------------------

def _run_classifiers(gr: Any, group: list[DemoModel], chosen: list[str], predict: Any) -> list[Any]:
    """Run `predict(predictor) -> Prediction` on each chosen model: label bars per model, then the table."""
    selected = {m.key for m in _selected(gr, group, chosen)}
    outputs, rows, truncated = [], [], False
    for model in group:
        if model.key not in selected:
            outputs.append(gr.update(visible=False))
            continue
        start = time.perf_counter()
        try:
            prediction = predict(model.predictor())
        except TuneforgeError as err:
            raise gr.Error(str(err)) from None
        ms = (time.perf_counter() - start) * 1000
        truncated |= prediction.truncated
        if prediction.value is not None:  # regression
            outputs.append(gr.update(value=f"{prediction.value:.4g}", visible=True, label=f"{model.key} · {ms:.1f} ms"))
            rows.append([model.key, round(prediction.value, 4), None, round(ms, 2)])
        else:
            outputs.append(gr.update(value=prediction.probabilities, visible=True, label=f"{model.key} · {ms:.1f} ms"))
            rows.append([model.key, prediction.label, round(prediction.score, 4), round(ms, 2)])
    if truncated:
        gr.Warning("The text is longer than the model's limit; it was truncated as in training.")
    return [*outputs, rows]


def _selected(gr: Any, group: list[DemoModel], chosen: list[str] | str | None) -> list[DemoModel]:
    chosen = [chosen] if isinstance(chosen, str) else list(chosen or [])
    unknown = [c for c in chosen if c not in {m.key for m in group}]
    if unknown:
        raise gr.Error(f"unknown variant(s) {unknown}; choose from {[m.key for m in group]}")
    if not chosen:
        raise gr.Error("Select at least one variant.")
    return [m for m in group if m.key in chosen]


def _checked_text(gr: Any, text: Any, what: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise gr.Error(f"Enter the {what}: it is empty.")
    if len(text) > MAX_TEXT_CHARS:
        raise gr.Error(f"The {what} has {len(text):,} characters; this demo takes up to {MAX_TEXT_CHARS:,}.")
    return text


def _checked_image(gr: Any, path: str | None, max_bytes: float) -> Any:
    """The uploaded file as a decoded Pillow image, or gr.Error saying what is wrong with it."""
    from PIL import Image

    from serve.bundle.preprocessing import load_image

    if not path:
        raise gr.Error("Upload an image first.")
    file = Path(path)
    if file.suffix.lower() not in IMAGE_SUFFIXES:
        raise gr.Error(f"{file.name} is not an image file; upload one of {', '.join(IMAGE_SUFFIXES)}.")
    size = file.stat().st_size
    if size > max_bytes:
        raise gr.Error(f"{file.name} is {size / 1e6:.3g} MB; this demo takes images up to {max_bytes / 1e6:.3g} MB.")
    try:
        with Image.open(file) as header:  # reads the header only
            width, height = header.size
    except Exception:  # Pillow raises several types for undecodable files
        raise gr.Error(f"{file.name} is not an image the demo can read.") from None
    if width * height > MAX_IMAGE_PIXELS:
        raise gr.Error(f"{file.name} is {width}x{height} pixels; this demo takes up to {MAX_IMAGE_PIXELS:,} pixels.")
    try:
        return load_image(file)
    except TuneforgeError as err:
        raise gr.Error(str(err)) from None


def _gradio() -> Any:
    try:
        import gradio as gr
    except ImportError:
        raise ServeError("the demo needs gradio; pip install 'tuneforge[demo]'") from None
    return gr


# --- command line --------------------------------------------------------------------------------------------------

def demo_command(*paths: str | Path, python: str | None = None) -> str:
    """The exact shell command that opens the demo on `paths` (e.g. printed at the end of a pipeline run)."""
    interpreter = Path(python or sys.executable)  # not resolved: a venv's python is a symlink that must stay one
    if interpreter.is_absolute() and interpreter.is_relative_to(Path.cwd()):
        interpreter = interpreter.relative_to(Path.cwd())
    return shlex.join([str(interpreter), "-m", "serve", *(str(p) for p in paths)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serve", description="Open the Gradio demo on bundles and/or run "
                                     "directories (one tab per task, variants side by side).")
    parser.add_argument("paths", nargs="+", type=Path, help="bundles (python -m compress export) or run directories")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=None, help="port (default: 7860 or the next free one)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    parser.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login (visible to other "
                        "users in `ps`: prefer --auth-file or $TUNEFORGE_DEMO_AUTH)")
    parser.add_argument("--auth-file", type=Path, default=None, metavar="PATH",
                        help="require the login USER:PASS read from the first line of this file")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads per model run")
    parser.add_argument("--concurrency", type=int, default=8, help="classifier requests run at once")
    parser.add_argument("--max-batch-size", type=int, default=32, help="micro-batch size of concurrent requests")
    parser.add_argument("--max-wait-ms", type=float, default=0.0, help="micro-batch wait for more requests (ms)")
    parser.add_argument("--max-upload-mb", type=float, default=5.0, help="largest image upload (MB)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with exit_on_user_error():
        auth = demo_auth(args.auth, args.auth_file)
        warn_if_exposed(args.host, args.share, auth)
        demo = build_demo(args.paths, threads=args.threads, concurrency_limit=args.concurrency,
                          batching=BatchingConfig(args.max_batch_size, args.max_wait_ms),
                          max_upload_mb=args.max_upload_mb)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill`, docker stop, systemd: stop as Ctrl-C does, deleting uploads
    started = time.time()
    try:
        # gradio refuses uploads over twice the limit outright; between 1x and 2x the demo says why (friendlier).
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, ssr_mode=False,
                    auth=LoginThrottle(*auth).check if auth else None,
                    max_file_size=int(2 * args.max_upload_mb * 1e6), footer_links=["api"])
    finally:
        demo.close(verbose=False)
        _remove_leaked_temp_files(Path(demo.GRADIO_CACHE), since=started)


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM handler: Gradio's launch() stops its server cleanly (running delete_cache) on KeyboardInterrupt."""
    raise KeyboardInterrupt


def _remove_leaked_temp_files(cache: Path, *, since: float) -> None:
    """Remove the empty temp files (tmpXXXXXXXX) Gradio left in its cache while the demo ran: gr.File(type=
    "filepath") opens one per request and never uses or deletes it (Gradio 6.31). The uploads themselves, and the
    images the demo returned, are deleted by delete_cache."""
    for path in cache.glob("tmp*"):
        try:
            info = path.stat()
            if path.is_file() and info.st_size == 0 and info.st_mtime >= since:
                path.unlink()
        except OSError:  # gone already, or not ours to remove
            continue
