"""Light-PEFT early pruning (Gu et al., 2024): masks on heads and FFN neurons, importance of LoRA
modules and rank units, and structural pruning of the base model and of the adapter.

Phase E (estimation): train the LoRA adapter for a few steps together with learnable masks —
per layer a head mask M^A (n_heads) on the input of the attention output projection and a
neuron mask M^F (d_ff) on the input of the FFN down projection (`masks`) — under an L1 penalty,
while two plug-in estimators record the importance of every LoRA module (‖ΔW x‖ / ‖W x + b‖) and
of every rank unit (first-order Taylor score) (`importance`). Then prune:

* heads: per layer, those whose mask is <= the layer's quantile at the ratio;
* neurons: those whose mask is <= the global quantile at the ratio;
* LoRA modules: the least important fraction, globally; rank units: likewise.

Pruning is structural and in place (`slicing`): the affected base projections stay plain
`nn.Linear` (GPT-2: `Conv1D`) modules, only smaller, and the LoRA tensors attached to them are
sliced to match (q/k/v: rows of B; attention output and FFN down: columns of A; FFN up/gate: rows
of B; rank units: rows of A and columns of B), each site keeping its scaling (`adapter`). The
base-model part is a `PrunePlan` (`plan`, saved as `prune_plan.json` beside the adapter) that
`PrunePlan.apply` replays on a freshly loaded base, so the pruned adapter loads onto it with
`load_adapter`. `EarlyPruning` (`early`) runs the whole sequence:

    ep = EarlyPruning(am, "a", parse_prune_spec("heads=0.33,neurons=0.33,ranks=0.5"), estimate_steps=100)
    ep.start()
    train(am, "a", task, rows, None, TrainConfig(steps=100, lr_scale=ep.lr_scale))
    plan = ep.finish()                      # am is now pruned; train on for phase T
    am.save_adapter(out, "a"); save_plan(out, plan)

Grouped-query attention (Llama with fewer key/value heads than query heads) is pruned by whole
key/value groups: a group's score is the mean of its query heads' mask values, and the per-layer
quantile is taken over group scores, so every layer keeps the same number of query heads per
key/value head and the attention module's forward needs no change. Multi-head attention is the
case of groups of one head. Ties at a quantile threshold prune no more entries than distinct
values would (`lowest_at_quantile`), so at least one head group per layer stays, and the
global neuron rule always spares a layer's best neuron.

Modules: `spec` (ratios), `blocks` (the layers' module paths and current sizes), `masks`,
`importance`, `plan`, `slicing`, `adapter` and `early`, in the order they depend on each other.
"""

from __future__ import annotations

from .adapter import prune_adapter, select_modules, select_ranks
from .blocks import Block, find_blocks
from .early import EarlyPruning
from .importance import (
    ModuleImportance,
    RankImportance,
    StepWindow,
    lora_branch,
    output_ratio,
    taylor_rank_scores,
)
from .masks import (
    L1_TERM,
    MASK_GLOB,
    MASK_MODULE,
    PruningMasks,
    attach_masks,
    detach_masks,
    mask_l1_term,
)
from .plan import (
    PLAN_FILE,
    PrunePlan,
    load_plan,
    lowest_at_quantile,
    plan_from_masks,
    save_plan,
)
from .spec import RATIO_KEYS, PruneRatios, parse_prune_spec

__all__ = [
    "L1_TERM",
    "MASK_GLOB",
    "MASK_MODULE",
    "PLAN_FILE",
    "RATIO_KEYS",
    "Block",
    "EarlyPruning",
    "ModuleImportance",
    "PrunePlan",
    "PruneRatios",
    "PruningMasks",
    "RankImportance",
    "StepWindow",
    "attach_masks",
    "detach_masks",
    "find_blocks",
    "load_plan",
    "lora_branch",
    "lowest_at_quantile",
    "mask_l1_term",
    "output_ratio",
    "parse_prune_spec",
    "plan_from_masks",
    "prune_adapter",
    "save_plan",
    "select_modules",
    "select_ranks",
    "taylor_rank_scores",
]
