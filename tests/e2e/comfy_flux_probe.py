"""Run under ComfyUI's python (cwd = ComfyUI root): tests/e2e/probe_lora_keys.py for a small Flux model.

ComfyUI's model detection reads a Flux file's width, block counts and channels from the weights but fixes the
head count at FLUX.1's 24 (so the head size is 3072 / 24 = 128, the rope axes' 16 + 56 + 56). A test model
cannot be 3072 wide, so tests/e2e/comfy_tiny_flux sets the head count to width / 128 for a Flux narrower than
FLUX.1 and changes nothing else: key detection, the model class, the LoRA key map (comfy.utils.flux_to_diffusers,
with the width from the same config) and the patching are ComfyUI's.

    python comfy_flux_probe.py MODEL LORA [LORA ...] [probe_lora_keys.py options]
"""

import importlib.util
import os
import sys
from pathlib import Path

sys.path.insert(0, os.getcwd())

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True  # before model_management is imported: no accelerator probing

pack = importlib.util.spec_from_file_location("comfy_tiny_flux", Path(__file__).with_name("comfy_tiny_flux")
                                              / "__init__.py")
pack.loader.exec_module(importlib.util.module_from_spec(pack))  # the narrow-Flux head count, see its docstring

spec = importlib.util.spec_from_file_location("probe_lora_keys", Path(__file__).with_name("probe_lora_keys.py"))
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)

if __name__ == "__main__":
    sys.exit(probe.main(sys.argv[1:]))
