"""Run by tests/test_train.py (DDP) and tests/test_distributed.py (FSDP, two launches as two
"nodes") under torchrun with two processes: trains the tiny Llama adapter with batch_size=4 per
rank (global batch 8), evaluating every 2 steps (rank 0 alone under DDP; every rank under FSDP,
rank 0 recording), and reports what each rank saved.

    python -m torch.distributed.run --nproc_per_node=2 --standalone tests/ddp_worker.py OUT STEPS SEED [ENGINE [checkpointing]]
"""

import os
import sys

import torch

from peftlab import CapabilityError
from peftlab.training.distributed import gathered_adapter, process_group
from peftlab.training.loop import train

from test_train import EVAL, TRAIN, LMTask, cfg, make_am   # this script's folder is on sys.path


def run(am, steps: int, seed: int, engine: str, checkpointing: bool, out: str):
    # DDP: rank 0 evaluates every 2 steps while rank 1 goes on into the next step's all-reduce
    return train(am, "a", LMTask(), TRAIN, EVAL,
                 cfg(steps=steps, seed=seed, batch_size=4, eval_every=2, out=out, distributed=engine,
                     gradient_checkpointing=checkpointing))


def main() -> None:
    out, steps, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    engine = sys.argv[4] if len(sys.argv) > 4 else "ddp"
    checkpointing = sys.argv[5:] == ["checkpointing"]
    torch.set_num_threads(1)
    am = make_am()
    rank = int(os.environ["RANK"])
    if engine == "fsdp":
        with process_group():     # kept after train(): the sharded model needs it for a gathered save
            result = run(am, steps, seed, engine, checkpointing, out)
            assert torch.distributed.is_initialized()
            # the model stays sharded: saving outside gathered_adapter is refused, not a hang
            try:
                am.save_adapter(f"{out}-direct", "a")
                raise AssertionError("a sharded adapter was saved")
            except CapabilityError as e:
                assert "gathered_adapter" in str(e)
            with gathered_adapter(am, "a"):
                if rank == 0:
                    am.save_adapter(f"{out}-gathered", "a")
    else:
        result = run(am, steps, seed, engine, checkpointing, out)
        assert not torch.distributed.is_initialized()    # train() created the group, so it destroyed it
    assert bool(result.evals) == (rank == 0)
    assert result.rank == rank and result.world_size == 2
    print(f"rank {rank} saved {sorted(result.saved)}", flush=True)
    if rank == 0:
        print("losses " + " ".join(repr(x) for x in result.losses), flush=True)


if __name__ == "__main__":
    main()
