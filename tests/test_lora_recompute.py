"""LoRA training without keeping adapted layers' inputs (core/recompute.py,
methods/_lora_recompute.py): the same loss and gradients as the path that keeps them, on the
models and LoRA variants users train, and less memory kept for backward."""

from __future__ import annotations

import pytest
import torch
from conftest import BUILDERS, VOCAB

import peftlab
from peftlab.core.layer import AdaptedLayer
from peftlab.core.recompute import recovery, set_input_recompute

VARIANTS = {
    "lora": {},
    "dropout": {"dropout": 0.1},      # x·mask: the mask is kept (by the dropout), x rebuilt
    "rslora": {"rslora": True},
    "dora": {"dora": True},
    "pissa": {"init": "pissa"},
}


def _model(family: str, variant: str, dtype=torch.float32):
    am = peftlab.adapt(BUILDERS[family]().to(dtype))
    am.add_adapter("a", peftlab.LoraConfig(targets="all-linear", r=4, alpha=8, init="random"
                                           if variant != "pissa" else "pissa", **{
                                               k: v for k, v in VARIANTS[variant].items() if k != "init"}))
    am.set_active(["a"])
    am.set_trainable("a")
    return am.train()


def _step(am, family: str, recompute: bool, ids: torch.Tensor):
    """Loss, adapter gradients and the gradient to the input embeddings; how many adapted layers
    took the rebuilding path."""
    previous = set_input_recompute(recompute)
    try:
        am.zero_grad(set_to_none=True)
        torch.manual_seed(5)        # the same dropout masks (GPT-2, BERT) on both paths
        embeds = am.model.get_input_embeddings()(ids).detach().requires_grad_(True)
        if family == "bert":
            loss = am(inputs_embeds=embeds, labels=torch.tensor([0, 2])).loss
        else:
            loss = am(inputs_embeds=embeds, labels=ids).loss
        rebuilt = _count_nodes(loss, "_RebuiltDownBackward")
        loss.backward()
    finally:
        set_input_recompute(previous)
    grads = {n: p.grad.clone() for n, p in am.named_parameters() if p.requires_grad}
    return loss.detach(), grads, embeds.grad, rebuilt


def _nodes(loss: torch.Tensor):
    stack, visited = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        yield node
        stack.extend(n for n, _ in node.next_functions)


def _count_nodes(loss: torch.Tensor, name: str) -> int:
    return sum(type(n).__name__ == name for n in _nodes(loss))


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradients_equal_the_keeping_path(family, variant):
    am = _model(family, variant)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    loss0, grads0, gx0, n0 = _step(am, family, False, ids)
    loss1, grads1, gx1, n1 = _step(am, family, True, ids)
    assert n0 == 0
    sites = sum(isinstance(m, AdaptedLayer) for m in am.model.modules())
    # the input embeddings require grad here, so every site's input has a producer
    assert n1 == sites, (n1, sites)
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys() and grads0
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-6, atol=1e-7, msg=name)
    torch.testing.assert_close(gx1, gx0, rtol=1e-6, atol=1e-7)


def test_slices_of_gpt2_fused_c_attn():
    """LoRA on attn.q / attn.v, slices of GPT-2's fused c_attn: the rebuilt input is c_attn's."""
    am = peftlab.adapt(BUILDERS["gpt2"]())
    am.add_adapter("a", peftlab.LoraConfig(targets=["attn.q", "attn.v", "ffn.down"], r=4, init="random"))
    am.set_active(["a"])
    am.set_trainable("a")
    am.train()
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    loss0, grads0, gx0, _ = _step(am, "gpt2", False, ids)
    loss1, grads1, gx1, n1 = _step(am, "gpt2", True, ids)
    assert n1 == 4          # c_attn and mlp.c_proj of both layers
    assert torch.equal(loss0, loss1)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-6, atol=1e-7, msg=name)
    torch.testing.assert_close(gx1, gx0, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_mixed_batch_training_is_unchanged(family):
    """A routed batch gathers every row's factors (methods/_lora_mixed.py) and keeps its input:
    the switch changes nothing there."""
    am = peftlab.adapt(BUILDERS[family]())
    am.add_adapter("a", peftlab.LoraConfig(targets="all-linear", r=2, init="random"))
    am.add_adapter("b", peftlab.LoraConfig(targets="all-linear", r=4, init="random", rslora=True))
    am.set_trainable(["a", "b"])
    am.train()
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    results = []
    for recompute in (False, True):
        previous = set_input_recompute(recompute)
        try:
            am.zero_grad(set_to_none=True)
            torch.manual_seed(5)
            labels = torch.tensor([0, 2]) if family == "bert" else ids
            loss = am(input_ids=ids, labels=labels, adapter_ids=["a", "b"]).loss
            loss.backward()
        finally:
            set_input_recompute(previous)
        results.append((loss.detach(), {n: p.grad.clone() for n, p in am.named_parameters() if p.requires_grad}))
    (loss0, grads0), (loss1, grads1) = results
    assert torch.equal(loss0, loss1)
    for name in grads0:
        assert torch.equal(grads0[name], grads1[name]), name


def test_under_autocast_the_casts_are_autocasts():
    """bf16 autocast (Trainer's bf16=True): the rebuilt path casts x and A as F.linear would, and
    the gradients reach the fp32 factors in fp32."""
    am = _model("llama", "lora")
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss0, grads0, _, _ = _step(am, "llama", False, ids)
        loss1, grads1, _, n1 = _step(am, "llama", True, ids)
    assert n1 == sum(isinstance(m, AdaptedLayer) for m in am.model.modules())
    assert torch.equal(loss0, loss1)
    for name in grads0:
        assert grads1[name].dtype == torch.float32
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-2, atol=1e-4, msg=name)


