#!/usr/bin/env python
"""Mixed batches: 16 LoRA adapters on one base, every example on its own adapter, in one batch.

Model: SmolLM2-135M-Instruct with its real weights (`peftlab.load_model("smollm2")`, offline),
16 LoRA adapters (r 16, alpha 32, every linear layer but the head: 210 sites each; A as LoRA
initialises it, B filled with N(0, 0.02) noise seeded per adapter, so every adapter differs),
example i on adapter i mod 16. peft gets the same 16 adapters through peftlab's peft-format
export (`export_peft`, then `PeftModel.from_pretrained` / `load_adapter`) and runs its own
mixed-batch path (`adapter_names=`); a sanity line prints how far the libraries' logits are apart.

What is measured (time.perf_counter, synchronised on CUDA; three copies of the model in one
process: base, peftlab, peft): each round runs base, peftlab and peft once in a rotated order
and a ratio is the median over rounds of (variant time / base time in the same round), which
cancels slow drift on a shared machine. One warm-up call per variant first (peftlab stacks the
adapters' weights there and keeps them while they are unchanged; generate warms up with one new
token).
  forward:  32 × 64 tokens, use_cache=False, inference mode.
  generate: 16 prompts of 16 tokens, 16 new tokens each, greedy (min_new_tokens = max_new_tokens,
            so every run decodes the same number of steps).
Goals: forward ≤ 1.25× base, generate ≤ 1.6× base, in bf16 (the default dtype; on a CPU it needs
AVX-512 BF16 or AMX to be fast, as torch's bf16 GEMMs fall back to slow code without them).
The base model is timed as loaded (its weights require grad); the adapted models are frozen.

`--rank-layout` also times one LoRA site alone (576 → 576, 32 × 64 tokens, 16 adapters of mixed
ranks): the stacks padded to the largest rank (what peftlab does) against grouping the rows by rank
(one gather + bmm pair per rank and a scatter).

Usage: python bench/mixed_batch.py [--device cuda|cpu] [--dtype bf16|fp16|fp32] [--rounds N]
                                   [--threads N] [--quick] [--rank-layout]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import peft  # noqa: E402
from common import print_columns  # noqa: E402  (bench/common.py)

import peftlab  # noqa: E402
from peftlab.core.layer import AdaptedLayer  # noqa: E402

now = time.perf_counter
median = statistics.median

N_ADAPTERS, RANK, ALPHA, SEED = 16, 16, 32, 0
GOALS = {"forward": 1.25, "generate": 1.6}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_T0 = now()


def log(msg: str) -> None:
    print(f"[{now() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def cpu_bf16_flags() -> str:
    """' +amx_bf16 +avx512_bf16': the CPU features that give bf16 GEMMs a fast path."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return ""
    return "".join(f" +{f}" for f in ("amx_bf16", "avx512_bf16") if f in flags)


def build(device: str, dtype: torch.dtype, tmp: str):
    """(base, peftlab AdaptedModel, peft PeftModel), the adapters u0 ... u15 in both."""
    base, _ = peftlab.load_model("smollm2", kind="causal-lm")
    base = base.to(device=device, dtype=dtype).eval()
    am = peftlab.adapt(copy.deepcopy(base))
    names = [f"u{i}" for i in range(N_ADAPTERS)]
    torch.manual_seed(SEED)     # LoRA's A initialisation
    for i, name in enumerate(names):
        am.add_adapter(name, peftlab.LoraConfig(r=RANK, alpha=ALPHA, targets="all-linear"))
        g = torch.Generator().manual_seed(SEED + 1 + i)
        with torch.no_grad():
            for layer in am.model.modules():
                if isinstance(layer, AdaptedLayer) and name in layer.deltas:
                    b = layer.deltas[name].lora_B
                    b.copy_(torch.randn(b.shape, generator=g) * 0.02)
        peftlab.export_peft(am, name, os.path.join(tmp, name))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), os.path.join(tmp, names[0]),
                                        adapter_name=names[0], autocast_adapter_dtype=False)
    for name in names[1:]:
        pm.load_adapter(os.path.join(tmp, name), adapter_name=name, autocast_adapter_dtype=False)
    return base, am, pm.eval()


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t = now()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return now() - t


