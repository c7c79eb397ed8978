#!/usr/bin/env python
"""LoRA training-step cost of peftlab against Hugging Face `peft` and the PEFT floor, in one process.

Model: the SmolLM2-135M architecture (Llama, 30 layers, d=576, tied embeddings) built from its
config with random weights, train mode, on CPU, fp32 by default (`--dtype bf16` for the issue's
dtype: this CPU has no native bf16 GEMM, so bf16 steps are ~6x slower; use it with --quick).
Input: batch 8 x 128 random token ids; loss = model(input_ids, labels=input_ids).loss.

Variants (one seeded base, deep-copied, so all hold identical weights):

* floor: the frozen model's forward + backward to the activations, i.e. what any PEFT method must
  pay: `inputs_embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)` (the
  lookup is timed), loss from `model(inputs_embeds=..., labels=ids)`, `loss.backward()`; every
  weight frozen, no optimizer.
* peft (0.21.x): `get_peft_model(copy, peft.LoraConfig(r=8, lora_alpha=16, target_modules=...))`
  with peft's default adapter dtype (`autocast_adapter_dtype=True`: fp32 LoRA weights, also on a
  bf16 base), reported as-is.
* peftlab: `am = peftlab.adapt(copy)`, `add_adapter("a", LoraConfig(r=8, alpha=16, targets=...))`,
  `set_active(["a"])`, `set_trainable("a")` (peftlab's default adapter dtype: fp32 LoRA weights on
  a bf16 base too, as peft).
* peftlab, inputs kept (all-linear only): the same adapter with `peftlab.set_input_recompute(False)`,
  which keeps every adapted layer's input for A's gradient as peft does; without it peftlab
  rebuilds those inputs in backward from the tensors the frozen model keeps (core/recompute.py).
  Its rows show the effect of the recompute in the same run.
Two configs: r8 on q,v (peft ["q_proj", "v_proj"], peftlab ["attn.q", "attn.v"]: 60 sites) and
r8 on every linear layer but the head (both "all-linear": 210 sites). LoRA B is filled with
N(0, 0.02) noise and the same A/B values are copied into peft and peftlab, so both do identical
math; the warm-up step checks that their losses and adapter-gradient norms agree.
A LoRA step is forward + backward + `AdamW(adapter params, lr=1e-4).step()` +
`zero_grad(set_to_none=True)`, all timed.

Time: time.perf_counter around each step (gc.collect() before it, untimed). One warm-up step per
variant, then interleaved rounds: each round runs every variant once, in a rotated order; a ratio
is the median over rounds of (variant time / floor time in the same round), which cancels slow
drift of a shared machine. "NO (noise?)" marks a median miss where some round met the goal. Phase
medians (forward / backward / optimizer+zero_grad) are printed below the table.

Memory: after all timing, per variant, in a fresh process of its own (this script with
--memory-of: the same seeded variants built, that one warmed up by two steps), so that every
variant starts from the same allocator state: the kernel's own peak-RSS counter. glibc is first switched
to a fixed 64 KiB mmap threshold (mallopt; every tensor buffer is then mmapped and given back to
the kernel on free, so RSS follows live memory instead of allocator caches) and trimmed
(malloc_trim); then RSS is read (VmRSS), the high-water mark is reset (writing 5 to
/proc/self/clear_refs), one step runs, and VmHWM is read. "step peak growth" = VmHWM - VmRSS
before the step: everything a step allocates at its peak (activations kept for backward, logits
and their gradient, parameter gradients, optimizer temporaries), exact to the page, no sampling,
no profiler overhead. The goal applies to this growth. The "incl. weights" row adds the resident
state counted from the tensors (model parameters + buffers + AdamW state), the CPU analogue of
torch.cuda.max_memory_allocated. The allocator switch would slow the timed steps (a page fault
per fresh buffer), which is why memory is measured after timing. Needs Linux + glibc; otherwise
the memory rows show "-".

A full run (7 rounds) takes ~5-6 min on 2 cores in fp32 (one step 3-6 s, the memory pass ~6 s a
step); --quick (2 rounds, 1 memory step per variant) ~2.5 min. A VM whose memory is still cold
(first run after boot) can be several times slower until its pages have been touched once.

Usage:  python bench/train_step.py [--quick] [--threads N] [--dtype {fp32,bf16}] [--rounds N]
                                   [--profile | --no-profile]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import peft
from common import print_columns, smollm2_config  # bench/common.py
from transformers import LlamaForCausalLM

import peftlab
from peftlab.core.layer import AdaptedLayer

now = time.perf_counter
median = statistics.median

SEED = 0
RANK, ALPHA = 8, 16
BATCH, SEQ = 8, 128
LR = 1e-4
CONFIGS = {  # name: (peftlab targets, peft target_modules, time goal x floor)
    "q,v": (["attn.q", "attn.v"], ["q_proj", "v_proj"], 1.05),
    "all-linear": ("all-linear", "all-linear", 1.10),
}
MEM_GOAL = 1.15   # step peak memory growth x floor
KEPT = "peftlab all-linear, inputs kept"   # the same model with input recompute off
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

_T0 = now()


def log(msg: str) -> None:
    print(f"[{now() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)




def build_base(dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(smollm2_config()).to(dtype).train()
    model.requires_grad_(False)
    return model


# ---- LoRA weights ----------------------------------------------------------------------------------
def peft_pairs(pm, adapter: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module path (relative to the LlamaForCausalLM) -> (A weight, B weight) of a PeftModel."""
    out = {}
    for path, mod in pm.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and adapter in getattr(mod, "lora_A", {}):
            out[path] = (mod.lora_A[adapter].weight, mod.lora_B[adapter].weight)
    return out


