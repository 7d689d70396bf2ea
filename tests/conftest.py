import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The tests' models are tiny: their ops are too small to split across threads, and one thread keeps CPU
# results independent of the machine's core count.
torch.set_num_threads(1)

