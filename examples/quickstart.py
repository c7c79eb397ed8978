"""Quickstart: LoRA on a small Llama built from a config, trained on a toy copy task, then merged,
saved, reloaded and exported in peft's format. Runs offline on a CPU in seconds.

    python examples/quickstart.py [--out runs/quickstart]
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftlab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/quickstart")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2)).eval()
    batch = torch.randint(0, 128, (8, 16))

    am = peftlab.adapt(model)
    am.add_adapter("copy", peftlab.LoraConfig(r=8, alpha=16, targets="all-linear"))
    am.set_active("copy")
    am.set_trainable("copy")
    print(f"trainable parameters: {am.trainable_parameters():,} of {am.base_parameters():,}")

    opt = torch.optim.AdamW([p for p in am.parameters() if p.requires_grad], lr=1e-2)
    am.train()
    for step in range(args.steps):
        loss = am(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.3f}")
    am.eval()

    with torch.no_grad():
        unmerged = am(input_ids=batch).logits
        am.merge("copy")
        merged = am(input_ids=batch).logits
        am.unmerge("copy")
    print(f"max |merged - unmerged| = {(merged - unmerged).abs().max():.2e}")

    saved = am.save_adapter(f"{args.out}/adapter", "copy")
    exported = peftlab.export_peft(am, "copy", f"{args.out}/peft")
    print(peftlab.card(am, "copy"))
    print(f"saved: {saved}  (peft format: {exported})")


if __name__ == "__main__":
    main()
