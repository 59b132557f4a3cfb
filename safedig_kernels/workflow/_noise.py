"""Third-party log lines our own pipeline loads trigger and that tell a user nothing, dropped
only while we load (`pipelines.load_pipeline`, the demo world's pipeline)."""
from __future__ import annotations

import contextlib
import logging
import re
from typing import Iterator

__all__ = ["quiet_pipeline_noise"]

# Log lines (logger, message pattern) that our own pipeline loads trigger and that tell a user
# nothing. Both libraries log them through `logging` (not `warnings`) to handlers of their own.
_PIPELINE_NOISE = (
    # Importing diffusers' FLUX pipeline imports these processor classes; without torchvision
    # transformers falls back to the PIL ones and says so. No pipeline here processes images.
    ("transformers.utils.import_utils",
     re.compile(r"`(CLIP|Siglip)ImageProcessor` requires torchvision \(not installed\); falling back to")),
    # `.to(dtype=...)` of a model whose keep-in-float32 list is empty: there is nothing to keep.
    ("diffusers.models.modeling_utils", re.compile(r"There are modules in \w+ that should be kept in float32: \[\]\.")),
)


class _DropMatching(logging.Filter):
    def __init__(self, pattern: re.Pattern) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


@contextlib.contextmanager
def quiet_pipeline_noise() -> Iterator[None]:
    """Drop only the third-party log lines listed in `_PIPELINE_NOISE`, only inside the block;
    every other message of those loggers, and every warning, still gets through. The filters
    sit on the emitting loggers and are removed on exit."""
    installed = []
    for name, pattern in _PIPELINE_NOISE:
        log = logging.getLogger(name)
        f = _DropMatching(pattern)
        log.addFilter(f)
        installed.append((log, f))
    try:
        yield
    finally:
        for log, f in installed:
            log.removeFilter(f)
