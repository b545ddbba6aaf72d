"""A run's data, rebuilt from its config.yaml with the recipes' own builders: batches of the train split (for
gradient importance scores) and the eval-split metrics of a compressed model, scored as the recipe scores them."""

from __future__ import annotations

import itertools
from typing import Any

import torch

from compress.errors import StageError
from compress.source import Run, image_splits, load_samples, load_tokenizer, run_data_config, text_splits
from serve.bundle.tasks import TEXT_TASKS, Task

LM_MAX_TOKENS = 128  # causal-LM sample texts are cut to this many tokens


class RunData:
    """Train and eval loaders of a run (built on first use), and scoring of a model on the eval split."""

    def __init__(self, run: Run, *, batch_size: int):
        self.run = run
        self.batch_size = batch_size
        self._loaders: tuple[Any, Any] | None = None

    @property
    def loaders(self) -> tuple[Any, Any]:
        if self._loaders is None:
            task = self.run.task
            build = _text_loaders if task in TEXT_TASKS else _image_loaders if task == Task.IMAGE_CLASSIFICATION \
                else _lm_loaders
            self._loaders = build(self.run, self.batch_size)
        return self._loaders

    def train_batches(self, count: int) -> list[dict[str, torch.Tensor]]:
        """The first `count` batches of the train split (in the recipe's seeded order)."""
        return list(itertools.islice(self.loaders[0], count))

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, Any]:
        """The model's metrics on the eval split: the recipe's scoring (classification, regression), or for causal
        LMs the mean token loss and perplexity on the run's sample texts."""
        from accelerate import Accelerator

        from finetune.evaluation import predict, score_classifier, score_regressor

        model.eval()
        if self.run.task == Task.CAUSAL_LM:
            losses, tokens = 0.0, 0
            for batch in self.loaders[1]:
                count = int((batch["labels"][:, 1:] != -100).sum())
                losses += float(model(**batch).loss) * count
                tokens += count
            loss = losses / tokens
            return {"eval_loss": loss, "perplexity": float(torch.tensor(loss).exp()), "num_tokens": tokens,
                    "source": "sample texts (compress.source.load_samples)"}
        logits, labels = predict(Accelerator(cpu=not torch.accelerator.is_available()), model, self.loaders[1])
        if self.run.task == Task.TEXT_REGRESSION:
            return score_regressor(logits, labels)
        names = self.run.record.label_names
        return score_classifier(logits, labels, num_labels=len(names),
                                label_names=names if self.run.task == Task.IMAGE_CLASSIFICATION else None)


def _text_loaders(run: Run, batch_size: int) -> tuple[Any, Any]:
    from transformers import DataCollatorWithPadding

    from finetune.data import build_dataloaders
    from finetune.text.data import encode_labels, tokenize_splits

    found, splits = run_data_config(run), text_splits(run)
    if found is None or splits is None:
        raise StageError(f"{run.run_dir} has no config.yaml with its data settings; pass a run directory written by "
                         "a recipe, or use importance: magnitude without recovery")
    cfg, seed = found
    regression = run.task == Task.TEXT_REGRESSION
    if not regression:
        cfg.label_names = run.record.label_names  # the ids the model was trained with
    tokenizer = load_tokenizer(run)
    labelled, _ = encode_labels(splits, cfg, regression=regression,
                                num_labels=None if regression else len(cfg.label_names))
    return build_dataloaders(tokenize_splits(labelled, tokenizer, cfg), DataCollatorWithPadding(tokenizer),
                             batch_size=batch_size, eval_batch_size=max(batch_size, 64), seed=seed, num_processes=1)


def _image_loaders(run: Run, batch_size: int) -> tuple[Any, Any]:
    from finetune.vision.data import build_image_dataloaders, prepare_images
    from serve.bundle.preprocessing import PreprocessingSpec

    loaded = image_splits(run)
    if loaded is None:
        raise StageError(f"{run.run_dir} has no config.yaml with its data settings; pass a run directory written by "
                         "the image recipe, or use importance: magnitude without recovery")
    spec = PreprocessingSpec.from_dict(run.record.preprocessing)
    return build_image_dataloaders(prepare_images(loaded, spec), spec, batch_size=batch_size,
                                   eval_batch_size=max(batch_size, 256), seed=run.seed, num_processes=1)


def _lm_loaders(run: Run, batch_size: int) -> tuple[Any, Any]:
    """Causal LMs: the run's sample texts (its eval split, else built-in texts), half for scores, half for eval."""
    tokenizer = load_tokenizer(run)
    texts = load_samples(run, limit=4 * batch_size).texts
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    def batches(part: list[str]) -> list[dict[str, torch.Tensor]]:
        out = []
        for start in range(0, len(part), batch_size):
            enc = tokenizer(part[start:start + batch_size], padding=True, truncation=True, max_length=LM_MAX_TOKENS,
                            return_tensors="pt")
            enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            out.append(dict(enc))
        return out

    half = max(1, len(texts) // 2)
    return batches(texts[:half]), batches(texts[half:] or texts)
