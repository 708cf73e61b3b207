"""`DiffusionTrainer`: a `transformers.Trainer` whose `compute_loss` is the RCD/SeqD objective.

Everything else (checkpoints every `save_steps`, exact resume with the RNG state, gradient
accumulation, bf16, logging and progress bars, DDP/FSDP under `accelerate launch` or torchrun)
is the stock Trainer. `train(...)` below wires a model, a reference, data and arguments
together; `rcd train` is its command line.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from rcd_ext.atomic_files import write_json_atomic
from rcd_ext.options import DiffusionArguments, needs_reference_model
from rcd_ext.training.checkpoint_integrity import (
    COMPLETE_MARKER,
    resolve_resume,
    write_complete_marker,
)
from rcd_ext.training.data import DiffusionCollator, load_training_data, parse_task_spec
from rcd_ext.training.objective import diffusion_loss, draw_noise


def mask_token_id(model: nn.Module, tokenizer: Any = None) -> int:
    """The model's [M] id, found the way decoding finds it (`rcd_ext.models.adapters`)."""
    from rcd_ext.models.adapters import get_adapter

    return get_adapter(model, tokenizer, require_embeddings=False).mask_id


def check_same_tokenizer(target: nn.Module, reference: nn.Module, tokenizer: Any = None,
                         reference_tokenizer: Any = None) -> None:
    """Raise ValueError unless the reference shares the target's vocabulary, mask id and
    tokenizer (the residual mixes rows of the target's table by the reference's token ids)."""
    from rcd_ext.models.adapters import check_reference, get_adapter

    check_reference(get_adapter(target, tokenizer, require_embeddings=False),
                    get_adapter(reference, reference_tokenizer, require_embeddings=False),
                    tokenizer, reference_tokenizer)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: the reference is an input to training, never trained."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


