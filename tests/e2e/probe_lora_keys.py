"""Ask a real ComfyUI install which keys of a LoRA file it applies to a model, and what it does to the weights.

Runs with ComfyUI's own Python and cwd = the ComfyUI root (it imports `comfy`); never imported by the
trainer or by the test process. It follows the stock LoraLoaderModelOnly path: `comfy.utils.load_torch_file`
then `comfy.sd.load_lora_for_models`, whose key map is `comfy.lora.model_lora_keys_unet` of the loaded model.

    python probe_lora_keys.py MODEL LORA [LORA ...] [--strength S] [--dump-dir DIR] [--out JSON]
                              [--diffusers-unet] [--save-converted OUT]

The model is loaded once; each LoRA is applied alone (then unpatched). Prints a JSON list, one object per
LoRA, as the last line of stdout (and writes it to --out when given). Each object has:
  model_class, unet_config   what ComfyUI's detection made of MODEL
  model_missing/unexpected   weights ComfyUI could not place (a bad conversion shows here)
  lora_keys                  number of tensors in LORA
  patches_applied            number of model weights that received a patch
  not_loaded                 keys logged as "lora key not loaded" (ComfyUI ignores them silently)
  not_patched                patch targets ComfyUI mapped but the model lacks ("NOT LOADED")
  max_abs_delta              {model weight key: max |patched - base|} for every patched weight
  lora_targets               {LoRA module name in the file: the model weight key ComfyUI maps it to}
  not_loaded etc. are per LoRA; model_* fields repeat the model's in every object.
--dump-dir writes, per LoRA, patched - base for every patched weight to DIR/deltas_<i>.safetensors (keys as in
the model, e.g. "diffusion_model.blocks.0.self_attn.q.weight"; path in "deltas_file") so a caller can compare
with its own expected delta.
--diffusers-unet: MODEL is a diffusers-format UNet2DConditionModel state dict (any channel_mult / depth);
it is renamed to ComfyUI's ldm layout with ComfyUI's own `comfy.utils.unet_to_diffusers` map (ComfyUI only
auto-converts diffusers UNets whose config equals a full-size release), then detected from the ldm weights.
"""

import argparse
import ast
import json
import logging
import os
import sys

MISSING_PREFIX = "unet missing: "
UNEXPECTED_PREFIX = "unet unexpected: "
NOT_LOADED_PREFIX = "lora key not loaded: "
NOT_PATCHED_PREFIX = "NOT LOADED "


class _Collector(logging.Handler):
    """Keeps every message ComfyUI logs; its LoRA and weight-loading diagnostics are only log lines."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def with_prefix(self, prefix):
        return [m[len(prefix):] for m in self.messages if m.startswith(prefix)]


def _parse_key_lists(payloads):
    keys = []
    for payload in payloads:
        keys.extend(ast.literal_eval(payload))
    return keys


def diffusers_unet_to_ldm(sd):
    """Rename a diffusers UNet2DConditionModel state dict to ComfyUI's ldm names using ComfyUI's map."""
    import comfy.model_detection
    import comfy.utils

    count = comfy.model_detection.count_blocks
    if "conv_in.weight" not in sd:
        raise SystemExit("--diffusers-unet: the model has no conv_in.weight; not a diffusers UNet state dict")
    model_channels = sd["conv_in.weight"].shape[0]
    n_down = count(sd, "down_blocks.{}.")
    num_res_blocks, channel_mult, depth = [], [], []
    for i in range(n_down):
        n_res = count(sd, "down_blocks.%d.resnets.{}." % i)
        num_res_blocks.append(n_res)
        channel_mult.append(sd["down_blocks.%d.resnets.0.conv2.weight" % i].shape[0] // model_channels)
        for j in range(n_res):
            depth.append(count(sd, "down_blocks.%d.attentions.%d.transformer_blocks.{}." % (i, j)))
    depth_output = []
    for i in range(count(sd, "up_blocks.{}.")):
        for j in range(count(sd, "up_blocks.%d.resnets.{}." % i)):
            depth_output.append(count(sd, "up_blocks.%d.attentions.%d.transformer_blocks.{}." % (i, j)))
    unet_config = {
        "num_res_blocks": num_res_blocks,
        "channel_mult": channel_mult,
        "transformer_depth": depth,
        # unet_to_diffusers pops this list from the end while walking up_blocks from 0
        "transformer_depth_output": list(reversed(depth_output)),
        "transformer_depth_middle": count(sd, "mid_block.attentions.0.transformer_blocks.{}."),
    }
    mapping = comfy.utils.unet_to_diffusers(unet_config)
    unmapped = sorted(k for k in sd if k not in mapping)
    if unmapped:
        raise SystemExit("--diffusers-unet: ComfyUI's map has no ldm name for %d keys, e.g. %s"
                         % (len(unmapped), unmapped[:5]))
    return {mapping[k]: v for k, v in sd.items()}


def _load_model(path, diffusers_unet, save_converted):
    import comfy.sd
    import comfy.utils

    if not diffusers_unet:
        model = comfy.sd.load_diffusion_model(path)
    else:
        sd = diffusers_unet_to_ldm(comfy.utils.load_torch_file(path, safe_load=True))
        if save_converted:
            comfy.utils.save_torch_file(sd, save_converted)
        model = comfy.sd.load_diffusion_model_state_dict(sd)
    if model is None:
        raise SystemExit("ComfyUI could not detect a model type from %s" % path)
    return model


# Tensor-name endings ComfyUI's LoRA adapters read after a module name (comfy/weight_adapter/lora.py, comfy/lora.py)
LORA_SUFFIXES = (
    ".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", ".lora_B.weight", ".lora_A.weight",
    ".lora.up.weight", ".lora.down.weight", ".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight",
    "_lora.up.weight", "_lora.down.weight", ".alpha", ".dora_scale", ".diff", ".diff_b", ".set_weight",
)


def lora_targets(lora_keys, key_map):
    """Which model weight each LoRA module of the file maps to, by ComfyUI's key map."""
    targets = {}
    for key in lora_keys:
        for suffix in LORA_SUFFIXES:
            module = key[:-len(suffix)]
            if key.endswith(suffix) and module in key_map:
                targets[module] = key_map[module]
                break
    return targets


