"""Datasets: folders or in-memory image batches -> cached latents and text embeddings -> batches.

Public entry points: `TrainingSet.build(...)` (everything before training), `items_from_tensors(...)` (ComfyUI
IMAGE batches), and `benchmark_sampling(...)` (video frame-sampling timings for the bench command).
"""

from trainer.data.sources import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, MediaItem, items_from_tensors, scan_folder
from trainer.data.training_set import Sample, TrainingSet, scan_datasets, validate_dataset_config
from trainer.data.video import benchmark_sampling

__all__ = [
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "MediaItem",
    "Sample",
    "TrainingSet",
    "benchmark_sampling",
    "items_from_tensors",
    "scan_datasets",
    "scan_folder",
    "validate_dataset_config",
]
