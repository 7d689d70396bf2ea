"""The weights a real ComfyUI computes from a (scaled-fp8) diffusion-model file, saved for comparison.

Runs with ComfyUI's own Python and cwd = the ComfyUI root (it imports `comfy`); never imported by the trainer or
the test process. It loads MODEL the way the stock UNETLoader does (`comfy.sd.load_diffusion_model` with no
options) and, for every parameter of the diffusion model, saves the weight its ops compute with: a quantized
weight through ComfyUI's own cast (`comfy.ops.cast_bias_weight`; when that leaves it quantized, because the
compute dtype is already the layout's, the layout's dequantize that F.linear falls back to), in the compute
dtype ComfyUI picked, and also dequantized to float32 by the same layout; the rest as loaded.

    python comfy_fp8_weights.py MODEL OUT.safetensors OUT.json

OUT.safetensors: {native key: weight in ComfyUI's compute dtype (float32 on CPU)} and, per quantized weight,
{native key + "@f32" / "@bf16": the layout's dequantize to float32 / bfloat16 (what a bf16 model computes)}.
OUT.json: {"compute_dtype", "quantized": {native key: layout name}, "model_class", "missing", "unexpected"}.
"""

import json
import logging
import sys


def main(model_path, out_tensors, out_json):
    import torch

    import comfy.cli_args
    comfy.cli_args.args.cpu = True  # before model_management is imported: no accelerator probing
    import comfy.model_management
    import comfy.ops
    import comfy.sd
    from comfy.quant_ops import QuantizedTensor
    from safetensors.torch import save_file

    messages = []

    class Collector(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logging.getLogger().addHandler(Collector(level=logging.DEBUG))
    logging.getLogger().setLevel(logging.INFO)
    patcher = comfy.sd.load_diffusion_model(model_path)
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    model = patcher.model
    dm = model.diffusion_model
    compute_dtype = model.manual_cast_dtype or model.get_dtype()
    tensors, quantized = {}, {}
    for module_name, module in dm.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            key = f"{module_name}.{param_name}" if module_name else param_name
            if param_name == "input_scale":
                continue
            data = param.data if isinstance(param, torch.nn.Parameter) else param
            if param_name == "weight" and isinstance(data, QuantizedTensor):
                probe_input = torch.zeros(1, module.in_features, dtype=compute_dtype)
                weight, _ = comfy.ops.cast_bias_weight(module, probe_input, dtype=compute_dtype,
                                                          device=probe_input.device, bias_dtype=compute_dtype)
                if isinstance(weight, QuantizedTensor):  # the compute dtype is the layout's: F.linear dequantizes
                    weight = weight.dequantize()
                tensors[key] = weight.detach().clone().contiguous()
                layout = data._layout_cls if isinstance(data._layout_cls, str) else data._layout_cls.__name__
                for suffix, dt in (("@f32", torch.float32), ("@bf16", torch.bfloat16)):
                    params = data._params.__class__(scale=data._params.scale, orig_dtype=dt,
                                                    orig_shape=data._params.orig_shape)
                    tensors[key + suffix] = QuantizedTensor(data._qdata, layout, params).dequantize().contiguous()
                quantized[key] = layout
            else:
                tensors[key] = data.detach().clone().contiguous()
    save_file(tensors, out_tensors)
    missing = [m for m in messages if m.startswith("unet missing")]
    unexpected = [m for m in messages if m.startswith("unet unexpected")]
    with open(out_json, "w") as f:
        json.dump({"compute_dtype": str(compute_dtype), "quantized": quantized, "model_class": type(model).__name__,
                   "missing": missing, "unexpected": unexpected}, f)


if __name__ == "__main__":
    sys.path.insert(0, ".")
    main(*sys.argv[1:4])
