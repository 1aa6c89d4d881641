"""``python -m locosnn``: the command line (also what ``torchrun -m locosnn`` and ``--nproc`` run)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
