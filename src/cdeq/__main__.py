"""``python -m cdeq``: the ``cdeq`` command, also under ``torchrun --nproc_per_node=N -m cdeq run TASK``."""
import sys

from cdeq.cli import main

sys.exit(main())