def peftlab_pairs(am, adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for path, mod in am.model.named_modules():
        if isinstance(mod, AdaptedLayer) and adapter in mod.deltas:
            d = mod.deltas[adapter]
            out[path] = (d.lora_A, d.lora_B)
    return out


@torch.no_grad()
def copy_pairs(src: dict, dst: dict) -> None:
    assert set(src) == set(dst), (sorted(set(src) ^ set(dst)))[:5]
    for path, (a, b) in src.items():
        dst[path][0].copy_(a)
        dst[path][1].copy_(b)


# ---- variants --------------------------------------------------------------------------------------
class Floor:
    """Frozen model, forward + backward to the (detached, grad-requiring) input embeddings."""

    def __init__(self, model):
        self.model, self.opt = model, None
        self.params: list[torch.Tensor] = []

    def step(self, ids, check: dict | None = None) -> tuple[float, float, float]:
        t0 = now()
        emb = self.model.get_input_embeddings()(ids).detach().requires_grad_(True)
        loss = self.model(inputs_embeds=emb, labels=ids, use_cache=False).loss
        t1 = now()
        loss.backward()
        t2 = now()
        if check is not None:
            check.update(loss=loss.item(), grad=emb.grad.float().norm().item())
        return t1 - t0, t2 - t1, 0.0


class LoraStep:
    """forward + backward + AdamW over the adapter parameters + zero_grad. `keep_inputs`: peftlab
    with input recompute switched off (`peftlab.set_input_recompute(False)`), its reference path."""

    def __init__(self, model, params, keep_inputs: bool = False):
        self.model, self.params, self.keep_inputs = model, list(params), keep_inputs
        assert self.params and all(p.requires_grad for p in self.params)
        self.opt = torch.optim.AdamW(self.params, lr=LR)

    def step(self, ids, check: dict | None = None) -> tuple[float, float, float]:
        previous = peftlab.set_input_recompute(not self.keep_inputs)
        try:
            return self._step(ids, check)
        finally:
            peftlab.set_input_recompute(previous)

    def _step(self, ids, check: dict | None = None) -> tuple[float, float, float]:
        t0 = now()
        loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
        t1 = now()
        loss.backward()
        t2 = now()
        if check is not None:
            check.update(loss=loss.item(),
                         grad=torch.stack([p.grad.float().norm() for p in self.params]).norm().item())
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return t1 - t0, t2 - t1, now() - t2


def peftlab_model(base, targets, pairs: dict):
    am = peftlab.adapt(copy.deepcopy(base))
    am.add_adapter("a", peftlab.LoraConfig(r=RANK, alpha=ALPHA, targets=targets))
    am.set_active(["a"])
    am.set_trainable("a")
    am.train()
    copy_pairs(pairs, peftlab_pairs(am, "a"))
    return am


def build_variants(base, dtype) -> dict:
    variants = {"floor": Floor(base)}
    g = torch.Generator().manual_seed(SEED + 1)
    for cname, (pl_targets, pf_targets, _) in CONFIGS.items():
        pm = peft.get_peft_model(copy.deepcopy(base),
                                 peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                 target_modules=pf_targets)).train()
        ref = peft_pairs(pm)
        with torch.no_grad():
            for _, b in ref.values():
                b.copy_(torch.randn(b.shape, generator=g) * 0.02)
        am = peftlab_model(base, pl_targets, ref)
        pf_params = [p for p in pm.parameters() if p.requires_grad]
        assert len(pf_params) == 2 * len(ref) and am.trainable_parameters() == sum(p.numel() for p in pf_params)
        variants[f"peft {cname}"] = LoraStep(pm, pf_params)
        variants[f"peftlab {cname}"] = LoraStep(am, am.adapter_parameters("a"))
        if cname == "all-linear":   # before input recompute, in the same run
            kept = peftlab_model(base, pl_targets, ref)
            variants[KEPT] = LoraStep(kept, kept.adapter_parameters("a"), keep_inputs=True)
        log(f"  {cname}: {len(ref)} LoRA sites, {sum(p.numel() for p in pf_params):,} trainable params; "
            f"adapter dtype peft {pf_params[0].dtype}, peftlab {next(am.adapter_parameters('a')).dtype}")
    return variants


