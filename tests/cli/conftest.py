"""The CLI tests run the tiny FLUX on one torch thread."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny model's ops take microseconds; a thread pool only slows them down (cli._options.torch_threads).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
