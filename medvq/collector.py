"""Python's garbage collector in the job's processes. A full pass walks every object alive: while a process imports
torch, Lightning and Ray the passes come ever more often and walk ever more, and at exit they free nothing that the
process's end does not (benchmarks/RESULTS.md). So each process of a job spaces them out from its start, and a
process that trains goes back to Python's pace once its imports are done."""

from __future__ import annotations

import atexit
import gc

PYTHONS_PACE = gc.get_threshold()  # as Python set it, read before anything here changes it
FULL_PASS_EVERY = 1000  # middle-generation passes between two full ones (Python's: 10)
# ray.init's worker_process_setup_hook: each of the job's Ray workers runs it as it starts, before its task's imports
WORKER_SETUP_HOOK = f"{__name__}.space_out_full_collections"


def space_out_full_collections() -> None:
    """What is alive now set aside for good, full passes far apart from here on, and none at exit. (Objects left in
    reference cycles at exit then go without their __del__: the job closes what it writes itself.)"""
    gc.freeze()
    young, middle, _ = PYTHONS_PACE
    gc.set_threshold(young, middle, FULL_PASS_EVERY)
    atexit.register(gc.freeze)


def back_to_pythons_pace() -> None:
    """Once a process that trains has imported what it needs: that set aside too, and full passes at Python's pace
    again, so that garbage in reference cycles (tensors on a GPU among it) waits no longer than it would."""
    gc.freeze()
    gc.set_threshold(*PYTHONS_PACE)
