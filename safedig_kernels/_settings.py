"""Settings buffers that steering reads while other threads may change them.

Strengths and harmful masks live in small tensors changed in place (compiled graphs keep
reading the same address, so an update never recompiles). On the CPU a copy into such a
buffer is a plain memory copy, and a steering call on another thread could read it half
written: one update in ~1000 calls mixed old and new harmful ids under 4 readers. So every
write goes through `write_setting`, and an eager CPU steering call takes its copy of the
settings with `read_settings`, both under one lock: each call sees an update whole or not at
all. On CUDA the copy and the kernels that read the buffers are ordered on the stream
instead; under torch.compile the buffers are read in place (the graph cannot take a lock).
"""
from __future__ import annotations

import threading

import torch

__all__ = ["write_setting", "write_settings", "settings_update", "read_settings"]

_LOCK = threading.Lock()


def write_setting(buffer: torch.Tensor, value: torch.Tensor) -> None:
    """Copy `value` into `buffer`, seen by `read_settings` whole or not at all."""
    with _LOCK:
        buffer.copy_(value)


def write_settings(*updates: tuple[torch.Tensor, torch.Tensor]) -> None:
    """`write_setting` for several (buffer, value) pairs that form one update (a site's
    strengths and its harmful set): `read_settings` sees all of them or none."""
    with _LOCK:
        for buffer, value in updates:
            buffer.copy_(value)


def settings_update():
    """A context in which settings buffers may be written by other means (a module's
    `load_state_dict`) and still be seen by `read_settings` whole or not at all."""
    return _LOCK


def read_settings(*buffers: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """This call's copies of CPU settings buffers (the buffers themselves on CUDA or when traced)."""
    if torch.compiler.is_compiling() or not all(b.device.type == "cpu" for b in buffers):
        return buffers
    with _LOCK:
        return tuple(b.clone() for b in buffers)
