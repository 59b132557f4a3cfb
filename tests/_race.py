"""Steering threads racing a writer of settings: the harness the thread tests share."""
from __future__ import annotations

import sys
import threading

import torch


def race(steer, settings: list, apply, calls_per_reader: int, readers: int = 4) -> tuple[list, list]:
    """`readers` threads steer while one more flips between `settings` (applied by `apply`).
    Returns what each setting alone steers to, and every output the readers got."""
    expected = []
    for setting in settings:
        apply(setting)
        expected.append(steer())
    assert not torch.equal(expected[0], expected[1])
    stop = threading.Event()
    outputs: list[torch.Tensor] = []
    lock = threading.Lock()

    def writer():
        i = 0
        while not stop.is_set():
            apply(settings[i % 2])
            i += 1

    def reader():
        got = [steer() for _ in range(calls_per_reader)]
        with lock:
            outputs.extend(got)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # hand the GIL over often, so a read can land inside an update
    w = threading.Thread(target=writer)
    threads = [threading.Thread(target=reader) for _ in range(readers)]
    w.start()
    for r in threads:
        r.start()
    for r in threads:
        r.join()
    stop.set()
    w.join()
    sys.setswitchinterval(switch)
    assert len(outputs) == readers * calls_per_reader
    return expected, outputs
