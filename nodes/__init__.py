"""The Phase Trainer nodes (ComfyUI V3 schema). The repo's __init__.py hands `PhaseTrainerExtension` to ComfyUI.

Nodes are thin: each turns its inputs into the library's objects (trainer.comfy_bridge) and calls it.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The library is the top-level package `trainer` (the CLI and the tests import it so); ComfyUI imports this
# pack by folder, so the repo root goes on sys.path first.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import trainer  # noqa: E402

if Path(trainer.__file__).resolve().parent != _ROOT / "trainer":
    raise ImportError(f"another package named 'trainer' ({trainer.__file__}) was imported before Phase Trainer's "
                      f"({_ROOT / 'trainer'}); remove or rename it")

from comfy_api.latest import ComfyExtension, io  # noqa: E402

from .datasets import ImageFolderDataset, ImagesToDataset, MergeDatasets, VideoFolderDataset  # noqa: E402
from .jobs import ExportJob  # noqa: E402
from .metrics import PlotMetrics  # noqa: E402
from .models import LoadTrainingModel, LoadTrainingModelFile  # noqa: E402
from .network import LoRANetwork  # noqa: E402
from .schedule import AlphaPhase, AlphaSchedulePreset  # noqa: E402
from .train import Train  # noqa: E402

NODES: list[type[io.ComfyNode]] = [
    LoadTrainingModel, LoadTrainingModelFile, ImageFolderDataset, VideoFolderDataset, ImagesToDataset, MergeDatasets, LoRANetwork,
    AlphaPhase, AlphaSchedulePreset, Train, PlotMetrics, ExportJob,
]


class PhaseTrainerExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
