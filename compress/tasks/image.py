"""Image classification: the preprocessing spec, pixel parity cases, accuracy on the eval split."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import ExportError
from compress.export import Graph, export_classifier
from compress.parity import Case, ParityConfig
from compress.source import Run, Samples, image_splits
from compress.tasks.base import EvalData, Feeds, TaskExport
from serve.bundle.preprocessing import PreprocessingSpec, normalize, preprocess_batch, to_model_pixels_batch

logger = logging.getLogger(__name__)

IMAGE_EVAL_BATCH = 256


class ImageClassifierExport(TaskExport):
    def __init__(self, run: Run, model: Any, samples: Samples, parity: ParityConfig):
        super().__init__(run, model, samples, parity)
        self.fusion_args["model_type"] = None  # no transformer fusions for CNNs; ORT's own (Conv+BN, Conv+Relu) apply
        spec = run.record.preprocessing
        if not spec:
            raise ExportError(f"{run.model_dir}/tuneforge.json has no 'preprocessing'; image bundles need the spec")
        self.sections = {"labels": run.record.label_names, "preprocessing": spec}
        self.spec = PreprocessingSpec.from_dict(spec)
        self.input_names = ["pixel_values"]
        pixels = preprocess_batch(samples.images, self.spec)
        self.sample_pixels = pixels
        self.cases["model"] = []
        for size in parity.batch_sizes:
            idx = [i % len(pixels) for i in range(size)]
            self.cases["model"].append(Case(f"batch {size}", {"pixel_values": pixels[idx]}))
        self.example = self.cases["model"][-1].feeds

    def export(self, stage: Path, variant: str, *, opset: int) -> list[Graph]:
        return [export_classifier(self.model, stage / f"{variant}.onnx", example=self.example,
                                  input_names=["pixel_values"], opset=opset)]

    def _pixels(self, split: str) -> tuple[np.ndarray, np.ndarray] | None:
        """uint8 [N, C, H, W] images of a split at the model's size and color mode, and their label ids."""
        splits = image_splits(self.run)
        if splits is None:
            return None
        return to_model_pixels_batch(splits[split].images, self.spec), splits[split].labels

    def eval_data(self) -> EvalData | None:
        if self._eval is None:
            found = self._pixels("eval")
            if found is None:
                return None
            pixels, labels = found
            batches = [{"pixel_values": normalize(pixels[i:i + IMAGE_EVAL_BATCH], self.spec)}
                       for i in range(0, len(pixels), IMAGE_EVAL_BATCH)]
            self._eval = EvalData(batches, labels, f"eval split ({len(labels)} images)")
        return self._eval

    def calibration_inputs(self, count: int) -> tuple[list[Feeds], str]:
        found = self._pixels("train")
        if found is None:
            raise self.no_train_data()
        pixels, _ = found
        pick = np.sort(np.random.default_rng(self.run.seed).permutation(len(pixels))[:count])
        return ([{"pixel_values": normalize(pixels[i:i + 1], self.spec)} for i in pick],
                f"train split ({len(pick)} of {len(pixels)} images)")

    def latency_inputs(self, batch_size: int) -> tuple[Feeds, str]:
        found = self._pixels("eval")
        if found is None:
            pixels = self.sample_pixels
            return {"pixel_values": pixels[[i % len(pixels) for i in range(batch_size)]]}, \
                f"parity samples ({self.samples_source}): the first {batch_size}"
        return ({"pixel_values": normalize(found[0][[i % len(found[0]) for i in range(batch_size)]], self.spec)},
                f"eval split: the first {batch_size} image(s)")

    def score(self, outputs: list[Any], data: EvalData) -> dict[str, Any]:
        from finetune.evaluation import score_classifier

        return score_classifier(np.concatenate(outputs), data.labels, num_labels=len(self.run.record.label_names))


