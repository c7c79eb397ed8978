"""Training: the loop, tasks, and the training-side methods (DEFT objectives, GaLore / LoRA+ optimisers,
Light-PEFT pruning, PEFTDebias)."""
