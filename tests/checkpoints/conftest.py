"""Fixtures of the checkpoint tests; `offline` (an empty Hub cache, HF_HUB_OFFLINE=1) lives in
tests/_checkpoints.py, which test_doc_examples.py shares."""
from _checkpoints import offline  # noqa: F401
