import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The tests' models are tiny: their ops are too small to split across threads, and one thread keeps CPU
# results independent of the machine's core count.
torch.set_num_threads(1)


# CI runs the property tests on a fixed sequence of examples: a red CI must be reproducible on a laptop.
try:
    import os

    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")
except ImportError:  # hypothesis is a test requirement; its absence fails the tests that use it, not all
    pass