def test_bf16_llama_rebuilds_through_the_norm_casts():
    am = _model("llama", "lora", torch.bfloat16)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    loss0, grads0, _, _ = _step(am, "llama", False, ids)
    loss1, grads1, _, n1 = _step(am, "llama", True, ids)
    assert n1 == sum(isinstance(m, AdaptedLayer) for m in am.model.modules())
    assert torch.equal(loss0, loss1)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-2, atol=1e-4, msg=name)


def _kept_bytes(loss: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for backward (every node's saved tensors)."""
    seen: dict[int, int] = {}
    for node in _nodes(loss):
        tensors = [getattr(node, a, None) for a in dir(node) if a.startswith("_saved_")]
        tensors += list(getattr(node, "saved_tensors", ()) or ())
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.numel():
                st = t.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def test_keeps_no_adapted_input():
    """With every input rebuilt, what a LoRA forward keeps for backward is the frozen model's
    (the weights and activations it keeps anyway) plus the rank-r h's; keeping the inputs adds
    one activation per distinct adapted input."""
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (4, 32))

    def kept(recompute: bool | None) -> int:
        am = _model("llama", "lora")
        if recompute is None:       # the frozen floor: no adapter active
            am.set_active([])
        previous = set_input_recompute(bool(recompute))
        try:
            embeds = am.model.get_input_embeddings()(ids).detach().requires_grad_(True)
            return _kept_bytes(am(inputs_embeds=embeds, labels=ids).loss)
        finally:
            set_input_recompute(previous)

    floor, keeping, rebuilding = kept(None), kept(False), kept(True)
    h = 7 * 2 * 4 * 32 * 4 * 4           # 7 sites × 2 layers × (4·32 rows) × r=4 × fp32
    weights = sum(4 * 32 * n for n in (4 + 4, 4 + 4, 4 + 4, 4 + 4, 4 + 48, 4 + 48, 48 + 4)) * 2
    # keeping: + the q/k/v input, o_proj input, gate/up input and down input of each layer
    assert keeping - floor >= 2 * 4 * 32 * (32 + 32 + 32 + 48) * 4
    assert rebuilding - floor <= h + weights + 4096, (floor, keeping, rebuilding)


def test_no_recovery_without_a_producer_or_under_hooks():
    x = torch.randn(3, 4, requires_grad=True)
    assert recovery(x) is None                       # a leaf: nothing to rebuild it from
    y = x * torch.randn(3, 4, requires_grad=True)
    assert recovery(y) is not None
    z = x * torch.randn(3, 4, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert recovery(z) is None                   # checkpointing / offloading: keep x
    previous = set_input_recompute(False)
    try:
        assert recovery(x * 2.0 + 1) is None
    finally:
        set_input_recompute(previous)


def test_second_backward_through_a_retained_graph():
    am = _model("llama", "lora")
    ids = torch.randint(0, VOCAB, (2, 5))
    embeds = am.model.get_input_embeddings()(ids).detach().requires_grad_(True)
    loss = am(inputs_embeds=embeds, labels=ids).loss
    loss.backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in am.named_parameters() if p.requires_grad}
    loss.backward()
    for n, p in am.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, 2 * first[n], rtol=1e-6, atol=1e-7)


def test_training_follows_the_keeping_path_and_lowers_the_loss():
    ids = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(3))

    def train(recompute: bool) -> list[float]:
        am = _model("llama", "lora")
        opt = torch.optim.AdamW([p for p in am.parameters() if p.requires_grad], lr=3e-2)
        embeds = am.model.get_input_embeddings()(ids).detach().requires_grad_(True)
        previous = set_input_recompute(recompute)
        try:
            losses = []
            for _ in range(20):
                loss = am(inputs_embeds=embeds, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
        finally:
            set_input_recompute(previous)
        return losses

    rebuilt, kept = train(True), train(False)
    assert rebuilt[-1] < rebuilt[0] - 0.2
    assert rebuilt == pytest.approx(kept, rel=1e-5)
