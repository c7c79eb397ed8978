"""Checks the method test files share: perturbing an adapter, training it a few steps, snapshotting
what must not move, the save/load round trip, and the prompt/prefix forward and generate checks.

Imported as `from method_checks import ...`, like `conftest`. Not a test file: it collects nothing."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import pytest
import torch
from conftest import VOCAB, logits

import peftlab

# `pytestmark` of test modules whose forwards (transformers, peft) warn on the tiny models
QUIET = [pytest.mark.filterwarnings("ignore::UserWarning"),
         pytest.mark.filterwarnings("ignore::RuntimeWarning")]

# ---- inputs and outputs ---------------------------------------------------------------------------


def rand_ids(b: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (b, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def forward_logits(model, ids: torch.Tensor, **kw) -> torch.Tensor:
    return model(input_ids=ids, **kw).logits


def hidden(model, ids: torch.Tensor) -> torch.Tensor:
    """The last hidden state: BERT's classification logits are tiny at init, so comparisons of
    adapted and base outputs also look here."""
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-1]


def labels_for(am, ids: torch.Tensor, bert_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Causal LMs predict their own ids; BERT classifies: `bert_labels`, or ids[:, 0] % 3."""
    if am.config.model_type == "bert":
        return ids[:, 0] % 3 if bert_labels is None else bert_labels
    return ids


def with_adapter(build: Callable, name: str, config) -> peftlab.AdaptedModel:
    """A fresh model from `build` with one adapter, active."""
    am = peftlab.adapt(build())
    am.add_adapter(name, config)
    am.set_active(name)
    return am


def adapted_with(config_cls, name: str = "p", **defaults) -> Callable[..., peftlab.AdaptedModel]:
    """`make(build, **kw)`: `with_adapter(build, name, config_cls(**defaults, **kw))`."""
    def make(build: Callable, **kw) -> peftlab.AdaptedModel:
        return with_adapter(build, name, config_cls(**{**defaults, **kw}))
    return make


def adapter_and_other(build: Callable, config, other) -> peftlab.AdaptedModel:
    """A fresh model with adapter "a" (active and trainable) beside an adapter "other"."""
    am = peftlab.adapt(build())
    am.add_adapter("a", config)
    am.add_adapter("other", other)
    am.set_active("a")
    am.set_trainable("a")
    return am


def perturb(am, name: str, seed: int = 0, *, scale: float, offset: float = 0.0) -> None:
    """Set every tensor of the adapter to offset + scale·N(0, 1), from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in am.adapter_tensors(name).values():
            t.copy_(offset + scale * torch.randn(t.shape, generator=g))


def assert_fresh_adapter_is_base(build: Callable, config, ids: torch.Tensor) -> peftlab.AdaptedModel:
    """A freshly added, active adapter gives the base model's logits bit for bit."""
    model = build()
    base = logits(model, ids)
    am = peftlab.adapt(model)
    am.add_adapter("a", config)
    am.set_active("a")
    assert torch.equal(logits(am, ids), base)
    return am


# ---- merging --------------------------------------------------------------------------------------


def check_merge_unmerge_and_disable(build: Callable, config, ids: torch.Tensor, perturb: Callable, *,
                                    base_atol: float = 1e-5):
    """Adapter "a" (`perturb(am, "a")`) active on a fresh `build()`: disabled() gives the base's
    logits bit for bit, and the adapter moves the last hidden state by more than 1e-2; merge and
    then unmerge each keep the logits and the hidden state within 1e-5; afterwards disabled() is
    within `base_atol` of the base's logits. Returns (am, the base model's parameters as they were
    before adapting)."""
    model = build()
    base = logits(model, ids)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    am = peftlab.adapt(model)
    am.add_adapter("a", config)
    am.set_active("a")
    perturb(am, "a")
    out, out_h = logits(am, ids), hidden(am, ids)
    with am.disabled():
        assert torch.equal(logits(am, ids), base)
        assert (hidden(am, ids) - out_h).abs().max() > 1e-2
    for step in (am.merge, am.unmerge):
        step("a")
        torch.testing.assert_close(logits(am, ids), out, rtol=0, atol=1e-5)
        torch.testing.assert_close(hidden(am, ids), out_h, rtol=0, atol=1e-5)
    with am.disabled():
        torch.testing.assert_close(logits(am, ids), base, rtol=0, atol=base_atol)
    return am, before


# ---- training -------------------------------------------------------------------------------------


def base_params(am) -> dict[str, torch.Tensor]:
    """The base model's parameters by their original names (wrappers add '.base_layer')."""
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in am.model.named_parameters()
            if ".deltas." not in k}


def snapshot_base(am) -> dict[str, torch.Tensor]:
    """Clones of the base model's state (parameters and buffers) by their original names; the
    adapters' deltas are left out."""
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in am.model.state_dict().items()
            if ".deltas." not in k}


def snapshot_adapter(am, name: str) -> dict[tuple[str, str], torch.Tensor]:
    return {k: t.detach().clone() for k, t in am.adapter_tensors(name).items()}


