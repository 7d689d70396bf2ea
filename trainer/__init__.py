"""Phase Trainer: LoRA training with progressive alpha phases. A plain library: never imports ComfyUI."""

__version__ = "0.2.0"
