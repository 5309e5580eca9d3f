"""Entry point: `python deploy.py configs/00_offline_cpu.py [--dry-run] [--resume]`."""

import sys

from integration_training.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