def train_a_few_steps(am, name: str, ids: torch.Tensor, labels: torch.Tensor, steps: int = 5,
                      lr: float = 1e-2, **forward_kwargs) -> list[float]:
    """Adam on the adapter's parameters; the loss of each step, before its update."""
    opt = torch.optim.Adam(list(am.adapter_parameters(name)), lr=lr)
    losses = []
    for _ in range(steps):
        loss = am(input_ids=ids, labels=labels, **forward_kwargs).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_only_adapter_changed(am, name: str, base: dict[str, torch.Tensor],
                                start: dict[tuple[str, str], torch.Tensor] | None = None,
                                others: dict[str, dict] | None = None, *, changed: str = "all") -> None:
    """The base model (as `snapshot_base` took it) and the `others` adapters are bit-exactly as
    they were; adapter `name` moved: `changed` is "all" (every tensor differs from `start`),
    "any" (some tensor does) or "nonzero" (every tensor has left zero)."""
    for k, v in snapshot_base(am).items():
        assert torch.equal(v, base[k]), k
    for other, before in (others or {}).items():
        assert all(torch.equal(t, before[k]) for k, t in am.adapter_tensors(other).items()), other
    now = am.adapter_tensors(name)
    if changed == "nonzero":
        assert all(t.abs().max() > 0 for t in now.values())
    elif changed == "any":
        assert any(not torch.equal(t, start[k]) for k, t in now.items())
    else:
        assert all(not torch.equal(t, start[k]) for k, t in now.items())


def assert_trainable_is_exactly(am, name: str) -> None:
    """Only adapter `name`'s parameters have gradients."""
    mine = {id(p) for p in am.adapter_parameters(name)}
    assert {id(p) for p in am.parameters() if p.requires_grad} == mine


def check_training(am, name: str, ids: torch.Tensor, labels: torch.Tensor, *, others: Iterable[str] = (),
                   changed: str = "all", margin: float = 0.0, **train_kwargs) -> list[float]:
    """Train adapter `name` a few steps (`train_a_few_steps`): the last loss is below the first
    (by more than `margin`), and only the adapter's tensors moved."""
    base, start = snapshot_base(am), snapshot_adapter(am, name)
    before = {o: snapshot_adapter(am, o) for o in others}
    losses = train_a_few_steps(am, name, ids, labels, **train_kwargs)
    assert losses[-1] < losses[0] - margin, losses
    assert_only_adapter_changed(am, name, base, start, before, changed=changed)
    return losses


def check_training_beside_other(build: Callable, config_cls, ids: torch.Tensor, *, changed: str) -> None:
    """`check_training` of adapter "a" beside an adapter "other" (both `config_cls()`), in eval
    mode (no dropout in the tiny models: a deterministic loss curve), 5 steps of Adam at 1e-2;
    BERT's labels are [0, 2]."""
    am = adapter_and_other(build, config_cls(), config_cls())
    am.eval()
    check_training(am, "a", ids, labels_for(am, ids, torch.tensor([0, 2])), others=["other"],
                   changed=changed)


# ---- checkpoints ----------------------------------------------------------------------------------


def assert_save_load_bit_exact(am, name: str, build: Callable, tmp_path, ids: torch.Tensor,
                               load_as: str | None = None, **forward_kwargs):
    """save_adapter, then load_adapter into a fresh `build()`: the same config, the same tensors
    bit for bit, the same logits. Returns (saved tensors, loaded tensors) for further checks."""
    expected = forward_logits(am, ids, **forward_kwargs)
    am.save_adapter(tmp_path / name, name)
    load_as = load_as or name
    fresh = peftlab.adapt(build())
    fresh.load_adapter(tmp_path / name, load_as)
    fresh.set_active(load_as)
    assert fresh.adapters[load_as].config == am.adapters[name].config
    saved, loaded = am.adapter_tensors(name), fresh.adapter_tensors(load_as)
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert torch.equal(forward_logits(fresh, ids, **forward_kwargs), expected)
    return saved, loaded


# ---- in-sequence methods (prompt and prefix tuning) -------------------------------------------------


def peft_load(build: Callable, directory):
    import peft
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(build(), str(directory)).eval()


def no_eos(am):
    am.model.generation_config.eos_token_id = None    # the greedy reference never stops
    return am


def greedy(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Reference: greedy decoding by full forwards, one token at a time."""
    out = ids
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(input_ids=out, attention_mask=torch.ones_like(out)).logits[:, -1].argmax(-1)
        out = torch.cat([out, nxt[:, None]], dim=1)
    return out


def assert_changes_outputs_and_disable_restores_base(am, build: Callable):
    """The active adapter changes the logits (same shape, finite); disabled() gives the base's.
    Returns (ids, the base's logits)."""
    ids = rand_ids()
    base = forward_logits(build(), ids)
    ours = forward_logits(am, ids, attention_mask=torch.ones_like(ids))
    assert ours.shape == base.shape and torch.isfinite(ours).all()
    assert (ours - base).abs().max() > 1e-3
    with am.disabled():
        assert torch.equal(forward_logits(am, ids), base)
    return ids, base


def assert_generate_matches_greedy_loop(am) -> None:
    am = no_eos(am)
    ids = rand_ids(2, 5)
    got = am.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert torch.equal(got, greedy(am, ids, 4))


def assert_left_padded_call_matches_unpadded(am) -> None:
    """InstructionClassificationTask's call: left padding, explicit positions, logits_to_keep=1."""
    short, long_ = rand_ids(1, 5, seed=2)[0], rand_ids(1, 8, seed=3)[0]
    ids = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    ids[0, 3:], mask[0, 3:] = short, 1
    ids[1], mask[1] = long_, 1
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        out = am(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits
        assert out.shape == (2, 1, VOCAB)
        alone = [am(input_ids=s[None]).logits[0, -1] for s in (short, long_)]
    for row, ref in zip(out[:, -1], alone, strict=True):
        torch.testing.assert_close(row, ref, atol=1e-5, rtol=0)
