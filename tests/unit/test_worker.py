"""The worker process's start-up: what it leaves to the cycle collector."""

from __future__ import annotations

import gc

from pipeline.worker import freeze_startup_heap


def test_start_up_objects_are_frozen_out_of_full_collections() -> None:
    """Objects alive at start-up are no longer walked by a full collection."""
    before = gc.get_freeze_count()
    alive = [[i] for i in range(1000)]  # tracked containers alive across the call
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() >= before + len(alive)
        walked = {id(o) for o in gc.get_objects()}  # what a full collection walks
        assert not any(id(x) in walked for x in alive)
    finally:
        gc.unfreeze()
