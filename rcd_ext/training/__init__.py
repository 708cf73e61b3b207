"""Two-stage RCD training (Algorithm 1) on the stock `transformers.Trainer`.

- `objective`: noise draws, the 1/t-weighted masked-diffusion loss, residual injection.
- `data`: JSONL / saved HF datasets / endless synthetic-task streams, and the batch collator.
- `trainer`: `DiffusionTrainer` (a `Trainer` with our `compute_loss`) and `train(...)`.

See docs/training.md for the commands and the measured defaults.
"""

from rcd_ext.training.data import DiffusionCollator, TaskStream, load_training_data
from rcd_ext.training.objective import (
    RESIDUAL_SOURCES,
    Noise,
    diffusion_loss,
    draw_noise,
    masked_diffusion_loss,
)
from rcd_ext.training.trainer import (
    DiffusionArguments,
    DiffusionTrainer,
    build_tiny_model,
    check_same_tokenizer,
    train,
    training_arguments,
)

__all__ = [
    "RESIDUAL_SOURCES",
    "DiffusionArguments",
    "DiffusionCollator",
    "DiffusionTrainer",
    "Noise",
    "TaskStream",
    "build_tiny_model",
    "check_same_tokenizer",
    "diffusion_loss",
    "draw_noise",
    "load_training_data",
    "masked_diffusion_loss",
    "train",
    "training_arguments",
]
