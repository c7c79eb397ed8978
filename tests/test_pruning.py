"""Light-PEFT early pruning: masks, importance estimators, structural pruning of the base model and
of LoRA, the prune plan, and an estimation run through the real training loop."""

from __future__ import annotations

import fnmatch
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import BUILDERS, VOCAB, logits, tiny_bert, tiny_llama
from test_train import TRAIN, LMTask, cfg
from torch import nn

import peftlab
from peftlab.core.errors import (
    AdapterError,
    CapabilityError,
    CheckpointError,
    ConfigError,
    PeftlabError,
)
from peftlab.training.pruning import (
    L1_TERM,
    MASK_GLOB,
    EarlyPruning,
    PrunePlan,
    PruneRatios,
    find_blocks,
    load_plan,
    lowest_at_quantile,
    parse_prune_spec,
    prune_adapter,
    save_plan,
)
from peftlab.training.loop import train

TARGETS = {
    "bert": ["attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.down"],
    "llama": ["attn.q", "attn.k", "attn.v", "attn.o", "ffn.gate", "ffn.up", "ffn.down"],
    "gpt2": ["attn.qkv", "attn.o", "ffn.up", "ffn.down"],
}


def make_am(arch: str, *, seed: int = 0, r: int = 4, rslora: bool = False, init: str = "random",
            targets: list[str] | None = None) -> peftlab.AdaptedModel:
    am = peftlab.adapt(BUILDERS[arch](seed))
    torch.manual_seed(seed + 100)
    am.add_adapter("a", peftlab.LoraConfig(r=r, alpha=2 * r, rslora=rslora, init=init,
                                           targets=targets or TARGETS[arch]))
    am.set_active(["a"])
    am.set_trainable("a")
    return am


def dense_deltas(am: peftlab.AdaptedModel) -> dict[str, torch.Tensor]:
    """Site path -> ΔW (d_out, d_in) of adapter 'a'."""
    return {p: layer.deltas["a"].delta_weight().detach().clone() for p, layer in am.adapters["a"].layers.items()}


def zero_masks(am: peftlab.AdaptedModel) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """Set chosen mask entries to 0 (the rest stay 1): one key/value group of heads per layer
    and three neurons per layer. Returns (layer -> zeroed heads, layer -> zeroed neurons)."""
    heads, neurons = {}, {}
    with torch.no_grad():
        for b in find_blocks(am.model):
            group = b.layer % b.n_kv_heads
            heads[b.layer] = list(range(group * b.group, (group + 1) * b.group))
            neurons[b.layer] = [1, 5, 7 + b.layer]
            am.pruning_masks.heads[str(b.layer)][heads[b.layer]] = 0.0
            am.pruning_masks.neurons[str(b.layer)][neurons[b.layer]] = 0.0
    return heads, neurons


def exact_ratios(am: peftlab.AdaptedModel, zeroed_neurons: int, **kw) -> PruneRatios:
    """Ratios whose quantile thresholds fall between the zeroed masks (0) and the rest (1):
    one group of heads per layer and exactly the zeroed neurons."""
    blocks = find_blocks(am.model)
    n_groups, n_neurons = blocks[0].n_kv_heads, sum(b.d_ff for b in blocks)
    kw.setdefault("modules", 0.0)        # whole-module pruning is tested on its own
    return PruneRatios(heads=0.5 / (n_groups - 1), neurons=(zeroed_neurons - 0.5) / (n_neurons - 1), **kw)


