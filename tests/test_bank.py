"""AdapterBank: lazy loading, LRU eviction, pinning, explicit load / unload / replace, memory."""

from __future__ import annotations

import random
import threading

import pytest
import torch
from conftest import logits, tiny_gpt2, tiny_llama

import peftlab
from peftlab.core.bank import (
    AdapterBank,
    BankFullError,
    UnknownAdapterError,
    adapter_directory,
)
from peftlab.core.errors import AdapterError, CheckpointError
from peftlab.core.layer import AdaptedLayer

NAMES = ("alpha", "beta", "gamma", "delta")


def save_random_lora(am, directory, name: str, seed: int):
    """Save a LoRA with random non-zero factors (so each adapter changes the outputs
    differently) under `directory`, and remove it from `am` again."""
    torch.manual_seed(seed)
    am.add_adapter(name, peftlab.LoraConfig(r=4, init="random", targets=["attn.q", "attn.v"]))
    am.save_adapter(directory, name)
    am.delete_adapter(name)
    return directory


@pytest.fixture
def adapters(tmp_path, ids):
    """DIR with four adapters (one in a run directory's `last`), and each one's logits on `ids`."""
    am = peftlab.adapt(tiny_llama())
    root = tmp_path / "adapters"
    expected = {}
    for seed, name in enumerate(NAMES):
        where = root / name / "last" if name == "delta" else root / name
        save_random_lora(am, where, name, seed)
        am.load_adapter(where, name)
        am.set_active([name])
        expected[name] = logits(am, ids)
        am.delete_adapter(name)
    expected[None] = logits(am, ids)
    return root, expected


def outputs(bank: AdapterBank, name: str | None, ids: torch.Tensor) -> torch.Tensor:
    with bank.using([name]):
        bank.am.set_active([] if name is None else [name])
        try:
            return logits(bank.am, ids)
        finally:
            bank.am.set_active([])


def test_adapters_load_lazily_on_first_use(adapters, ids):
    root, expected = adapters
    bank = AdapterBank(peftlab.adapt(tiny_llama()), root, max_adapters=4)
    assert bank.loaded() == [] and not bank.am.adapters
    assert sorted(bank.available()) == sorted(NAMES)
    assert bank.available()["delta"] == root / "delta" / "last"   # a run directory stands for RUN/last
    for name in ("beta", None, "delta"):
        assert torch.allclose(outputs(bank, name, ids), expected[name], atol=1e-6)
    assert bank.loaded() == ["beta", "delta"] and bank.loads == 2
    outputs(bank, "beta", ids)
    assert bank.loads == 2   # cached


def test_lru_evicts_the_least_recently_used_at_capacity(adapters, ids):
    root, expected = adapters
    bank = AdapterBank(peftlab.adapt(tiny_llama()), root, max_adapters=2)
    outputs(bank, "alpha", ids)
    outputs(bank, "beta", ids)
    outputs(bank, "alpha", ids)                       # alpha is now the most recent
    outputs(bank, "gamma", ids)                       # evicts beta
    assert bank.loaded() == ["alpha", "gamma"] and bank.evictions == 1
    assert set(bank.am.adapters) == {"alpha", "gamma"}
    assert torch.allclose(outputs(bank, "beta", ids), expected["beta"], atol=1e-6)   # evicts alpha
    assert bank.loaded() == ["gamma", "beta"] and bank.evictions == 2


def test_a_batch_pins_its_adapters(adapters, ids):
    root, _ = adapters
    bank = AdapterBank(peftlab.adapt(tiny_llama()), root, max_adapters=2)
    outputs(bank, "alpha", ids)
    outputs(bank, "beta", ids)
    with bank.using(["gamma", None, "delta", "gamma"]):
        # loading delta had to evict; it took beta (least recent, unpinned), never gamma
        assert bank.loaded() == ["gamma", "delta"]
        with pytest.raises(AdapterError, match="in use by the running batch"):
            bank.unload("gamma")
        with pytest.raises(BankFullError, match="in use by the running batch"):
            bank.load("alpha")
    with pytest.raises(BankFullError, match="needs 3 adapters but the bank holds at most 2"), \
            bank.using(["alpha", "beta", "gamma"]):
        pass
    bank.unload("gamma")   # unpinned after the block
    assert bank.loaded() == ["delta"]