class DiffusionTrainer(Trainer):
    """Trainer for stage "seqd" or "rcd". Pass `diffusion=DiffusionArguments(...)`, and for the
    "same"/"previous-step" sources `reference=` a model sharing the target's tokenizer."""

    def __init__(self, *args: Any, diffusion: DiffusionArguments | None = None,
                 reference: nn.Module | None = None, mask_id: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.diffusion = diffusion or DiffusionArguments()
        if (needs_reference_model(self.diffusion.stage, self.diffusion.residual_source)
                and reference is None):
            raise ValueError(f"stage rcd with residual source "
                             f"{self.diffusion.residual_source!r} needs a reference model")
        tokenizer = self.processing_class
        if reference is not None:
            check_same_tokenizer(self.model, reference, tokenizer)
            reference = freeze(reference.to(self.args.device))
        self.reference = reference
        self.mask_id = mask_token_id(self.model, tokenizer) if mask_id is None else mask_id
        # Our loss is a per-batch mean that Trainer must divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        # tokens/s counts only the time inside training steps: an interval that holds a
        # checkpoint save, the start-up or a resume's batch skipping is not slower training
        self._tokens_seen = 0
        self._step_seconds = 0.0
        self._rate_mark = (0.0, 0)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any,
              **kwargs: Any) -> Any:
        """`Trainer.train`, but resume=True skips a torn last checkpoint (killed or full disk
        mid-save) for the newest complete one, saying so; see `checkpoint_integrity`."""
        resume = resolve_resume(resume_from_checkpoint, self.args.output_dir,
                                say=self.args.process_index == 0)
        return super().train(resume, *args, **kwargs)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """The stock save, then (process 0, after every rank wrote its files) fsync all of it
        and write the completion marker last."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        checkpoint = Path(self._get_output_dir(trial=trial),
                          f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            # a marker left by an earlier save of this step must not vouch for this one
            (checkpoint / COMPLETE_MARKER).unlink(missing_ok=True)
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()
        if self.args.should_save and checkpoint.is_dir():
            write_complete_marker(checkpoint)

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The stock step, timed for the tokens/s of the logs."""
        began = time.perf_counter()
        try:
            return super().training_step(*args, **kwargs)
        finally:
            self._step_seconds += time.perf_counter() - began

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor],
                     return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        """The 1/t-weighted masked-diffusion loss of `inputs` (from `DiffusionCollator`)."""
        batch = dict(inputs)
        if bool(batch["attention_mask"].all()):
            # no padding: call the model exactly as the decoding loops do
            batch.pop("attention_mask")
        noise = draw_noise(batch["response_mask"].bool(), eps=self.diffusion.eps,
                           no_residual_fraction=self.diffusion.no_residual_fraction)
        loss = diffusion_loss(model, batch, noise, mask_id=self.mask_id,
                              stage=self.diffusion.stage, reference=self.reference,
                              residual_source=self.diffusion.residual_source,
                              dirichlet_concentration=self.diffusion.dirichlet_concentration,
                              unroll_steps=self.diffusion.unroll_steps,
                              unroll_fraction=self.diffusion.unroll_fraction,
                              unroll_init=self.diffusion.unroll_init,
                              unroll_commits=self.diffusion.unroll_commits)
        if model.training:
            self._tokens_seen += int(inputs["attention_mask"].sum())
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds tokens/s (this process, training steps only, since the previous log)."""
        if "loss" in logs:
            mark_seconds, mark_tokens = self._rate_mark
            logs["tokens_per_second"] = round(
                (self._tokens_seen - mark_tokens) / max(self._step_seconds - mark_seconds, 1e-9),
                1)
            self._rate_mark = (self._step_seconds, self._tokens_seen)
        super().log(logs, start_time)


def build_tiny_model(task_spec: str, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                     seed: int = 0) -> tuple[nn.Module, Any]:
    """A fresh built-in tiny dLLM and tokenizer sized for a synthetic task."""
    from rcd_ext.models import TinyDLLMConfig, TinyDLLMModel

    task = parse_task_spec(task_spec)
    tokenizer = task.build_tokenizer()
    config = TinyDLLMConfig(vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id,
                            pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id,
                            bos_token_id=tokenizer.bos_token_id, hidden_size=hidden_size,
                            num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=4 * hidden_size,
                            max_position_embeddings=task.prompt_length + task.answer_length)
    torch.manual_seed(seed)
    return TinyDLLMModel(config), tokenizer


def load_trainable(path: str, trust_remote_code: bool = False) -> tuple[nn.Module, Any]:
    """(model in train mode, tokenizer) from a local checkpoint."""
    from rcd_ext.models.adapters import load_model

    model, tokenizer = load_model(path, trust_remote_code=trust_remote_code)
    model.train()
    return model, tokenizer


def training_arguments(output_dir: str, **overrides: Any) -> TrainingArguments:
    """TrainingArguments with this project's defaults (measured on the tiny tasks, see
    docs/training.md): AdamW lr 3e-3, betas (0.9, 0.98), wd 0.01, 100 warmup steps then
    constant, clip 1.0, batch 128. Any TrainingArguments field can be overridden."""
    defaults: dict[str, Any] = dict(
        output_dir=output_dir, learning_rate=3e-3, adam_beta1=0.9, adam_beta2=0.98,
        weight_decay=0.01, warmup_steps=100, lr_scheduler_type="constant_with_warmup",
        max_grad_norm=1.0, per_device_train_batch_size=128, max_steps=1000,
        logging_steps=50, save_steps=500, save_total_limit=2, report_to="none",
        remove_unused_columns=False, dataloader_num_workers=0, dataloader_pin_memory=False,
        seed=0,
        disable_tqdm=True,
        # without a GPU, say so: TrainingArguments then also allows bf16 (CPU autocast)
        use_cpu=not torch.cuda.is_available(),
    )
    defaults.update(overrides)
    return TrainingArguments(**defaults)


def train(*, data: str, output_dir: str, diffusion: DiffusionArguments,
          model: nn.Module, tokenizer: Any, reference: nn.Module | None = None,
          resume_from_checkpoint: str | bool | None = None, append_eos: bool = True,
          **training_overrides: Any) -> DiffusionTrainer:
    """Train `model` on `data` and save it (weights, config, tokenizer) to `output_dir`.

    Returns the trainer (its `state.log_history` holds the losses).
    """
    args = training_arguments(output_dir, **training_overrides)
    max_length = getattr(model.config, "max_position_embeddings", None)
    dataset = load_training_data(data, tokenizer, seed=args.seed, append_eos=append_eos,
                                 max_length=max_length)
    pad_id = tokenizer.pad_token_id if tokenizer is not None else None
    pad_id = pad_id if pad_id is not None else getattr(model.config, "pad_token_id", None) or 0
    trainer = DiffusionTrainer(model=model, args=args, train_dataset=dataset,
                               data_collator=DiffusionCollator(pad_id),
                               processing_class=tokenizer, diffusion=diffusion,
                               reference=reference)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trainer.save_model(output_dir)
    if trainer.is_world_process_zero():
        record = {"data": data, **asdict(diffusion), "max_steps": args.max_steps,
                  "learning_rate": args.learning_rate,
                  "batch_size": args.per_device_train_batch_size * args.world_size
                  * args.gradient_accumulation_steps, "seed": args.seed}
        write_json_atomic(Path(output_dir, "rcd_training.json"), record)
    return trainer