def base_drop(am: peftlab.AdaptedModel, heads: dict[int, list[int]], neurons: dict[int, list[int]]) -> tuple[int, int]:
    """(base parameters, LoRA parameters) that removing these heads and neurons must free,
    computed from the unpruned modules' shapes."""
    modules = dict(am.model.named_modules())
    base = lora = 0

    def rows_gone(path: str, n: int) -> None:     # n output features of the projection at path
        nonlocal base, lora
        plain = modules[path + ".base_layer"] if path + ".base_layer" in modules else modules[path]
        d_in = plain.weight.shape[0] if type(plain).__name__ == "Conv1D" else plain.weight.shape[1]
        base += n * d_in + (n if plain.bias is not None else 0)
        if path + ".deltas.a" in modules:
            lora += n * modules[path + ".deltas.a"].r

    def cols_gone(path: str, n: int) -> None:
        nonlocal base, lora
        plain = modules[path + ".base_layer"] if path + ".base_layer" in modules else modules[path]
        d_out = plain.weight.shape[1] if type(plain).__name__ == "Conv1D" else plain.weight.shape[0]
        base += n * d_out
        if path + ".deltas.a" in modules:
            lora += n * modules[path + ".deltas.a"].r

    for b in find_blocks(am.model):
        h = len(heads.get(b.layer, []))
        if b.qkv:
            rows_gone(b.qkv, 3 * h * b.head_dim)
        else:
            rows_gone(b.q, h * b.head_dim)
            rows_gone(b.k, h // b.group * b.head_dim)
            rows_gone(b.v, h // b.group * b.head_dim)
        cols_gone(b.o, h * b.head_dim)
        n = len(neurons.get(b.layer, []))
        for path in (b.up, b.gate):
            if path:
                rows_gone(path, n)
        cols_gone(b.down, n)
    return base, lora


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


# ---- masks --------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_fresh_masks_leave_logits_bit_equal(arch, ids):
    am = make_am(arch)
    before = logits(am, ids)
    ep = EarlyPruning(am, "a", estimate_steps=4)
    ep.start()
    assert torch.equal(logits(am, ids), before)
    blocks = find_blocks(am.model)
    assert [m.shape[0] for m in am.pruning_masks.heads.values()] == [b.n_heads for b in blocks]
    assert [m.shape[0] for m in am.pruning_masks.neurons.values()] == [b.d_ff for b in blocks]
    ep.detach()
    assert "pruning_masks" not in dict(am.named_children()) and L1_TERM not in am.loss_terms
    assert torch.equal(logits(am, ids), before)


def test_masks_are_named_trainable_parameters_with_an_l1_term():
    am = make_am("llama")
    ep = EarlyPruning(am, "a", l1=1e-3, mask_lr_scale=50.0, estimate_steps=4)
    ep.start()
    names = [n for n, p in am.named_parameters() if fnmatch.fnmatchcase(n, MASK_GLOB)]
    assert len(names) == 2 * len(find_blocks(am.model)) and all(n.startswith("pruning_masks.") for n in names)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in am.pruning_masks.parameters())
    assert ep.lr_scale == {MASK_GLOB: 50.0}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in am.pruning_masks.parameters():
            m.copy_(torch.randn(m.shape, generator=g))
    total, parts = am.auxiliary_loss()
    masks = list(am.pruning_masks.parameters())
    expected = 1e-3 * sum(float(m.detach().abs().sum()) for m in masks)
    assert math.isclose(float(total.detach()), expected, rel_tol=1e-5) and parts[L1_TERM] == pytest.approx(expected)
    total.backward()
    for m in masks:
        torch.testing.assert_close(m.grad, 1e-3 * m.detach().sign())


def test_head_mask_scales_one_heads_context(ids):
    """Zeroing head j's mask equals zeroing the value projection of head j (its context)."""
    am = make_am("bert", init="zero")
    ep = EarlyPruning(am, "a", PruneRatios(heads=0.3, neurons=0.0, ranks=0.0), estimate_steps=4)
    ep.start()
    with torch.no_grad():
        am.pruning_masks.heads["1"][2] = 0.0
    masked = logits(am, ids)
    ep.detach()
    b = find_blocks(am.model)[1]
    value = am.model.get_submodule(b.v).base_layer
    with torch.no_grad():
        value.weight[2 * b.head_dim:3 * b.head_dim] = 0.0
        value.bias[2 * b.head_dim:3 * b.head_dim] = 0.0
    torch.testing.assert_close(logits(am, ids), masked, atol=1e-6, rtol=0)


# ---- structural pruning ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_pruning_removes_exactly_the_masked_structures(arch, ids):
    am = make_am(arch)
    dense = dense_deltas(am)
    blocks = find_blocks(am.model)
    ep = EarlyPruning(am, "a", exact_ratios(am, 3 * len(blocks), ranks=0.0), estimate_steps=4)
    ep.start()
    heads, neurons = zero_masks(am)
    masked = logits(am, ids)
    base_before, lora_before = am.base_parameters(), am.num_parameters("a")
    expect_base, expect_lora = base_drop(am, heads, neurons)

    plan = ep.finish()

    assert plan.heads == heads and plan.neurons == neurons
    torch.testing.assert_close(logits(am, ids), masked, atol=1e-5, rtol=0)
    assert am.base_parameters() == base_before - expect_base
    assert am.num_parameters("a") == lora_before - expect_lora
    # the masks, their hooks and their loss term are gone
    assert "pruning_masks" not in dict(am.named_children()) and L1_TERM not in am.loss_terms
    head = am.model.get_output_embeddings()      # adapt()'s own hook on it stays until unload
    assert not any(m._forward_pre_hooks for m in am.modules() if m is not head)
    # plain projections of the smaller size, and LoRA sliced like the dense ΔW
    pruned = {b.layer: b for b in find_blocks(am.model)}
    for b in blocks:
        p = pruned[b.layer]
        assert p.n_heads == b.n_heads - len(heads[b.layer]) and p.d_ff == b.d_ff - len(neurons[b.layer])
        q_keep = [h for h in range(b.n_heads) if h not in heads[b.layer]]
        q_rows = torch.tensor([h * b.head_dim + d for h in q_keep for d in range(b.head_dim)])
        kv_rows = torch.tensor([g * b.head_dim + d for g in range(b.n_kv_heads) if g * b.group not in heads[b.layer]
                                for d in range(b.head_dim)])
        f_keep = torch.tensor([i for i in range(b.d_ff) if i not in neurons[b.layer]])
        expected = {b.o: dense[b.o][:, q_rows], b.up: dense[b.up][f_keep], b.down: dense[b.down][:, f_keep]}
        if b.qkv:
            width = b.n_heads * b.head_dim
            expected[b.qkv] = dense[b.qkv][torch.cat([q_rows + i * width for i in range(3)])]
        else:
            expected |= {b.q: dense[b.q][q_rows], b.k: dense[b.k][kv_rows], b.v: dense[b.v][kv_rows]}
        if b.gate:
            expected[b.gate] = dense[b.gate][f_keep]
        for path, want in expected.items():
            layer = am.model.get_submodule(path)
            assert type(layer.base_layer).__name__ in ("Linear", "Conv1D")
            torch.testing.assert_close(layer.deltas["a"].delta_weight(), want, atol=1e-6, rtol=0)
            assert layer.weight_out_in().shape == want.shape


def test_grouped_query_attention_is_pruned_by_whole_groups():
    model = tiny_llama(0)
    with pytest.raises(ConfigError, match="whole groups"):
        PrunePlan(heads={0: [1]}).apply(model)
    with pytest.raises(ConfigError, match="every attention head"):
        PrunePlan(heads={0: [0, 1, 2, 3]}).apply(model)
    blocks = find_blocks(model)
    # mean of the group's masks decides: group 1 (heads 2, 3) has the lower mean
    masks = {b.layer: torch.tensor([0.9, 0.1, 0.4, 0.5]) for b in blocks}
    from peftlab.training.pruning import plan_from_masks
    plan = plan_from_masks(blocks, masks, {}, PruneRatios(heads=0.4, neurons=0.0, ranks=0.0))
    assert plan.heads == {b.layer: [2, 3] for b in blocks}


def test_quantile_rule_with_ties_never_prunes_everything():
    assert lowest_at_quantile(torch.tensor([0.3, 0.1, 0.9, 0.5, 0.7, 0.2]), 1 / 3) == [1, 5]
    assert lowest_at_quantile(torch.ones(12), 1 / 3) == [0, 1, 2, 3]     # ties: as many as distinct values
    assert lowest_at_quantile(torch.ones(4), 0.9) == [0, 1, 2]
    assert lowest_at_quantile(torch.rand(5), 0.0) == []


@pytest.mark.parametrize("rslora", [False, True])
def test_rank_pruning_keeps_outputs_and_scaling_when_pruned_units_are_zero(rslora, ids):
    am = make_am("bert", r=4, rslora=rslora)
    layers = dict(am.adapters["a"].layers)
    paths = list(layers)
    keep = {paths[0]: [0, 2], paths[1]: [3], paths[2]: []}          # paths[2] is dropped whole
    with torch.no_grad():
        for path, kept in keep.items():
            for i in set(range(4)) - set(kept):
                layers[path].deltas["a"].lora_B[:, i] = 0.0
    scaling = {p: layers[p].deltas["a"].scaling for p in paths}
    before, n_before = logits(am, ids), am.num_parameters("a")
    prune_adapter(am, "a", keep_ranks=keep)
    torch.testing.assert_close(logits(am, ids), before, atol=1e-6, rtol=0)
    assert paths[2] not in am.adapters["a"].layers and paths[2] in am.adapters["a"].config.exclude
    assert not isinstance(am.model.get_submodule(paths[2]), peftlab.AdaptedLayer)   # plain Linear again
    for path in paths[:2]:
        delta = layers[path].deltas["a"]
        assert delta.r == len(keep[path]) == delta.lora_A.shape[0] == delta.lora_B.shape[1]
        assert delta.scaling == pytest.approx(scaling[path], rel=1e-12)
    d = {p: layers[p].in_features + layers[p].out_features for p in paths}
    assert am.num_parameters("a") == n_before - 2 * d[paths[0]] - 3 * d[paths[1]] - 4 * d[paths[2]]
    config = am.adapters["a"].config
    for site in am.adapters["a"].sites:   # the config alone reproduces every kept site's shape and scaling
        assert config.rank_for(site) == layers[site.path].deltas["a"].r
        assert config.scaling_for(site) == layers[site.path].deltas["a"].scaling
    with pytest.raises(ConfigError, match="distinct rank units"):
        prune_adapter(am, "a", keep_ranks={paths[0]: [0, 7]})
    with pytest.raises(ConfigError, match="no site"):
        prune_adapter(am, "a", drop=["bert.encoder.layer.9.attention.self.query"])


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_pruned_adapter_and_plan_reload_onto_a_fresh_base(arch, ids, tmp_path):
    am = make_am(arch)
    blocks = find_blocks(am.model)
    ep = EarlyPruning(am, "a", exact_ratios(am, 3 * len(blocks), ranks=0.0), estimate_steps=4)
    ep.start()
    zero_masks(am)
    plan = ep.finish()
    paths = list(am.adapters["a"].layers)
    prune_adapter(am, "a", keep_ranks={paths[0]: [1, 2], paths[-1]: [0]}, drop=[paths[1]])
    expected = logits(am, ids)
    am.save_adapter(tmp_path, "a")
    save_plan(tmp_path, plan)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                          "peftlab.json", "prune_plan.json"]

    fresh = BUILDERS[arch](0)
    loaded = load_plan(tmp_path)
    assert loaded == plan
    loaded.apply(fresh)
    am2 = peftlab.adapt(fresh)
    am2.load_adapter(tmp_path, "a")
    am2.set_active(["a"])
    torch.testing.assert_close(logits(am2, ids), expected, atol=1e-6, rtol=0)
    assert am2.base_parameters() == am.base_parameters() and am2.num_parameters("a") == am.num_parameters("a")
    # the saved config alone builds the same shapes on the pruned base
    am2.add_adapter("again", am.adapters["a"].config)
    shapes = lambda name: {k: v.shape for k, v in am2.adapter_tensors(name).items()}
    assert shapes("again") == shapes("a")
    with pytest.raises(CheckpointError, match="already pruned"):   # a plan applies once
        loaded.apply(fresh)


