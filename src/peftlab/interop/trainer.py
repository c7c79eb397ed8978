"""transformers `Trainer` (and trl's trainers) with adapter-only checkpoints: `adapter_trainer`.

A plain `transformers.Trainer(model=am, ...)` trains an AdaptedModel (its forward names the
wrapped model's inputs, core/hf.py), but two of its decisions are taken on the model's class and
cannot be reached from the model: `Trainer._save` calls `save_pretrained` only on a
`PreTrainedModel` or a `PeftModel` (anything else gets its whole `state_dict()`, base weights
included, as `model.safetensors`), and `Trainer._load_from_checkpoint` reads adapter files only for
a `PeftModel`. `adapter_trainer(TrainerClass)` returns a subclass that takes both decisions for an
AdaptedModel: a checkpoint folder holds `am.save_pretrained(folder)` (the adapters, nothing of the
base) beside the Trainer's own optimizer / scheduler / RNG / state files, and resuming or
`load_best_model_at_end` copies the saved values into the live adapters in place
(`core.hf.restore_pretrained`). For any other model the subclass is the Trainer it extends.

It also fills what transformers reads from the model's class (which is AdaptedModel, not the
wrapped class): `label_names` and `can_return_loss`, so evaluation reports its loss; and it
refuses, before training, what a Trainer would get silently wrong with an AdaptedModel: peftlab
loss terms (only peftlab's loop adds `am.auxiliary_loss()`), and a plain `Trainer`'s label
smoothing of a causal LM (it decides to shift the labels from the model's class name).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils.generic import can_return_loss, find_labels

from ..core.errors import CapabilityError
from ..core.files import commit_files
from ..core.hf import restore_pretrained
from ..core.model import AdaptedModel

__all__ = ["adapter_trainer"]


def adapter_trainer(trainer_class: type[Trainer] = Trainer) -> type[Trainer]:
    """A subclass of `trainer_class` (transformers' `Trainer` or a subclass such as
    `trl.SFTTrainer`) whose checkpoints of an AdaptedModel are adapter folders and that resumes
    from them (see the module docstring). The same class for the same argument."""
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise TypeError(f"adapter_trainer takes transformers.Trainer or a subclass of it, got {trainer_class!r}")
    return _subclass(trainer_class)


@functools.cache
def _subclass(trainer_class: type[Trainer]) -> type[Trainer]:
    return type(f"Adapter{trainer_class.__name__}", (_AdapterCheckpoints, trainer_class),
                {"__module__": __name__, "__doc__": f"{trainer_class.__name__} with adapter-only "
                 "checkpoints of a peftlab AdaptedModel (peftlab.adapter_trainer)."})


class _AdapterCheckpoints:
    """The overrides `adapter_trainer` mixes in front of a Trainer class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        am = self._adapted()
        if am is None:
            return
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise CapabilityError("adapter checkpoints are saved from the live model, which DeepSpeed "
                                  "and FSDP shard: train an AdaptedModel with DDP (torchrun) or in "
                                  "one process")
        if am.loss_terms:
            raise CapabilityError(f"loss terms {sorted(am.loss_terms)} are added by peftlab's training "
                                  "loop (am.auxiliary_loss()), which a Trainer does not call: train "
                                  "with peftlab.train, or remove them (am.remove_loss_term)")
        wrapped = type(am.model)
        if (self.args.label_smoothing_factor and type(self).compute_loss is Trainer.compute_loss
                and wrapped.__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
            raise CapabilityError("Trainer's label smoothing decides whether to shift a causal LM's "
                                  "labels from the model's class name, which is AdaptedModel here, so "
                                  "it would not shift them: set label_smoothing_factor=0 (or use "
                                  "trl's SFTTrainer, which shifts them itself)")
        if self.args.label_names is None:     # transformers reads them from the model's class
            self.label_names = find_labels(wrapped)
        self.can_return_loss = can_return_loss(wrapped)

    def _adapted(self, model: Any = None) -> AdaptedModel | None:
        model = self.accelerator.unwrap_model(self.model if model is None else model)
        return model if isinstance(model, AdaptedModel) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        am = self._adapted()
        if am is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        am.save_pretrained(output_dir, state_dict=state_dict)
        if self.processing_class is not None:      # as Trainer._save: the tokenizer beside it
            self.processing_class.save_pretrained(output_dir)
        commit_files(output_dir, {TRAINING_ARGS_NAME: functools.partial(_save_args, self.args)})
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        am = self._adapted(model)
        if am is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        restore_pretrained(am, resume_from_checkpoint)
        return None

    def _load_best_model(self) -> None:
        am = self._adapted()
        if am is None:
            return super()._load_best_model()
        restore_pretrained(am, self.state.best_model_checkpoint)
        return None


def _save_args(args: Any, path: Path) -> None:
    # Trainer's own training_args.bin (a torch pickle that only transformers reads back), written
    # through our atomic writer like every file peftlab writes.
    torch.save(args, path)
