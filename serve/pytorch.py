"""Serve a run directory through PyTorch (the demo's baseline next to a bundle's ONNX variants).

The predictors are the runtime's own (serve.predictors, serve.generation) with a PyTorch forward plugged in, and the
tokenizer is the one export writes into bundles (compress.tasks.bundle_tokenizer), so a run directory and its bundle
tokenize and post-process identically; only the model differs. Needs the train extra (torch, transformers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from serve.batching import BatchingConfig
from serve.bundle.decoding import Step
from serve.bundle.preprocessing import PreprocessingSpec
from serve.bundle.tasks import TEXT_TASKS, Task
from serve.generation import GenerationSettings, TextGenerator
from serve.predictors import Forward, ImageClassifier, TextClassifier, check_threads


def load_run(run_dir: str | Path, *, threads: int | None = None,
             batching: BatchingConfig | None = None) -> TextClassifier | ImageClassifier | TextGenerator:
    """A predictor for a finished run's `model/` (PyTorch, eval mode), with the same API as `serve.runtime.load`.

    threads: torch intra-op threads (process-wide: torch has one pool).
    """
    import torch

    from compress.export import LM_INPUTS, TEXT_INPUTS, forward_input_names
    from compress.source import load_model, load_tokenizer, read_run
    from compress.tasks import bundle_tokenizer

    threads = check_threads(threads)
    if threads:
        torch.set_num_threads(threads)
    run = read_run(run_dir)
    model = load_model(run)
    record, name = run.record, f"{run.run_dir.name}/pytorch"
    if run.task == Task.IMAGE_CLASSIFICATION:
        return ImageClassifier(PreprocessingSpec.from_dict(record.preprocessing), _forward(model),
                               labels=record.label_names, batching=batching, name=name)
    hf = load_tokenizer(run)
    if run.task in TEXT_TASKS:
        max_length = int(record.max_length or hf.model_max_length)
        tokenizer = bundle_tokenizer(hf, padding_side=hf.padding_side, max_length=max_length)
        return TextClassifier(tokenizer, _forward(model),
                              input_names=forward_input_names(model, TEXT_INPUTS,
                                                              tokenizer_inputs=hf.model_input_names),
                              labels=record.label_names, task=run.task, max_length=max_length,
                              pair_column=record.text_pair_column, batching=batching, name=name)
    config = model.generation_config
    eos = config.eos_token_id if config.eos_token_id is not None else hf.eos_token_id
    pad = next(p for p in (config.pad_token_id, hf.pad_token_id, eos[0] if isinstance(eos, list) else eos)
               if p is not None)
    tokenizer = bundle_tokenizer(hf, padding_side="left", max_length=None, pad_token_id=pad)
    special = {f"{kind}_token": getattr(hf, f"{kind}_token") for kind in ("bos", "eos", "pad")
               if getattr(hf, f"{kind}_token", None) is not None}
    return TextGenerator(tokenizer, torch_step(model, forward_input_names(model, LM_INPUTS)),
                         defaults=GenerationSettings.from_manifest(record.generation), eos_token_id=eos,
                         pad_token_id=pad, max_length=record.block_size,
                         max_positions=getattr(model.config, "max_position_embeddings", None),
                         chat_template=getattr(hf, "chat_template", None), special_tokens=special, name=name)


def _forward(model: Any) -> Forward:
    """numpy graph inputs -> numpy logits through the PyTorch model (no autograd)."""
    import torch

    def forward(feeds: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        return out.logits.float().numpy()

    return forward


def torch_step(model: Any, input_names: list[str]) -> Step:
    """The `serve.bundle.decoding.decode_loop` step of a PyTorch causal LM; its state is the model's KV cache."""
    import torch

    def step(feeds: dict[str, np.ndarray], past: Any) -> tuple[np.ndarray, Any]:
        with torch.inference_mode():
            out = model(**{k: torch.from_numpy(v) for k, v in feeds.items() if k in input_names},
                        past_key_values=past, use_cache=True)
        return out.logits.float().numpy(), out.past_key_values

    return step
