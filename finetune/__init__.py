"""Fine-tuning building blocks: config, data, models, optim, metrics, checkpoints, tracking, the run directory.

Shared by every task at the top (config, data, models, optim, loop, checkpoint, rundir, tracking, metrics, ...);
one folder per modality: text/ (classification and regression), lm/ (causal LMs, LoRA, sampling), vision/ (images).

Importing this package is cheap: submodules import torch / transformers only when used.
"""

__version__ = "0.1.0"