def rounds_of(variants: dict, warmups: dict, rounds: int, device: str, what: str) -> dict[str, list[float]]:
    """One warm-up call each, then `rounds` rounds in rotated order; seconds per call."""
    names = list(variants)
    with torch.inference_mode():
        for n in names:
            log(f"  {what} warm-up {n}: {1e3 * timed(warmups[n], device):.0f} ms")
        times = {n: [] for n in names}
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                times[n].append(timed(variants[n], device))
            log(f"  {what} round {r + 1}/{rounds}: "
                + "  ".join(f"{n}={1e3 * times[n][-1]:.0f}ms" for n in names))
    return times


def ratio(times: dict, name: str) -> float:
    return median(t / b for t, b in zip(times[name], times["base"], strict=True))


def rank_layouts(device: str, dtype: torch.dtype, reps: int) -> None:
    """One LoRA site of a routed batch: padded stacks vs grouping the rows by rank."""
    from torch.nn.utils.rnn import pad_sequence

    g = torch.Generator().manual_seed(SEED)
    n, t, d = 32, 64, 576
    x = torch.randn(n, t, d, generator=g).to(device, dtype)
    out = torch.randn(n, t, d, generator=g).to(device, dtype)
    weight = torch.randn(d, d, generator=g).to(device, dtype)
    index = (torch.arange(n) % N_ADAPTERS).to(device)
    rows_of = [list(range(s, n, N_ADAPTERS)) for s in range(N_ADAPTERS)]
    print("\none LoRA site (576 -> 576, 32 x 64 tokens, 16 adapters; ms, median of "
          f"{reps}; base linear for scale)")
    body = []
    for ranks in ([16], [8, 16], [4, 8, 16, 32], [2, 4, 8, 64]):
        slot_rank = [ranks[s % len(ranks)] for s in range(N_ADAPTERS)]
        As = [torch.randn(r, d, generator=g).to(device, dtype) for r in slot_rank]
        Bts = [torch.randn(r, d, generator=g).to(device, dtype) for r in slot_rank]
        A, Bt = pad_sequence(As, batch_first=True), pad_sequence(Bts, batch_first=True)
        groups = []
        for r in sorted(set(slot_rank)):
            slots = [s for s in range(N_ADAPTERS) if slot_rank[s] == r]
            rows = [b for s in slots for b in rows_of[s]]
            local = torch.tensor([slots.index(s) for s in slots for _ in rows_of[s]], device=device)
            groups.append((torch.tensor(rows, device=device), local,
                           torch.stack([As[s] for s in slots]), torch.stack([Bts[s] for s in slots])))

        def padded(A=A, Bt=Bt):
            h = torch.bmm(x, A.index_select(0, index).transpose(1, 2))
            return torch.baddbmm(out, h, Bt.index_select(0, index))

        def grouped(groups=groups):
            acc = out.clone()
            for rows, local, Ag, Btg in groups:
                h = torch.bmm(x.index_select(0, rows), Ag.index_select(0, local).transpose(1, 2))
                acc.index_add_(0, rows, torch.bmm(h, Btg.index_select(0, local)))
            return acc

        fns = {"padded": padded, "grouped": grouped, "base": lambda: torch.nn.functional.linear(x, weight)}
        # the same sums in another order: fp32 agrees to ~1e-5, bf16 to its last bits (~1e-2 of 10)
        tol = 1e-2 if dtype == torch.float32 else 0.1
        torch.testing.assert_close(padded(), grouped(), atol=tol, rtol=tol)
        times = {k: [] for k in fns}
        for _ in range(reps):
            for k, f in fns.items():
                times[k].append(1e3 * timed(f, device))
        body.append((str(ranks), *(f"{median(times[k]):.2f}" for k in fns)))
    print_columns(("ranks (cycled over 16 adapters)", "padded to max rank", "grouped by rank",
                   "base linear"), body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=DTYPES, default="bf16",
                    help="bf16 is the goal's; fp32 on a CPU without AVX-512 BF16 / AMX")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    ap.add_argument("--rank-layout", action="store_true", help="also time padded vs grouped ranks")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    dtype = DTYPES[args.dtype]
    fwd_shape, n_prompts, prompt_len, new_tokens = ((4, 16), 4, 8, 4) if args.quick else ((32, 64), 16, 16, 16)
    rounds = 2 if args.quick else args.rounds
    where = (torch.cuda.get_device_name() if device == "cuda"
             else f"cpu {torch.backends.cpu.get_cpu_capability()}{cpu_bf16_flags()}, "
                  f"{torch.get_num_threads()} threads")
    print(f"peftlab {peftlab.__version__}, peft {peft.__version__}, torch {torch.__version__}; {where}; "
          f"{str(dtype).removeprefix('torch.')}; SmolLM2-135M-Instruct, {N_ADAPTERS} LoRA adapters "
          f"r={RANK} alpha={ALPHA} all-linear, example i on adapter i mod {N_ADAPTERS}; {rounds} rounds")

    log("building base, peftlab and peft models ...")
    with tempfile.TemporaryDirectory(prefix="mixed_batch_") as tmp:
        base, am, pm = build(device, dtype, tmp)
    names = [f"u{i}" for i in range(N_ADAPTERS)]
    g = torch.Generator().manual_seed(SEED)

    ids = torch.randint(0, base.config.vocab_size, fwd_shape, generator=g).to(device)
    route = [names[i % N_ADAPTERS] for i in range(fwd_shape[0])]
    with torch.inference_mode():
        ours = am(input_ids=ids, adapter_ids=route, use_cache=False).logits.float()
        theirs = pm(input_ids=ids, adapter_names=route, use_cache=False).logits.float()
        plain = base(input_ids=ids, use_cache=False).logits.float()
    print(f"sanity: max|logits| {plain.abs().max():.2f}; adapters move them by max {(ours - plain).abs().max():.3f}; "
          f"max|peftlab - peft| {(ours - theirs).abs().max():.4f}")

    log(f"forward {fwd_shape[0]}x{fwd_shape[1]} ...")
    forwards = {
        "base": lambda: base(input_ids=ids, use_cache=False),
        "peftlab": lambda: am(input_ids=ids, adapter_ids=route, use_cache=False),
        "peft": lambda: pm(input_ids=ids, adapter_names=route, use_cache=False),
    }
    fwd = rounds_of(forwards, forwards, rounds, device, "forward")

    prompts = torch.randint(0, base.config.vocab_size, (n_prompts, prompt_len), generator=g).to(device)
    groute = [names[i % N_ADAPTERS] for i in range(n_prompts)]
    settings = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
                "pad_token_id": base.config.pad_token_id, "attention_mask": torch.ones_like(prompts)}
    log(f"generate {n_prompts} prompts x {new_tokens} new tokens ...")
    def generates(**extra):
        kw = settings | extra
        return {"base": lambda: base.generate(prompts, **kw),
                "peftlab": lambda: am.generate(prompts, adapter_ids=groute, **kw),
                "peft": lambda: pm.generate(input_ids=prompts, adapter_names=groute, **kw)}

    # warm-up: one new token (peft's mixed generate is slow on a CPU; nothing needs a long warm-up)
    gen = rounds_of(generates(), generates(max_new_tokens=1, min_new_tokens=1), rounds, device, "generate")

    body = []
    for what, times in (("forward", fwd), ("generate", gen)):
        shape = (f"{fwd_shape[0]} x {fwd_shape[1]} tokens" if what == "forward"
                 else f"{n_prompts} prompts x {new_tokens} new tokens")
        pl, pf = ratio(times, "peftlab"), ratio(times, "peft")
        body.append((f"{what}, {shape}", f"{1e3 * median(times['base']):.0f}",
                     f"{pl:.2f}x", f"{pf:.2f}x", f"{pf / pl:.2f}", f"<= {GOALS[what]}x",
                     "yes" if pl <= GOALS[what] else "no"))
    print()
    print_columns(("mixed batch, 16 adapters", "base ms", "peftlab / base", "peft / base",
                   "peft / peftlab", "goal", "met?"), body)
    if args.rank_layout:
        rank_layouts(device, dtype, reps=3 if args.quick else 20)
    print(f"\ntotal wall time {now() - _T0:.0f} s")


if __name__ == "__main__":
    main()