def test_plan_json_round_trip_and_errors(tmp_path):
    plan = PrunePlan(heads={0: [1], 1: [0, 3]}, neurons={1: [4, 5]}, n_heads={0: 4, 1: 4}, d_ff={0: 48, 1: 48})
    assert PrunePlan.from_json(plan.to_json()) == plan
    assert plan.describe() == "heads 3/8 pruned, neurons 2/96 pruned"
    assert load_plan(tmp_path, missing_ok=True) is None
    with pytest.raises(CheckpointError, match="prune_plan.json does not exist"):
        load_plan(tmp_path)
    (tmp_path / "prune_plan.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_plan(tmp_path)
    with pytest.raises(CheckpointError, match="not a peftlab prune plan"):
        PrunePlan.from_json('{"heads": {}}')
    with pytest.raises(CheckpointError, match="layer 5"):
        PrunePlan(neurons={5: [0]}).apply(tiny_bert(0))


# ---- importance estimators ------------------------------------------------------------------------
def test_importance_estimators_match_a_dense_computation():
    am = make_am("bert", r=4)
    ep = EarlyPruning(am, "a", PruneRatios(heads=0.0, neurons=0.0, ranks=0.5, modules=0.5), estimate_steps=2)
    ep.start()
    layers = am.adapters["a"].layers
    inputs: dict[str, torch.Tensor] = {}
    grabs = [layer.base_layer.register_forward_hook(
        lambda m, a, o, p=path: inputs.__setitem__(p, a[0].detach())) for path, layer in layers.items()]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0                      # padding: excluded from the output ratio
    mask[2, 3:] = 0
    labels = torch.tensor([0, 2, 1])
    am.train()
    for step in range(2):                # step 0 is the first half (not recorded), step 1 counts
        am.zero_grad(set_to_none=True)
        am(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    for h in grabs:
        h.remove()

    real = mask.bool()
    module_scores, rank_scores = ep.module_importance.scores(), ep.rank_importance.scores()
    for path, layer in layers.items():
        x, delta, base = inputs[path], layer.deltas["a"], layer.base_layer
        ratio = (x @ delta.delta_weight().detach().T).norm(dim=-1) / F.linear(x, base.weight, base.bias).norm(dim=-1).detach()
        assert module_scores[path] == pytest.approx(float(ratio[real].mean()), rel=1e-5)
        assert module_scores[path] != pytest.approx(float(ratio.mean()), rel=1e-3)   # padding mattered
        A, B = delta.lora_A, delta.lora_B
        taylor = (A * A.grad).mean(dim=1).abs() + (B * B.grad).mean(dim=0).abs()
        torch.testing.assert_close(rank_scores[path], taylor.detach(), rtol=1e-5, atol=1e-12)

    plan = ep.finish()
    assert plan.is_empty
    order = sorted(module_scores, key=module_scores.get)
    by_module, survivors = set(order[:len(order) // 2]), order[len(order) // 2:]
    # the least important half goes as modules; a survivor whose every rank unit goes is dropped too
    assert ep.dropped == by_module | {p for p in survivors if p not in ep.kept_ranks}
    assert set(am.adapters["a"].layers) == set(ep.kept_ranks) and not by_module & set(ep.kept_ranks)
    units = torch.cat([rank_scores[p] for p in survivors])
    assert sum(len(v) for v in ep.kept_ranks.values()) == len(units) - len(units) // 2
    kept_scores = torch.cat([rank_scores[p][ep.kept_ranks[p]] for p in ep.kept_ranks])
    assert float(kept_scores.min()) >= float(units.sort().values[len(units) // 2 - 1])


def test_importance_must_be_recorded_before_finish():
    am = make_am("bert")
    ep = EarlyPruning(am, "a", PruneRatios(heads=0.0, neurons=0.0, ranks=0.5), estimate_steps=10)
    with pytest.raises(AdapterError, match="before start"):
        ep.finish()
    ep.start()
    with pytest.raises(AdapterError, match="already called"):
        ep.start()
    am.train()
    am(input_ids=torch.ones(1, 4, dtype=torch.long), labels=torch.tensor([0])).loss.backward()
    with pytest.raises(PeftlabError, match="only 1 training forwards ran"):
        ep.finish()


def _estimate(grad_accum: int, zero_every_micro: bool = False):
    """Two optimisation steps of global batch 4 on a tiny Llama (no dropout), split into
    `grad_accum` micro-batches with the loss divided by it, as the training loop does; SGD."""
    am = make_am("llama", r=4)
    ep = EarlyPruning(am, "a", PruneRatios(heads=0.0, neurons=0.0, ranks=0.5, modules=0.5),
                      estimate_steps=2, grad_accum=grad_accum)
    ep.start()
    opt = torch.optim.SGD(am.adapter_parameters("a"), lr=0.5)
    g = torch.Generator().manual_seed(5)
    am.train()
    for _ in range(2):
        ids = torch.randint(1, VOCAB, (4, 8), generator=g)
        for chunk in ids.chunk(grad_accum):
            (am(input_ids=chunk, labels=chunk).loss / grad_accum).backward()
            if zero_every_micro:
                opt.step()
                opt.zero_grad(set_to_none=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return ep


def test_rank_scores_do_not_depend_on_the_micro_batch_split():
    """grad_accum 1 with batch 4 and grad_accum 2 with batch 2: the same gradients per step, so
    the same Taylor scores (scored once per step, on the whole step's gradient)."""
    one, two = _estimate(1), _estimate(2)
    r1, r2 = one.rank_importance.scores(), two.rank_importance.scores()
    assert r1.keys() == r2.keys() and len(r1) == 14
    for path in r1:
        assert r1[path].abs().max() > 0
        torch.testing.assert_close(r2[path], r1[path], rtol=1e-4, atol=1e-9)
    # one record per recorded optimisation step (the second of two), not one per micro-batch
    assert set(two.rank_importance.counts.values()) == {1}
    m1, m2 = one.module_importance.scores(), two.module_importance.scores()
    for path in m1:
        assert m2[path] == pytest.approx(m1[path], rel=1e-4)


def test_rank_scores_refuse_a_wrong_grad_accum():
    ep = _estimate(2, zero_every_micro=True)     # the loop stepped after every micro-batch
    with pytest.raises(PeftlabError, match="grad_accum=2"):
        ep.finish()


def test_defaults_are_the_papers():
    """Light-PEFT's ratios (specs/seed-methods.md §5): heads and neurons 1/3, ranks 0.5, modules 0.75."""
    r = PruneRatios()
    assert (r.heads, r.neurons, r.ranks, r.modules) == (pytest.approx(1 / 3), pytest.approx(1 / 3), 0.5, 0.75)
    assert EarlyPruning(make_am("bert"), "a", estimate_steps=2).ratios == r


# ---- configuration errors ------------------------------------------------------------------------
def test_parse_prune_spec():
    r = parse_prune_spec("heads=0.33, neurons=1/3,ranks=0.5,modules=0")
    assert (r.heads, r.neurons, r.ranks, r.modules) == (0.33, pytest.approx(1 / 3), 0.5, 0.0)
    assert parse_prune_spec("ranks=0.25") == PruneRatios(heads=0.0, neurons=0.0, ranks=0.25, modules=0.0)
    assert parse_prune_spec("none") == PruneRatios(0.0, 0.0, 0.0, 0.0)
    with pytest.raises(ConfigError, match="did you mean 'heads'"):
        parse_prune_spec("head=0.3")
    with pytest.raises(ConfigError, match=r"in \[0, 1\)"):
        parse_prune_spec("neurons=1")
    with pytest.raises(ConfigError, match=r"in \[0, 1\)"):
        parse_prune_spec("ranks=-0.1")
    with pytest.raises(ConfigError, match="such as 0.33"):
        parse_prune_spec("heads=lots")
    with pytest.raises(ConfigError, match="not 'key=ratio'"):
        parse_prune_spec("heads")
    with pytest.raises(ConfigError, match="twice"):
        parse_prune_spec("heads=0.1,heads=0.2")


def test_unsupported_adapters_and_settings_are_refused():
    am = peftlab.adapt(tiny_bert(0))
    am.add_adapter("ia3", peftlab.IA3Config())
    with pytest.raises(CapabilityError, match="LoRA"):
        EarlyPruning(am, "ia3", estimate_steps=4)
    am.add_adapter("d", peftlab.LoraConfig(dora=True))
    with pytest.raises(CapabilityError, match="DoRA"):
        EarlyPruning(am, "d", estimate_steps=4)
    am.add_adapter("a", peftlab.LoraConfig(targets=["ffn.down"]))
    with pytest.raises(ConfigError, match="estimate_steps"):
        EarlyPruning(am, "a", estimate_steps=0)
    with pytest.raises(ConfigError, match="mask_lr_scale"):
        EarlyPruning(am, "a", mask_lr_scale=0.0, estimate_steps=4)
    ep = EarlyPruning(am, "a", PruneRatios(heads=0.0, neurons=0.3, ranks=0.0), estimate_steps=4)
    with pytest.raises(CapabilityError, match="IA3Delta"):   # IA3 sits on ffn.down: not sliceable
        ep.start()
    assert "pruning_masks" not in dict(am.named_children())


# ---- the estimation run through the training loop -------------------------------------------------
def test_estimation_training_lowers_the_loss_moves_the_masks_and_prunes():
    am = make_am("llama", init="zero")
    steps = 16
    ep = EarlyPruning(am, "a", PruneRatios(heads=0.4, neurons=1 / 3, ranks=0.5, modules=0.0), mask_lr_scale=2.0,
                      estimate_steps=steps)
    ep.start()
    result = train(am, "a", LMTask(), TRAIN, None, cfg(steps=steps, lr_scale=ep.lr_scale))
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < first - 0.2
    moved = torch.cat([(m.detach() - 1).abs() for m in am.pruning_masks.parameters()])
    assert float(moved.min()) > 0 and float(moved.mean()) > 1e-3
    assert ep.rank_importance.recorded and ep.window.step == steps - 1
    params_before = am.base_parameters()
    plan = ep.finish()
    blocks = find_blocks(am.model)
    assert all(b.n_heads == 2 for b in blocks)               # one of two key/value groups per layer went
    assert sum(len(v) for v in plan.neurons.values()) == math.floor((2 * 48 - 1) / 3) + 1
    assert am.base_parameters() < params_before
    assert sum(d.r for d in (layer.deltas["a"] for layer in am.adapters["a"].layers.values())) \
        == 4 * 7 * 2 - (4 * 7 * 2) // 2
    # phase T: the slimmer model keeps training with a fresh optimiser
    again = train(am, "a", LMTask(), TRAIN, None, cfg(steps=4))
    assert all(math.isfinite(x) for x in again.losses)
    assert isinstance(am.model.model.layers[0].self_attn.o_proj.base_layer, nn.Linear)
