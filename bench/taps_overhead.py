#!/usr/bin/env python
"""What activation taps cost: forward time of an AdaptedModel against the plain model.

Rows (same weights, same inputs, timed in interleaved rounds in one process, median of rounds):
* plain: the transformers model itself (the baseline);
* adapted, no objectives: `peftlab.adapt(model)` without loss terms — the taps object exists
  but no hook is installed (the claim: ratio 1.00 within noise);
* density term removed: a DEFT term was added and removed again (its hooks must be gone);
* taps installed, not recording: a density term is registered but the model is in eval mode,
  so the pre-hooks run and return at once (the cost of an idle hook);
* recording (training forward with the density term): what DEFT actually pays, for reference.

Shapes: MiniLM-L6 (BERT, hidden 384, 6 layers, d_ff 1536) with random weights, or the SmolLM2
architecture with `--model smollm2`; forward only under no_grad except the recording row.

Usage: python bench/taps_overhead.py [--model minilm|smollm2] [--batch 16] [--seq 128] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, LlamaForCausalLM

import peftlab
from peftlab.training.objectives import density_term

sys.path.insert(0, str(Path(__file__).parent))
from common import print_columns, smollm2_config  # noqa: E402  (bench/common.py)


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "smollm2":
        cfg = smollm2_config()
        cfg.num_hidden_layers = 8    # timing per layer is what matters; keeps the run short
        return LlamaForCausalLM(cfg).eval()
    return BertModel(BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                intermediate_size=1536)).eval()


def timed(fn, repeats: int) -> float:
    fn()                                     # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["minilm", "smollm2"], default="minilm")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=3, help="forwards per measurement")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    plain = build(args.model)
    ids = torch.randint(0, 1000, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)

    def forward(model):
        def run():
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
        return run

    adapted = peftlab.adapt(build(args.model))
    removed = peftlab.adapt(build(args.model))
    removed.add_loss_term(density_term(1.0))
    removed.remove_loss_term("density")
    idle = peftlab.adapt(build(args.model))
    idle.add_loss_term(density_term(1.0))
    recording = peftlab.adapt(build(args.model))
    recording.add_loss_term(density_term(1.0))

    def record():
        recording.train()
        for m in recording.modules():      # dropout off: the same arithmetic as the others
            if isinstance(m, torch.nn.Dropout):
                m.eval()
        with torch.no_grad():
            recording(input_ids=ids, attention_mask=mask)
        recording.auxiliary_loss()

    rows = {"plain model": forward(plain), "adapted, no objectives": forward(adapted),
            "density term added then removed": forward(removed),
            "taps installed, not recording (eval)": forward(idle.eval()),
            "recording (training forward + density)": record}
    times: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(args.rounds):
        for name, fn in rows.items():      # interleaved: drift hits every row alike
            times[name].append(timed(fn, args.repeats))
    base = statistics.median(times["plain model"])
    print(f"{args.model} shape, batch {args.batch} × {args.seq} tokens, {args.threads} thread(s), "
          f"median of {args.rounds} rounds × {args.repeats} forwards")
    body = []
    for name, ts in times.items():
        med = statistics.median(ts)
        ratios = sorted(t / b for t, b in zip(ts, times["plain model"], strict=True))
        body.append((name, f"{1e3 * med:.1f}", f"{med / base:.3f}",
                     f"{ratios[0]:.3f}–{ratios[-1]:.3f}"))
    print_columns(("forward", "ms", "ratio vs plain", "per-round ratios"), body)


if __name__ == "__main__":
    main()
