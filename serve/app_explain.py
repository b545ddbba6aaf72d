"""The demo's "explain" toggle: the controls, and one explanation of the first selected variant as a gradio update.

Bundle variants are explained torch-free by serve.explain (text: occlusion, kernel SHAP; images: occlusion, RISE);
a run directory's PyTorch model can also be explained by integrated gradients (compress.attribution, when captum is
installed). Text comes back as gr.HighlightedText chunks (each word with its attribution toward the predicted label,
scaled to [-1, 1]); images as the input with the heatmap blended over it. Imports gradio only through the caller.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from serve.bundle.errors import TuneforgeError
from serve.bundle.tasks import Task
from serve.explain import IMAGE_METHODS, TEXT_METHODS, explain, highlight, overlay

if TYPE_CHECKING:
    from serve.sources import DemoModel

GRADIENT = "integrated-gradients"  # run directories only (PyTorch + captum)
MAX_OVERLAY_SIDE = 320  # the explanation image is shown at most this large (pixels)


def methods(group: list[DemoModel], task: str) -> list[str]:
    """The methods the dropdown offers: the runtime's, plus integrated gradients when a run directory is served."""
    from compress.attribution import captum_available

    own = list(IMAGE_METHODS if task == Task.IMAGE_CLASSIFICATION else TEXT_METHODS)
    if any(m.source.kind == "run" for m in group) and captum_available():
        own.append(GRADIENT)
    return own


def controls(gr: Any, group: list[DemoModel], task: str, prefix: str) -> tuple[Any, Any]:
    """The toggle and the method dropdown, in one row."""
    with gr.Row():
        toggle = gr.Checkbox(label="Explain the prediction (first selected variant)", value=False,
                             elem_id=f"{prefix}-explain")
        method = gr.Dropdown(methods(group, task), value="occlusion", label="Explanation method",
                             elem_id=f"{prefix}-explain-method")
    return toggle, method


class Explainer:
    """Explanations for the demo's models; integrated-gradient explainers are loaded once per run directory."""

    def __init__(self) -> None:
        self._gradients: dict[str, Any] = {}
        self._lock = threading.Lock()

    def text(self, gr: Any, model: DemoModel, text: str, pair: str | None, method: str) -> Any:
        """A gr.HighlightedText update: the text's words coloured by their attribution toward the predicted label."""
        start = time.perf_counter()
        try:
            if method == GRADIENT:
                why = self._gradient(gr, model).explain(text, pair=pair)
                chunks, calls = highlight(text, why.spans, why.attributions), f"{why.steps} steps"
            else:
                why = explain(model.predictor(), text, method=method, pair=pair)
                chunks, calls = why.highlighted(), f"{why.model_calls} model calls"
        except TuneforgeError as err:
            raise gr.Error(str(err)) from None
        toward = f"toward '{why.target}'" if why.target is not None else "on the output value"
        label = f"{model.key} · {method} {toward} · {calls} · {(time.perf_counter() - start) * 1000:.0f} ms"
        return gr.update(value=chunks, visible=True, label=label)

    def image(self, gr: Any, model: DemoModel, image: Any, method: str) -> Any:
        """A gr.Image update: the image with the heatmap toward the predicted label over it."""
        start = time.perf_counter()
        try:
            if method == GRADIENT:
                why = self._gradient(gr, model).explain(image)
                calls = f"{why.steps} steps"
            else:
                why = explain(model.predictor(), image, method=method)
                calls = f"{why.model_calls} model calls"
            shown = overlay(image, why.heatmap)
        except TuneforgeError as err:
            raise gr.Error(str(err)) from None
        if max(shown.size) > MAX_OVERLAY_SIDE or max(shown.size) < MAX_OVERLAY_SIDE // 2:
            scale = MAX_OVERLAY_SIDE / max(shown.size)
            shown = shown.resize((max(1, round(shown.size[0] * scale)), max(1, round(shown.size[1] * scale))),
                                 resample=0)  # nearest: small digits stay crisp, large photos shrink
        label = (f"{model.key} · {method} toward '{why.target}' · {calls} · "
                 f"{(time.perf_counter() - start) * 1000:.0f} ms")
        return gr.update(value=np.asarray(shown), visible=True, label=label)

    def _gradient(self, gr: Any, model: DemoModel) -> Any:
        if model.source.kind != "run":
            raise gr.Error(f"{GRADIENT} runs on a run directory's PyTorch model; select a run variant first, or pick "
                           f"another method for {model.key}")
        from compress.attribution import GradientExplainer

        with self._lock:
            key = str(model.source.path)
            if key not in self._gradients:
                self._gradients[key] = _Serialized(GradientExplainer.from_run(model.source.path))
            return self._gradients[key]


class _Serialized:
    """One integrated-gradients call at a time per model: Captum hooks the shared module for each call."""

    def __init__(self, explainer: Any):
        self._explainer, self._lock = explainer, threading.Lock()

    def explain(self, input: Any, **options: Any) -> Any:
        with self._lock:
            return self._explainer.explain(input, **options)
