"""Run under ComfyUI's python (cwd = ComfyUI root): load a umt5 text-encoder file as CLIPLoader(type="wan") does
(comfy.sd.load_clip) and encode captions through trainer.comfy_encoders.comfy_wan_encoders.

    python comfy_umt5_encode.py TEXT_ENCODER_FILE TINY_CONFIG_JSON CAPTIONS_JSON OUT.safetensors

CAPTIONS_JSON: a list of captions, already cleaned as the family cleans them. OUT gets "h{i}" = [512, d] per
caption, plus "raw{i}" = ComfyUI's own encode_from_tokens output for the caption tokenized without our escaping
and truncation (to show what the adapter changes)."""

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, os.getcwd())


def main(te_file: str, config_json: str, captions_json: str, out: str) -> None:
    os.environ["PT_TINY_UMT5_CONFIG"] = config_json
    from comfy.cli_args import args

    args.cpu = True
    import comfy.sd
    import importlib.util  # ComfyUI has its own `tests` package: load the patch by path

    spec = importlib.util.spec_from_file_location("comfy_tiny_umt5", Path(__file__).with_name("comfy_tiny_umt5")
                                                  / "__init__.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # the tiny config, see its docstring
    import torch
    from safetensors.torch import save_file

    from trainer.comfy_encoders import comfy_wan_encoders

    clip = comfy.sd.load_clip([te_file], clip_type=comfy.sd.CLIPType.WAN)
    captions = json.loads(Path(captions_json).read_text())
    encoders = comfy_wan_encoders(clip=clip)
    hidden = encoders.encode_prompts(captions, 512)
    tensors = {f"h{i}": item["encoder_hidden_states"].contiguous() for i, item in enumerate(hidden)}
    for i, caption in enumerate(captions):
        raw = clip.encode_from_tokens(clip.tokenize(caption))
        tensors[f"raw{i}"] = (raw[0] if isinstance(raw, (tuple, list)) else raw)[0].float().contiguous()
    tensors["model_class"] = torch.tensor([len(type(clip.cond_stage_model).__mro__)])
    save_file(tensors, out)
    print("comfy text encoder:", type(clip.cond_stage_model).__name__,
          sum(p.numel() for p in clip.cond_stage_model.parameters()), "parameters")


if __name__ == "__main__":
    main(*sys.argv[1:5])
