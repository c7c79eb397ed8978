"""Adapter directories peftlab writes, checked against what vLLM reads (issue 23, item 5), without
vLLM: `vllm_check` below reimplements the checks vLLM makes when it loads a LoRA adapter
directory (`--lora-modules name=DIR`, `POST /v1/load_lora_adapter`), read from its source:

- vllm/lora/peft_helper.py (PEFTHelper): adapter_config.json must have `r`, `lora_alpha` and
  `target_modules`; `use_dora` and a non-empty `modules_to_save` are refused; `bias` other than
  "none" is refused (unless an older vLLM ran with --enable-lora-bias); `r` must not exceed
  `--max-lora-rank`; the scale is lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`.
  It reads no other field: `rank_pattern` and `alpha_pattern` are ignored, so every module is
  scaled by that one global factor.
- vllm/config/lora.py: `--max-lora-rank` is one of 1, 8, 16, 32, 64, 128, 256, 320, 512.
- vllm/lora/lora_model.py (LoRAModel.from_local_checkpoint / from_lora_tensors) and
  vllm/lora/utils.py (parse_fine_tuned_lora_name): tensors from adapter_model.safetensors, keys
  `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`; any other key (DoRA's
  `lora_magnitude_vector`, a saved module copy) is not a LoRA weight it reads, and a module whose
  last name is not one of the model's LoRA modules is "unexpected" and refused.
- vllm/model_executor/models/llama.py, phi3.py: the LoRA modules are the model's linear layers,
  packed ones expanded through `packed_modules_mapping` (Llama: q/k/v_proj into qkv_proj,
  gate/up_proj into gate_up_proj; Phi-3 maps qkv_proj and gate_up_proj to themselves, so a Phi-3
  adapter must hold the fused projections whole, as peftlab exports them).

Beyond the layout, the delta vLLM would add with those rules (global scale × B @ A per module)
equals the weights peftlab merges: what vLLM serves is our adapter. No GPU was lent for this, so
vLLM itself was not run; the checks are only as current as the vLLM code they were read from.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from safetensors import safe_open
from test_fused import tiny_phi3
from torch import nn

import peftlab
from peftlab.apps.cli import main

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)   # vllm/config/lora.py MaxLoRARanks
# The module names vLLM accepts in a LoRA adapter for each architecture (its linear layers, packed
# ones expanded through packed_modules_mapping).
VLLM_LORA_MODULES = {
    "LlamaForCausalLM": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "Phi3ForCausalLM": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
}
PREFIX = "base_model.model."
ALL_ROLES = ["attn.q", "attn.k", "attn.v", "attn.o", "ffn.gate", "ffn.up", "ffn.down"]


@dataclass
class VllmVerdict:
    problems: list[str] = field(default_factory=list)
    max_lora_rank: int | None = None            # the smallest --max-lora-rank that holds it
    scale: float = 0.0                          # vLLM's one scale for every module
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # module -> (A, B)

    @property
    def servable(self) -> bool:
        return not self.problems


def peft_scale(config: dict, module: str) -> float:
    """The scale peft applies to `module` (its rank_pattern / alpha_pattern entries win)."""
    def pick(pattern: dict, default: float) -> float:
        key = next((k for k in pattern if re.match(rf"(.*\.)?({k})$", module)), None)
        return default if key is None else pattern[key]
    r, alpha = pick(config.get("rank_pattern") or {}, config["r"]), pick(config.get("alpha_pattern") or {}, config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def vllm_check(directory: Path, model: nn.Module) -> VllmVerdict:
    """What vLLM would say of the adapter directory `directory` on base `model` (see the module
    docstring for where each rule comes from)."""
    verdict = VllmVerdict()
    problems = verdict.problems
    config_file, tensors_file = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    if not config_file.is_file() or not tensors_file.is_file():
        return VllmVerdict([f"{directory} lacks adapter_config.json or adapter_model.safetensors"])
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r}: vLLM serves LoRA adapters only")
    missing = {"r", "lora_alpha", "target_modules"} - set(config)
    if missing:
        return VllmVerdict([*problems, f"adapter_config.json lacks {sorted(missing)}"])
    if config.get("use_dora"):
        problems.append("use_dora: vLLM does not yet support DoRA")
    if config.get("modules_to_save"):
        problems.append("modules_to_save: vLLM only supports modules_to_save being None")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("bias: vLLM serves LoRA without bias terms")
    if config["r"] > VLLM_MAX_LORA_RANKS[-1]:
        problems.append(f"r {config['r']} is above vLLM's largest --max-lora-rank {VLLM_MAX_LORA_RANKS[-1]}")
    verdict.scale = (config["lora_alpha"] / math.sqrt(config["r"]) if config.get("use_rslora")
                     else config["lora_alpha"] / config["r"])
    expected = VLLM_LORA_MODULES[type(model).__name__]
    modules = dict(model.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(tensors_file), framework="pt") as f:
        for key in f.keys():   # noqa: SIM118 (a safetensors handle, not a dict)
            parts = key.split(".")
            if not key.startswith(PREFIX) or parts[-1] != "weight" or parts[-2] not in ("lora_A", "lora_B"):
                problems.append(f"{key}: not a LoRA weight vLLM reads")
                continue
            module = ".".join(parts[2:-2])
            if module.rsplit(".", 1)[-1] not in expected:
                problems.append(f"{module}: not one of vLLM's LoRA modules for {type(model).__name__} "
                                f"({sorted(expected)})")
            pairs.setdefault(module, {})[parts[-2]] = f.get_tensor(key)
    ranks = []
    for module, factors in sorted(pairs.items()):
        a, b = factors.get("lora_A"), factors.get("lora_B")
        layer = modules.get(module)
        if a is None or b is None or not isinstance(layer, nn.Linear):
            problems.append(f"{module}: needs lora_A and lora_B on a linear layer of the model")
            continue
        if a.shape != (a.shape[0], layer.in_features) or b.shape != (layer.out_features, a.shape[0]):
            problems.append(f"{module}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit its "
                            f"{layer.in_features} -> {layer.out_features} weight")
        if not math.isclose(peft_scale(config, module), verdict.scale, rel_tol=1e-9):
            problems.append(f"{module}: vLLM ignores rank_pattern/alpha_pattern and would scale it by "
                            f"{verdict.scale:g}, not {peft_scale(config, module):g}")
        ranks.append(a.shape[0])
        verdict.factors[module] = (a, b)
    # vLLM checks `r` against --max-lora-rank, and copies each module's factors into buffers of
    # that rank: the largest rank in the file must fit too.
    need = max([config["r"], *ranks])
    verdict.max_lora_rank = next((m for m in VLLM_MAX_LORA_RANKS if m >= need), None)
    return verdict


def merged_delta(am: peftlab.AdaptedModel, name: str, base: nn.Module) -> dict[str, torch.Tensor]:
    """Module path -> merged weight minus `base`'s weight (the same base model, unadapted), for
    every linear layer that merging adapter `name` changes."""
    am = copy.deepcopy(am)
    am.set_active([name])
    merged = dict(am.merge_and_unload().named_modules())
    out = {}
    for path, layer in base.named_modules():
        if isinstance(layer, nn.Linear) and not torch.equal(merged[path].weight, layer.weight):
            out[path] = (merged[path].weight - layer.weight).detach()
    return out


def exported(model: nn.Module, config: peftlab.LoraConfig, directory: Path) -> tuple[peftlab.AdaptedModel, Path]:
    """`model` adapted with `config` (random factors) saved by am.save_adapter and exported by
    `peftlab export --format peft`, as the README's scale-out recipe does."""
    am = peftlab.adapt(model)
    am.add_adapter("a", config)
    am.save_adapter(directory / "saved", "a")
    assert main(["export", "--format", "peft", str(directory / "saved"), "--out", str(directory / "peft")]) == 0
    return am, directory / "peft"


