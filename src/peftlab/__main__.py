"""`python -m peftlab ...`: the `peftlab` command, and what torchrun runs in each process
(`torchrun --nproc_per_node=N -m peftlab train ...`), as torchrun starts modules, not scripts."""

import sys

from .apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
