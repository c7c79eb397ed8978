"""`EarlyPruning`: Light-PEFT's estimate → prune sequence around an ordinary training run, tying
the masks, the importance estimators, the base-model plan and the adapter pruning together."""

from __future__ import annotations

import math

from ...core.errors import AdapterError, CapabilityError, ConfigError, PeftlabError
from ...core.model import AdaptedModel
from ...methods.lora import LoraConfig
from .adapter import prune_adapter, select_modules, select_ranks
from .blocks import find_blocks
from .importance import ModuleImportance, RankImportance, StepWindow
from .masks import (
    L1_TERM,
    MASK_GLOB,
    PruningMasks,
    attach_masks,
    detach_masks,
    mask_l1_term,
)
from .plan import PrunePlan, plan_from_masks
from .slicing import check_blocks_sliceable
from .spec import PruneRatios


class EarlyPruning:
    """Light-PEFT's estimate → prune sequence around an ordinary training run.

    `start()` attaches the masks (only for the kinds with a ratio > 0), their L1 term and the
    importance recorders; train the adapter for `estimate_steps` optimisation steps (with
    `grad_accum` micro-batches each) passing `TrainConfig(lr_scale=ep.lr_scale)`; `finish()`
    prunes the base model and the adapter in place, removes everything `start` added, and
    returns the base model's `PrunePlan` (save it with `save_plan` beside the adapter).
    """

    def __init__(self, am: AdaptedModel, adapter: str, ratios: PruneRatios | None = None, *,
                 l1: float = 1e-4, mask_lr_scale: float = 1.0, estimate_steps: int,
                 grad_accum: int = 1) -> None:
        ad = am.adapter(adapter)
        if not isinstance(ad.config, LoraConfig) or ad.method.name != "lora" or ad.config.dora:
            raise CapabilityError(f"Light-PEFT early pruning needs a LoRA adapter without DoRA; "
                                  f"{adapter!r} is {ad.method.title}"
                                  + (" with DoRA" if getattr(ad.config, "dora", False) else ""))
        params = [s for s in ad.sites if s.params]
        if params:      # LoRA on parameters (MoE experts): no per-site rank units to prune
            raise CapabilityError(f"adapter {adapter!r} adapts parameters ({params[0].path}: "
                                  f"{', '.join(params[0].params)}); pruning supports LoRA on layers only")
        sliced = [s.path for s in ad.sites if s.slices]
        if sliced:     # rank units and output features of a sliced LoRA are per slice
            raise CapabilityError(f"Light-PEFT early pruning cannot prune LoRA {adapter!r} on slices of the "
                                  f"fused projection {sliced[0]!r} ({len(sliced)} such sites); target the "
                                  "whole projection ('attn.qkv') instead")
        for name, value in (("estimate_steps", estimate_steps), ("grad_accum", grad_accum)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"EarlyPruning {name} must be a positive integer, got {value!r}")
        for name, value in (("l1", l1), ("mask_lr_scale", mask_lr_scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (name == "mask_lr_scale" and value == 0):
                raise ConfigError(f"EarlyPruning {name} must be a finite number "
                                  f"{'> 0' if name == 'mask_lr_scale' else '>= 0'}, got {value!r}")
        self.am, self.adapter = am, adapter
        self.ratios = ratios if ratios is not None else PruneRatios()
        self.l1, self.mask_lr_scale = float(l1), float(mask_lr_scale)
        self.estimate_steps, self.grad_accum = estimate_steps, grad_accum
        self.masks: PruningMasks | None = None
        self.window: StepWindow | None = None
        self.module_importance: ModuleImportance | None = None
        self.rank_importance: RankImportance | None = None
        self._handles: list = []
        self.dropped: set[str] = set()                 # LoRA sites removed by finish()
        self.kept_ranks: dict[str, list[int]] = {}     # rank units each site kept

    @property
    def uses_masks(self) -> bool:
        """Whether heads or neurons are pruned (and so masks trained)."""
        return self.ratios.heads > 0 or self.ratios.neurons > 0

    @property
    def lr_scale(self) -> dict[str, float]:
        """{MASK_GLOB: mask_lr_scale} for TrainConfig.lr_scale (empty when no masks are used)."""
        return {MASK_GLOB: self.mask_lr_scale} if self.uses_masks else {}

    def start(self) -> None:
        """Attach masks, the L1 term and the importance recorders."""
        if self.window is not None:
            raise AdapterError("EarlyPruning.start() was already called; call finish() first")
        am = self.am
        if self.ratios.ranks > 0 and not am.adapter(self.adapter).trainable:
            raise AdapterError(f"rank importance reads the gradients of adapter {self.adapter!r}, which is "
                               f"frozen; call am.set_trainable({self.adapter!r}) before start()")
        # an unsupported model or adapter fails here, before the estimation run
        check_blocks_sliceable(am.model, find_blocks(am.model), heads=self.ratios.heads > 0,
                               neurons=self.ratios.neurons > 0)
        if self.uses_masks:
            self.masks, self._handles = attach_masks(am, heads=self.ratios.heads > 0,
                                                     neurons=self.ratios.neurons > 0)
            if self.l1 > 0:
                am.add_loss_term(mask_l1_term(self.masks, self.l1))
        self.window = StepWindow(am, self.estimate_steps, self.grad_accum)
        if self.ratios.modules > 0:
            self.module_importance = ModuleImportance(am, self.adapter, self.window)
        if self.ratios.ranks > 0:
            self.rank_importance = RankImportance(am, self.adapter, self.window)

    def detach(self) -> None:
        """Remove everything `start` attached, pruning nothing."""
        am = self.am
        detach_masks(am, self._handles)
        self._handles = []
        if L1_TERM in am.loss_terms:
            am.remove_loss_term(L1_TERM)
        for part in (self.window, self.module_importance, self.rank_importance):
            if part is not None:
                part.remove()
        self.window = self.module_importance = self.rank_importance = None
        self.masks = None

    def plan(self) -> PrunePlan:
        """The base-model plan the current mask values give (nothing changes)."""
        blocks = find_blocks(self.am.model)
        heads, neurons = self.masks.values() if self.masks is not None else ({}, {})
        return plan_from_masks(blocks, heads, neurons, self.ratios)

    def finish(self) -> PrunePlan:
        """Prune the base model (heads, neurons) and the adapter (modules, then rank units among
        the kept modules), detach the masks and recorders, and return the base-model plan."""
        if self.window is None:
            raise AdapterError("EarlyPruning.finish() before start(): call start() and train first")
        for ratio, recorder, what in ((self.ratios.modules, self.module_importance, "module"),
                                      (self.ratios.ranks, self.rank_importance, "rank")):
            if ratio > 0 and not recorder.recorded:
                raise PeftlabError(
                    f"no {what} importance was recorded: estimation records the second half of "
                    f"{self.estimate_steps} steps × {self.grad_accum} micro-batches, but only "
                    f"{self.window.step + 1} training forwards ran; train for estimate_steps first")
        if self.rank_importance is not None:
            self.rank_importance.check()
        plan = self.plan()
        drop = select_modules(self.module_importance.scores(), self.ratios.modules) \
            if self.module_importance is not None else set()
        rank_scores = self.rank_importance.scores() if self.rank_importance is not None else {}
        keep = select_ranks({p: s for p, s in rank_scores.items() if p not in drop}, self.ratios.ranks)
        self.detach()
        plan.apply(self.am)
        prune_adapter(self.am, self.adapter, keep_ranks=keep, drop=drop)
        self.dropped = drop | {p for p, k in keep.items() if not k}
        self.kept_ranks = {p: k for p, k in keep.items() if k}
        return plan
