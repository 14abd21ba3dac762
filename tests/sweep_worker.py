"""A real ``workbench sweep`` process for the store tests, with each fact slowed down.

Usage: ``python tests/sweep_worker.py DELAY SWEEP-ARGS...``. ``DELAY`` is seconds to sleep
before each fact, or the path of a gate file: each fact waits while that file exists. Either
gives the tests time to kill the process mid-sweep or to start a concurrent run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch


def main() -> int:
    torch.set_num_threads(1)
    import workbench.tracing.dataset as ds
    from workbench.cli import main as cli_main

    delay = sys.argv[1]
    real = ds._trace_fact

    def slow(*args, **kwargs):
        try:
            time.sleep(float(delay))
        except ValueError:
            while Path(delay).exists():
                time.sleep(0.05)
        return real(*args, **kwargs)

    ds._trace_fact = slow
    return cli_main(["sweep", *sys.argv[2:]])


if __name__ == "__main__":
    sys.exit(main())