def test_unloading_frees_the_adapter_parameters(adapters):
    root, _ = adapters
    am = peftlab.adapt(tiny_llama())
    base_count = sum(p.numel() for p in am.parameters())
    base_keys = set(am.state_dict())
    bank = AdapterBank(am, root, max_adapters=3)
    bank.load("alpha")
    bank.load("beta")
    per_adapter = am.num_parameters("alpha")
    assert per_adapter > 0
    assert sum(p.numel() for p in am.parameters()) == base_count + 2 * per_adapter
    assert any(".alpha." in k for k in am.state_dict())
    assert bank.unload("alpha") is True
    assert sum(p.numel() for p in am.parameters()) == base_count + per_adapter
    assert not any(".alpha." in k for k in am.state_dict())
    bank.unload("beta")
    assert sum(p.numel() for p in am.parameters()) == base_count
    assert set(am.state_dict()) == base_keys
    assert not any(isinstance(m, AdaptedLayer) for m in am.modules())   # layers unwrapped again
    assert bank.unload("beta") is False   # on disk, not loaded: nothing to do
    assert "beta" in bank.available()


def test_explicit_load_replace_and_unload(adapters, ids, tmp_path):
    root, expected = adapters
    bank = AdapterBank(peftlab.adapt(tiny_llama()), root, max_adapters=3)
    assert bank.load("extra", root / "alpha") == root / "alpha"
    assert bank.path_of("extra") == root / "alpha"
    assert torch.allclose(outputs(bank, "extra", ids), expected["alpha"], atol=1e-6)
    with pytest.raises(AdapterError, match="already loaded .* unload it first or replace it"):
        bank.load("extra", root / "beta")
    bank.load("extra", root / "beta", replace=True)
    assert torch.allclose(outputs(bank, "extra", ids), expected["beta"], atol=1e-6)
    # a failed replacement keeps the old adapter serving
    with pytest.raises(CheckpointError, match="does not exist"):
        bank.load("extra", tmp_path / "missing", replace=True)
    other = save_random_lora(peftlab.adapt(tiny_gpt2()), tmp_path / "gpt2_lora", "g", 0)
    with pytest.raises(CheckpointError, match="gpt2_lora"):
        bank.load("extra", other, replace=True)
    assert bank.loaded() == ["extra"]
    assert torch.allclose(outputs(bank, "extra", ids), expected["beta"], atol=1e-6)
    assert bank.unload("extra") is True
    with pytest.raises(UnknownAdapterError):   # a registration ends with its unload
        bank.path_of("extra")


def test_bad_paths_and_names_are_clear_errors(adapters, tmp_path):
    root, _ = adapters
    bank = AdapterBank(peftlab.adapt(tiny_llama()), root)
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    cases = {tmp_path / "nope": "does not exist", tmp_path / "file.txt": "is a file",
             tmp_path / "empty": "is not an adapter directory: it holds no peftlab.json or adapter_config.json"}
    for path, problem in cases.items():
        with pytest.raises(CheckpointError, match=problem) as e:
            bank.load("x", path)
        assert str(path) in str(e.value)
    for name in ("../alpha", "a.b", "", "training"):
        with pytest.raises(AdapterError, match="is not usable"):
            bank.load(name, root / "alpha")
    with pytest.raises(UnknownAdapterError, match="did you mean 'alpha'") as e:
        bank.path_of("alpah")
    assert e.value.close[0] == "alpha"
    with pytest.raises(UnknownAdapterError):
        bank.path_of("../adapters/alpha")   # never looked up outside DIR
    with pytest.raises(CheckpointError, match="does not exist"):
        AdapterBank(bank.am, tmp_path / "nowhere")
    assert bank.loaded() == [] and not bank.am.adapters


def test_concurrent_use_and_changes_keep_the_bank_consistent(adapters, ids):
    root, expected = adapters
    bank = AdapterBank(peftlab.adapt(tiny_llama()), root, max_adapters=2)
    failures: list[str] = []

    def serve(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(6):
            name = rng.choice([*NAMES, None])
            if not torch.allclose(outputs(bank, name, ids), expected[name], atol=1e-6):
                failures.append(f"wrong outputs for {name}")

    def admin() -> None:
        for _ in range(4):
            bank.load("extra", root / "gamma")
            bank.unload("extra")

    threads = [threading.Thread(target=serve, args=(s,)) for s in range(3)]
    threads.append(threading.Thread(target=admin))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert len(bank.loaded()) <= 2 and set(bank.loaded()) == set(bank.am.adapters)


def test_adapter_directory_prefers_the_directory_itself(tmp_path):
    am = peftlab.adapt(tiny_llama())
    save_random_lora(am, tmp_path / "run", "a", 0)
    save_random_lora(am, tmp_path / "run" / "last", "b", 1)
    assert adapter_directory(tmp_path / "run") == tmp_path / "run"
    assert adapter_directory(tmp_path / "run" / "last") == tmp_path / "run" / "last"
