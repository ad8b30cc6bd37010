import os
import sys

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="module", autouse=True)
def one_thread(request):
    """Tiny models run on one thread: with tiny tensors intra-op threads only spin (up to
    50x slower on a busy 2-core machine). Real-model tests keep every thread."""
    if request.module.__name__.split(".")[-1] in ("test_smollm2", "test_hub", "test_gemma3"):
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def forwards(lm):
    """Counts forward passes of the test module's ``lm`` (a pre-hook on the transformers model):
    bad input must be refused before any of them."""
    calls = []
    handle = lm.hf.register_forward_pre_hook(lambda module, args: calls.append(1))
    yield calls
    handle.remove()