def timed_step(v, ids) -> tuple[float, float, float]:
    gc.collect()
    return v.step(ids)


# ---- memory ------------------------------------------------------------------------------------------
def _proc_status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        s = f.read()
    return {k: 1024 * int(re.search(rf"^{k}:\s+(\d+) kB", s, re.MULTILINE).group(1)) for k in ("VmRSS", "VmHWM")}


def memory_probe():
    """A function step -> bytes of peak RSS growth during the step, or None where unsupported."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        _proc_status()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        if libc.mallopt(-3, 64 * 1024) != 1:  # M_MMAP_THRESHOLD: fixed, no dynamic growth
            return None
    except (OSError, AttributeError):
        return None

    def growth(fn) -> int:
        gc.collect()
        libc.malloc_trim(0)
        rss0 = _proc_status()["VmRSS"]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")          # reset VmHWM to the current RSS
        fn()
        return _proc_status()["VmHWM"] - rss0

    return growth


def state_bytes(v) -> int:
    """Resident tensors a step starts from: model parameters + buffers + optimizer state."""
    seen, n = set(), 0
    for t in [*v.model.parameters(), *v.model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    if v.opt is not None:
        for st in v.opt.state.values():
            n += sum(t.numel() * t.element_size() for t in st.values() if torch.is_tensor(t))
    return n


def memory_in_child(name: str, reps: int, dtype: str) -> list[int]:
    """Peak RSS growth of `reps` steps of variant `name`, measured in a fresh process that builds
    the same variants and warms that one up (two steps: AdamW's state exists): every variant then
    starts from the same allocator state, which the timing rounds and the profiler of this process
    would otherwise leave behind differently for each."""
    out = subprocess.run([sys.executable, __file__, "--memory-of", name, "--memory-reps", str(reps),
                          "--dtype", dtype], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_memory_of(name: str, reps: int, dtype: torch.dtype) -> None:
    """--memory-of: print the growth samples of variant `name` as a JSON list (see memory_in_child)."""
    growth = memory_probe()     # first: the allocator is switched before anything is allocated
    variants = build_variants(build_base(dtype), dtype)
    ids = torch.randint(0, smollm2_config().vocab_size, (BATCH, SEQ),
                        generator=torch.Generator().manual_seed(SEED + 2))
    for _ in range(2):
        variants[name].step(ids)
    print(json.dumps([growth(lambda: variants[name].step(ids)) for _ in range(reps)]))


# ---- table ---------------------------------------------------------------------------------------------
def fmt(v, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "x":
        return f"{v:.3f}x"
    if unit == "MB":
        return f"{v / 2**20:.0f} MB"
    return f"{v:.0f} ms"


def print_table(rows: list[tuple]) -> None:
    head = ("figure", "floor", "peft", "peftlab", "peftlab/peft", "goal", "met?")
    body = []
    for fig, fl, pf, pl, unit, goal, pl_best in rows:
        rel = f"{pl / pf:.3f}" if (pl is not None and pf) else "-"
        if goal is None:
            goal_s, met = "-", "-"
        else:
            goal_s = f"<= {goal:g}x"
            met = "yes" if pl is not None and pl <= goal else ("-" if pl is None else "NO")
            if met == "NO" and pl_best is not None and pl_best <= goal:
                met = "NO (noise?)"
        body.append((fig, fmt(fl, unit), fmt(pf, unit), fmt(pl, unit), rel, goal_s, met))
    print_columns(head, body)


# ---- profile -------------------------------------------------------------------------------------------
def profile_step(variants: dict, names: list[str], ids, top: int = 16) -> str:
    """torch.profiler op table of one step per variant (returned as text)."""
    from torch.profiler import ProfilerActivity, profile

    lines = []
    print = lines.append
    print(f"\n== profile: torch.profiler, one step each ({', '.join(names)}), self CPU ms ==")
    res = {}
    for n in names:
        with profile(activities=[ProfilerActivity.CPU]) as p:
            t = now()
            variants[n].step(ids)
            wall = now() - t
        res[n] = ({e.key: (e.count, e.self_cpu_time_total / 1e3) for e in p.key_averages()}, wall)
    ref = names[0]
    keys = sorted(set().union(*(r[0] for r in res.values())),
                  key=lambda k: -max(abs(res[n][0].get(k, (0, 0))[1] - res[ref][0].get(k, (0, 0))[1])
                                     for n in names[1:]))
    print(f"{'op':<44}" + "".join(f" {n[:18]:>18} {'n':>5}" for n in names))
    for k in keys[:top]:
        print(f"{k[:44]:<44}" + "".join(f" {res[n][0].get(k, (0, 0.0))[1]:>18.1f} {res[n][0].get(k, (0, 0))[0]:>5}"
                                        for n in names))
    print(f"{'wall (profiled, ms)':<44}" + "".join(f" {1e3 * res[n][1]:>18.1f} {'':>5}" for n in names))
    return "\n".join(lines)


# ---- main ----------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 timing rounds instead of 7, 1 memory step instead of 2 (~2.5 min)")
    ap.add_argument("--rounds", type=int, default=None, help="timing rounds (overrides --quick)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                    help="model dtype (bf16 is ~6x slower on CPUs without native bf16 GEMMs)")
    ap.add_argument("--profile", action="store_true",
                    help="always print a profile (otherwise only when a peftlab time goal is missed)")
    ap.add_argument("--no-profile", action="store_true", help="never print the profile")
    ap.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)     # child of memory_in_child
    ap.add_argument("--memory-reps", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (2 if args.quick else 7)
    dtype = DTYPES[args.dtype]
    if args.memory_of:
        measure_memory_of(args.memory_of, args.memory_reps, dtype)
        return
    t_start = now()

    print(f"peftlab {peftlab.__version__}, peft {peft.__version__}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, cpu {torch.backends.cpu.get_cpu_capability()}, "
          f"{'quick' if args.quick else 'full'} run ({rounds} rounds); SmolLM2-135M arch, random weights, "
          f"{args.dtype}, train mode; batch {BATCH}x{SEQ}; LoRA r={RANK} alpha={ALPHA}; "
          f"AdamW lr={LR}; peft adapters in its default dtype (autocast_adapter_dtype=True)")

    log("building models ...")
    base = build_base(dtype)
    variants = build_variants(base, dtype)
    names = list(variants)
    ids = torch.randint(0, smollm2_config().vocab_size, (BATCH, SEQ),
                        generator=torch.Generator().manual_seed(SEED + 2))
    log(f"models built in {now() - t_start:.1f} s")

    # -- warm-up + sanity ------------------------------------------------------------------------
    checks = {}
    for n in names:
        t = now()
        checks[n] = {}
        variants[n].step(ids, check=checks[n])
        log(f"  warm-up {n:<20} {1e3 * (now() - t):8.0f} ms  loss {checks[n]['loss']:.6f}")
    print("sanity (warm-up step): floor loss {:.6f}; ".format(checks["floor"]["loss"])
          + "; ".join(f"{c}: |loss peftlab - peft| {abs(checks[f'peftlab {c}']['loss'] - checks[f'peft {c}']['loss']):.2e}"
                      f" (LoRA effect vs floor {abs(checks[f'peftlab {c}']['loss'] - checks['floor']['loss']):.2e}), "
                      f"adapter grad norm peft {checks[f'peft {c}']['grad']:.4e} / peftlab "
                      f"{checks[f'peftlab {c}']['grad']:.4e}" for c in CONFIGS))

    # -- time ----------------------------------------------------------------------------------------
    log(f"timing: {rounds} rounds of {len(names)} variants")
    times = {n: [] for n in names}
    phases = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            ph = timed_step(variants[n], ids)
            phases[n].append(ph)
            times[n].append(sum(ph))
        log(f"  round {r + 1}/{rounds}: " + "  ".join(f"{n}={1e3 * times[n][-1]:.0f}ms" for n in names))

    def round_ratios(n):
        return [t / f for t, f in zip(times[n], times["floor"], strict=True)]

    # -- profile (before the memory pass, which changes the allocator; printed after the table) ------
    time_missed = [c for c, (_, _, goal) in CONFIGS.items() if median(round_ratios(f"peftlab {c}")) > goal]
    prof = ""
    if (time_missed or args.profile) and not args.no_profile:
        worst = max(CONFIGS, key=lambda c: median(round_ratios(f"peftlab {c}")) / CONFIGS[c][2])
        log(f"profiling one step ({worst}) ...")
        prof = profile_step(variants, ["floor", f"peft {worst}", f"peftlab {worst}"], ids)

    # -- memory --------------------------------------------------------------------------------------
    mem = {n: None for n in names}
    if memory_probe() is None:
        log("memory: unsupported here (needs Linux /proc/self/clear_refs and glibc mallopt)")
    else:
        reps = 1 if args.quick else 2
        log(f"memory: {reps} step(s) per variant, peak RSS growth, each variant in a fresh process")
        samples = {n: memory_in_child(n, reps, args.dtype) for n in names}
        mem = {n: median(s) for n, s in samples.items()}
        mem_spread = {n: (min(s), max(s)) for n, s in samples.items()}
    static = {n: state_bytes(variants[n]) for n in names}
    log("done measuring")

    # -- table ---------------------------------------------------------------------------------------
    rows = []
    for c, (_, _, goal) in CONFIGS.items():
        pf, pl = f"peft {c}", f"peftlab {c}"
        rows.append((f"r8 {c}: step time (ms)", 1e3 * median(times["floor"]), 1e3 * median(times[pf]),
                     1e3 * median(times[pl]), "ms", None, None))
        rows.append((f"r8 {c}: step time / floor", 1.0, median(round_ratios(pf)), median(round_ratios(pl)),
                     "x", goal, min(round_ratios(pl))))
        if mem["floor"]:
            rows.append((f"r8 {c}: step peak RSS growth", mem["floor"], mem[pf], mem[pl], "MB", None, None))
            rows.append((f"r8 {c}: step peak growth / floor", 1.0, mem[pf] / mem["floor"],
                         mem[pl] / mem["floor"], "x", MEM_GOAL, None))
            tot = {n: static[n] + mem[n] for n in (pf, pl, "floor")}
            rows.append((f"r8 {c}: peak incl. weights+state / floor", 1.0, tot[pf] / tot["floor"],
                         tot[pl] / tot["floor"], "x", None, None))
        else:
            rows.append((f"r8 {c}: step peak growth / floor", None, None, None, "x", MEM_GOAL, None))
    # the peftlab column of these rows: the same adapter with inputs kept (recompute off)
    rows.append(("  inputs kept (before): step time / floor", 1.0, median(round_ratios("peft all-linear")),
                 median(round_ratios(KEPT)), "x", None, None))
    if mem["floor"]:
        rows.append(("  inputs kept (before): peak growth / floor", 1.0, mem["peft all-linear"] / mem["floor"],
                     mem[KEPT] / mem["floor"], "x", None, None))
    print()
    print_table(rows)
    print()
    spread = (max(times["floor"]) - min(times["floor"])) / median(times["floor"])
    print(f"floor spread (max-min)/median {spread:.1%}; per-round ratio range: "
          + ", ".join(f"{n} {min(round_ratios(n)):.3f}-{max(round_ratios(n)):.3f}" for n in names if n != "floor"))
    print("phase medians (ms, forward / backward / AdamW+zero_grad): " + "; ".join(
        f"{n} " + " / ".join(f"{1e3 * median(p[i] for p in phases[n]):.0f}" for i in range(3)) for n in names))
    if mem["floor"]:
        print("memory (MB): resident state (params+buffers+AdamW state) " + ", ".join(
            f"{n} {static[n] / 2**20:.0f}" for n in names) + "; step growth min-max " + ", ".join(
            f"{n} {lo / 2**20:.0f}-{hi / 2**20:.0f}" for n, (lo, hi) in mem_spread.items()))
    print("floor = frozen model, forward + backward to detached grad-requiring input embeddings (no optimizer); "
          "LoRA step = forward + backward + AdamW.step + zero_grad(set_to_none=True). Memory: kernel VmHWM "
          "after a reset, minus VmRSS before the step, glibc mmap threshold fixed at 64 KiB (see docstring).")

    missed = [r[0] for r in rows if r[5] is not None and r[3] is not None and r[3] > r[5]]
    print(f"\npeftlab goals missed: {missed or 'none'}")
    if prof:
        print(prof)
    print(f"\ntotal wall time {now() - t_start:.0f} s")


if __name__ == "__main__":
    main()