def _jsonable(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def probe(model_path, lora_paths, strength, dump_dir, diffusers_unet, save_converted):
    """One result per LoRA file, each applied alone to the same loaded model (loaded once: it is the slow part)."""
    collector = _Collector()
    root = logging.getLogger()
    root.addHandler(collector)
    root.addHandler(logging.StreamHandler(sys.stderr))  # ComfyUI's own log stays readable for a human
    root.setLevel(logging.INFO)

    import comfy.cli_args
    comfy.cli_args.args.cpu = True  # before model_management is imported: no accelerator probing
    import torch
    import comfy.lora
    import comfy.model_management
    import comfy.sd
    import comfy.utils
    import comfyui_version
    import safetensors.torch

    model = _load_model(model_path, diffusers_unet, save_converted)
    model_info = {
        "comfyui_version": comfyui_version.__version__,
        "model_file": os.path.abspath(model_path),
        "model_class": type(model.model).__name__,
        "model_config": type(model.model.model_config).__name__,
        "unet_config": _jsonable(model.model.model_config.unet_config),
        "model_missing": _parse_key_lists(collector.with_prefix(MISSING_PREFIX)),
        "model_unexpected": _parse_key_lists(collector.with_prefix(UNEXPECTED_PREFIX)),
    }
    base = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})

    results = []
    for i, lora_path in enumerate(lora_paths):
        collector.messages.clear()
        lora = comfy.utils.load_torch_file(lora_path, safe_load=True)
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0)
        patched_keys = sorted(patched.patches)
        # The same call sampling makes: it writes the patched weights into the model.
        comfy.model_management.load_models_gpu([patched], force_patch_weights=True)
        after = patched.model.state_dict()
        deltas = {k: after[k].float() - base[k].float() for k in patched_keys}
        changed_without_patch = sorted(k for k in base if k not in deltas and not torch.equal(after[k], base[k]))
        result = dict(model_info)
        result.update({
            "lora_file": os.path.abspath(lora_path),
            "key_map_size": len(key_map),
            "lora_keys": len(lora),
            "patches_applied": len(patched_keys),
            "patched_keys": patched_keys,
            "lora_targets": _jsonable(lora_targets(lora, key_map)),
            "not_loaded": collector.with_prefix(NOT_LOADED_PREFIX),
            "not_patched": collector.with_prefix(NOT_PATCHED_PREFIX),
            "changed_without_patch": changed_without_patch,
            "max_abs_delta": {k: float(d.abs().max()) for k, d in deltas.items()},
        })
        if dump_dir:
            result["deltas_file"] = os.path.join(os.path.abspath(dump_dir), "deltas_%d.safetensors" % i)
            safetensors.torch.save_file({k: d.contiguous() for k, d in deltas.items()}, result["deltas_file"])
        results.append(result)
        del deltas, after
        # Unpatch (restores the backed-up weights) so the next LoRA starts from the base model.
        comfy.model_management.unload_all_models()
        restored = model.model.state_dict()
        if any(not torch.equal(restored[k], base[k]) for k in patched_keys):
            raise SystemExit("ComfyUI did not restore the base weights after unloading %s" % lora_path)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="diffusion model .safetensors (ComfyUI native / ldm keys)")
    parser.add_argument("lora", nargs="+", help="LoRA .safetensors file(s); each is applied alone")
    parser.add_argument("--strength", type=float, default=1.0, help="strength_model, as in LoraLoaderModelOnly")
    parser.add_argument("--dump-dir", help="write patched - base per patched weight to DIR/deltas_<i>.safetensors")
    parser.add_argument("--out", help="also write the JSON result to this file")
    parser.add_argument("--diffusers-unet", action="store_true",
                        help="MODEL is a diffusers-format UNet2DConditionModel state dict")
    parser.add_argument("--save-converted", help="with --diffusers-unet: write the ldm-format UNet here")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.getcwd())  # ComfyUI's packages live in its root, the expected cwd
    results = probe(args.model, args.lora, args.strength, args.dump_dir, args.diffusers_unet,
                    args.save_converted)
    text = json.dumps(results)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.out)
    sys.stdout.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
