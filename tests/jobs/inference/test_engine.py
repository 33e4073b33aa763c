"""Serving's own decisions (jobs/inference/engine.py) that need no bank: when a prefetch thread
can hide retrieval."""

from __future__ import annotations

import os

import torch

from jobs.inference.engine import prefetch_pays


def test_prefetch_only_with_a_core_to_spare():
    cores = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(cores)  # the decode takes every core: a thread would only contend
        assert not prefetch_pays("cpu")
        if cores > 1:
            torch.set_num_threads(cores - 1)
            assert prefetch_pays("cpu")
        assert prefetch_pays("cuda")  # the decode runs on the device, the CPU is free
    finally:
        torch.set_num_threads(before)