def assert_vllm_serves_our_weights(am: peftlab.AdaptedModel, base: nn.Module, verdict: VllmVerdict) -> None:
    """The delta vLLM adds to `base` (its global scale × B @ A per module) equals what peftlab
    merges."""
    ours = merged_delta(am, "a", base)
    theirs = {m: verdict.scale * b @ a for m, (a, b) in verdict.factors.items()}
    assert set(theirs) == set(ours) and ours, (sorted(theirs), sorted(ours))
    for module, delta in ours.items():
        torch.testing.assert_close(theirs[module], delta, rtol=1e-5, atol=1e-6, msg=module)
        assert delta.abs().max() > 0


@pytest.mark.parametrize("rslora", [False, True])
def test_a_llama_lora_is_what_vllm_loads(tmp_path, rslora):
    am, peft_dir = exported(tiny_llama(), peftlab.LoraConfig(r=8, rslora=rslora, init="random", targets=ALL_ROLES),
                            tmp_path)
    assert sorted(p.name for p in peft_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    base = tiny_llama()   # the plain base model, as vLLM builds it
    verdict = vllm_check(peft_dir, base)
    assert verdict.servable, verdict.problems
    assert verdict.max_lora_rank == 8 and len(verdict.factors) == 2 * 7
    assert verdict.scale == (16 / math.sqrt(8) if rslora else 16 / 8)
    assert_vllm_serves_our_weights(am, base, verdict)


@pytest.mark.parametrize("rslora", [False, True])
def test_a_phi3_lora_on_q_k_v_slices_exports_the_fused_projection_vllm_loads(tmp_path, rslora):
    # attn.q/k/v and ffn.gate/up are slices of Phi-3's fused qkv_proj / gate_up_proj: exported
    # whole (rank 3r and 2r, with rank_pattern/alpha_pattern that keep the scale), which is the
    # layout vLLM's Phi-3 wants (its packed_modules_mapping maps qkv_proj to itself).
    am, peft_dir = exported(tiny_phi3(), peftlab.LoraConfig(r=4, rslora=rslora, init="random", targets=ALL_ROLES),
                            tmp_path)
    base = tiny_phi3()
    verdict = vllm_check(peft_dir, base)
    assert verdict.servable, verdict.problems
    assert {m.rsplit(".", 1)[-1] for m in verdict.factors} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert {m: a.shape[0] for m, (a, _) in verdict.factors.items() if m.endswith("qkv_proj")} == {
        "model.layers.0.self_attn.qkv_proj": 12, "model.layers.1.self_attn.qkv_proj": 12}
    assert verdict.max_lora_rank == 16   # r is 4, but the fused qkv_proj holds rank 12
    assert_vllm_serves_our_weights(am, base, verdict)


def test_a_dora_adapter_is_not_servable_by_vllm(tmp_path):
    _, peft_dir = exported(tiny_llama(), peftlab.LoraConfig(r=8, dora=True, init="random"), tmp_path)
    verdict = vllm_check(peft_dir, tiny_llama())
    assert not verdict.servable
    assert "use_dora: vLLM does not yet support DoRA" in verdict.problems
    assert any("lora_magnitude_vector: not a LoRA weight vLLM reads" in p for p in verdict.problems)


def test_modules_to_save_and_uneven_scales_are_not_servable_by_vllm(tmp_path):
    am, peft_dir = exported(tiny_llama(), peftlab.LoraConfig(r=8, init="random", modules_to_save=["head"]),
                            tmp_path / "copies")
    problems = vllm_check(peft_dir, tiny_llama()).problems
    assert "modules_to_save: vLLM only supports modules_to_save being None" in problems
    assert "base_model.model.lm_head.weight: not a LoRA weight vLLM reads" in problems   # the trained copy
    # a rank_pattern that changes a module's scale: vLLM would scale it by the global alpha / r
    am, peft_dir = exported(tiny_llama(), peftlab.LoraConfig(r=8, init="random", rank_pattern={"attn.q": 16}),
                            tmp_path / "pattern")
    problems = vllm_check(peft_dir, tiny_llama()).problems
    assert problems and all("ignores rank_pattern/alpha_pattern and would scale it by 2, not 1" in p
                            for p in problems), problems
    assert len(problems) == 2   # q_proj of both layers
    with pytest.raises(AssertionError):   # served so, q_proj's delta would be twice ours
        assert_vllm_serves_our_weights(am, tiny_llama(), vllm_check(peft_dir, tiny_llama()))


def test_the_checker_refuses_what_vllm_refuses(tmp_path):
    _, peft_dir = exported(tiny_llama(), peftlab.LoraConfig(r=8, init="random", targets=ALL_ROLES), tmp_path)
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    cases = {"rank": {"r": 1024}, "bias": {"bias": "all"}, "type": {"peft_type": "IA3"}}
    for label, change in cases.items():
        copy = tmp_path / label
        shutil.copytree(peft_dir, copy)
        (copy / "adapter_config.json").write_text(json.dumps({**config, **change}))
        assert not vllm_check(copy, tiny_llama()).servable, label
    # a Llama adapter's per-projection modules are not Phi-3's fused ones
    problems = vllm_check(peft_dir, tiny_phi3()).problems
    assert any("q_proj: not one of vLLM's LoRA modules for Phi3ForCausalLM" in p for p in problems), problems
