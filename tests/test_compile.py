"""torch.compile of adapted inference and `peftlab.hotswap` (issue 24, item 4).

On a tiny Llama built from its config: unmerged LoRA, IA3 and a routed (adapter_ids) batch trace
with `fullgraph=True` and 0 graph breaks (torch._dynamo.explain), the compiled outputs equal the
eager ones, the steady state does not recompile (switching back to an adapter reuses its graph),
and a hotswap changes the outputs without recompiling: they equal a fresh eager model with the
new adapter loaded. CPU, backend="eager" (or a counting backend) so it stays fast.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from transformers import LlamaConfig, LlamaForCausalLM

import peftlab
from peftlab import AdapterError, CapabilityError, ConfigError, IA3Config, LoraConfig

CONFIG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
IDS = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))


def base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(CONFIG).eval()


def randomise_ia3(am: peftlab.AdaptedModel, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in am.adapter_parameters(name):
            t.copy_(1 + 0.5 * torch.randn(t.shape, generator=g))


@pytest.fixture
def am() -> peftlab.AdaptedModel:
    torch._dynamo.reset()
    am = peftlab.adapt(base())
    torch.manual_seed(2)
    am.add_adapter("a", LoraConfig(r=4, alpha=8, targets="all-linear", init="random"))
    am.add_adapter("b", LoraConfig(r=2, alpha=4, rslora=True, targets="all-linear", init="random"))
    am.add_adapter("i", IA3Config())
    randomise_ia3(am, "i", 3)
    return am


def logits(am, **kw) -> torch.Tensor:
    return am(input_ids=IDS, use_cache=False, **kw).logits


CASES = {"lora": ({"set": "a"}, {}), "ia3": ({"set": "i"}, {}),
         "mixed": ({"set": "a"}, {"adapter_ids": ["b", "a"]})}


@pytest.mark.parametrize("case", list(CASES))
def test_compiles_without_graph_breaks_and_matches_eager(am, case):
    setup, kw = CASES[case]
    am.set_active(setup["set"])
    with torch.no_grad():
        eager = logits(am, **kw)
        explained = torch._dynamo.explain(lambda ids: am(input_ids=ids, use_cache=False, **kw).logits)(IDS)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1
        compiled = torch.compile(am, fullgraph=True, backend="eager")
        first = compiled(input_ids=IDS, use_cache=False, **kw).logits
        again = compiled(input_ids=IDS, use_cache=False, **kw).logits
    torch.testing.assert_close(first, eager, atol=1e-6, rtol=0)
    torch.testing.assert_close(again, eager, atol=1e-6, rtol=0)
    base_out = base()(input_ids=IDS, use_cache=False).logits
    assert (eager - base_out).abs().max() > 1e-3       # the adapter changes the outputs


def test_steady_state_does_not_recompile_and_switching_back_reuses_the_graph(am):
    counter = CompileCounter()
    compiled = torch.compile(am, fullgraph=True, backend=counter)
    with torch.no_grad():
        am.set_active("a")
        for _ in range(3):
            out_a = compiled(input_ids=IDS, use_cache=False).logits
        assert counter.frame_count == 1
        am.set_active("b")
        out_b = compiled(input_ids=IDS, use_cache=False).logits
        assert counter.frame_count == 2                     # a new active set: one recompile
        am.set_active("a")
        torch.testing.assert_close(compiled(input_ids=IDS, use_cache=False).logits, out_a, atol=0, rtol=0)
        for _ in range(3):                                  # routed batches: one graph, reused
            mixed = compiled(input_ids=IDS, use_cache=False, adapter_ids=["b", "a"]).logits
        assert counter.frame_count == 3
        torch.testing.assert_close(mixed[0], out_b[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(mixed[1], out_a[1], atol=1e-6, rtol=0)
        # the eager path after compiled calls: its caches and the routing state are intact
        torch.testing.assert_close(logits(am), out_a, atol=1e-6, rtol=0)


def saved_lora(tmp_path, name: str, config: LoraConfig, *, peft: bool = False):
    """A directory holding a LoRA adapter trained elsewhere (random factors) on the same base."""
    other = peftlab.adapt(base())
    torch.manual_seed(5)
    other.add_adapter(name, config)
    directory = tmp_path / name
    if peft:
        peftlab.export_peft(other, name, directory)
    else:
        other.save_adapter(directory, name)
    return directory


def fresh_with(directory, name: str, **kw) -> torch.Tensor:
    fresh = peftlab.adapt(base())
    fresh.load_adapter(directory, name)
    fresh.set_active(name)
    with torch.no_grad():
        return logits(fresh, **kw)


@pytest.mark.parametrize("peft", [False, True], ids=["peftlab-dir", "peft-dir"])
def test_hotswap_keeps_the_graph_and_equals_a_fresh_load(am, tmp_path, peft):
    # a smaller rank with another alpha and rsLoRA's scaling: padded into r=4, scale folded into B
    new = saved_lora(tmp_path, "c", LoraConfig(r=2, alpha=3, rslora=True, targets="all-linear",
                                               init="random"), peft=peft)
    counter = CompileCounter()
    compiled = torch.compile(am, fullgraph=True, backend=counter)
    am.set_active("a")
    with torch.no_grad():
        before = compiled(input_ids=IDS, use_cache=False).logits
        compiled(input_ids=IDS, use_cache=False, adapter_ids=["a", "b"])
        logits(am), logits(am, adapter_ids=["a", "b"])     # the eager caches filled
        frames = counter.frame_count
        params = {id(p) for p in am.adapter_parameters("a")}
        peftlab.hotswap(am, "a", new)
        after = compiled(input_ids=IDS, use_cache=False).logits
        mixed = compiled(input_ids=IDS, use_cache=False, adapter_ids=["a", "b"]).logits
        eager = logits(am)
        eager_mixed = logits(am, adapter_ids=["a", "b"])
    assert counter.frame_count == frames                   # no recompilation
    assert {id(p) for p in am.adapter_parameters("a")} == params   # the same tensors, in place
    expected = fresh_with(new, "c")
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(eager, expected, atol=1e-6, rtol=0)      # the eager caches follow
    torch.testing.assert_close(mixed[0], expected[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(eager_mixed, mixed, atol=1e-6, rtol=0)
    assert am.adapter("a").layers["model.layers.0.self_attn.q_proj"].deltas["a"].lora_A.shape[0] == 4


def test_hotswap_ia3(am, tmp_path):
    other = peftlab.adapt(base())
    other.add_adapter("j", IA3Config())
    randomise_ia3(other, "j", 7)
    other.save_adapter(tmp_path / "j", "j")
    counter = CompileCounter()
    compiled = torch.compile(am, fullgraph=True, backend=counter)
    am.set_active("i")
    with torch.no_grad():
        compiled(input_ids=IDS, use_cache=False)
        peftlab.hotswap(am, "i", tmp_path / "j")
        after = compiled(input_ids=IDS, use_cache=False).logits
    assert counter.frame_count == 1
    torch.testing.assert_close(after, fresh_with(tmp_path / "j", "j"), atol=1e-6, rtol=0)


def test_hotswap_refusals_leave_the_adapter_as_it_was(am, tmp_path):
    snapshot = {k: t.clone() for k, t in am.adapter_tensors("a").items()}
    larger = saved_lora(tmp_path, "big", LoraConfig(r=8, targets="all-linear", init="random"))
    with pytest.raises(CapabilityError, match="rank 8 .* more than adapter 'a'"):
        peftlab.hotswap(am, "a", larger)
    sites = saved_lora(tmp_path, "qv", LoraConfig(r=2, targets=["attn.q", "attn.v"], init="random"))
    with pytest.raises(CapabilityError, match="other sites"):
        peftlab.hotswap(am, "a", sites)
    dora = saved_lora(tmp_path, "dora", LoraConfig(r=2, dora=True, targets="all-linear", init="random"))
    with pytest.raises(ConfigError, match="dora=True"):
        peftlab.hotswap(am, "a", dora)
    other = peftlab.adapt(base())
    other.add_adapter("j", IA3Config())
    other.save_adapter(tmp_path / "ia3", "j")
    with pytest.raises(CapabilityError, match=r"\(IA\)³ adapter and 'a' is a LoRA adapter"):
        peftlab.hotswap(am, "a", tmp_path / "ia3")
    for key, t in am.adapter_tensors("a").items():
        assert torch.equal(t, snapshot[key]), key
    am.set_active("a")
    am.merge("a")
    with pytest.raises(AdapterError, match="merged"):
        peftlab.hotswap(am, "a", saved_lora(tmp_path, "c", LoraConfig(r=2, targets="all-linear")))
