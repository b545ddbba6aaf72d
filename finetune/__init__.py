"""Fine-tuning building blocks: config, data, models, optim, metrics, checkpoints, tracking.

Importing this package is cheap: submodules import torch / transformers only when used.
"""

__version__ = "0.1.0"
