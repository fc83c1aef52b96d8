"""Python's garbage collector in the job's processes, its driver and every Ray worker. A full pass walks every object
alive, and a process importing torch, Lightning and Ray made dozens: a quarter of a Train worker's imports. At exit
the passes free nothing that the process's end does not (benchmarks/RESULTS.md)."""

from __future__ import annotations

import atexit
import gc

FULL_PASS_EVERY = 1000  # younger passes between two full ones (Python's default: 10)
# ray.init's worker_process_setup_hook: each of the job's Ray workers runs it as it starts, before its task's imports
IN_EVERY_WORKER = f"{__name__}.for_a_long_lived_process"


def for_a_long_lived_process() -> None:
    """What is alive now (the imports so far) set aside for good, full passes far apart, and none at exit."""
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_PASS_EVERY)
    atexit.register(gc.freeze)
