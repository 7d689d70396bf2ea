"""Load Training Model: which diffusers pipeline to train, checked now, loaded by the Train node each run."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from trainer.comfy_bridge import (
    MODEL_FILE_FOLDERS,
    TYPED_PATH,
    diffusers_folders,
    family_tooltip,
    model_file_choices,
    resolve_model_file,
    resolve_model_path,
    single_file_model,
)
from trainer.errors import ModelError
from trainer.families import FAMILIES, get_family
from trainer.job import DTYPES

from .common import CATEGORY, PREFIX, PTModel

NO_FILE = "none"


def _diffusers_roots() -> list[str]:
    return list(folder_paths.get_folder_paths("diffusers"))


class LoadTrainingModel(io.ComfyNode):
    """Outputs a light spec (family, path, dtype), not loaded weights: the Train node loads the model each run
    and drops its text encoders and VAE once the dataset is encoded, which a cached, shared model object
    could not survive on the next run."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        folders = diffusers_folders(_diffusers_roots())
        return io.Schema(
            node_id=f"{PREFIX}LoadModel",
            display_name="Load Training Model",
            category=CATEGORY,
            description="The base model to train a LoRA for: a diffusers pipeline folder from models/diffusers, "
                        "or a typed folder path or Hugging Face hub id. Its configs are checked here; the Train "
                        "node loads the weights.",
            inputs=[
                io.Combo.Input("family", options=sorted(FAMILIES), default="sd15", tooltip=family_tooltip(FAMILIES)),
                io.Combo.Input("diffusers_folder", options=folders + [TYPED_PATH],
                               default=folders[0] if folders else TYPED_PATH,
                               tooltip="A pipeline folder (with model_index.json) below ComfyUI's models/diffusers"),
                io.String.Input("path", default="", optional=True,
                                tooltip="Optional: a folder path or hub id (org/name); when set it is used instead "
                                        "of the folder picked above"),
                io.Combo.Input("dtype", options=list(DTYPES), default="bf16",
                               tooltip="Weight dtype of the frozen base model (the LoRA trains in fp32). fp8: the "
                                       "denoiser's block Linear weights are stored as float8 (half of bf16: Wan "
                                       "14B / Flux LoRAs on a 24 GB GPU), everything else in bf16"),
            ],
            outputs=[PTModel.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, family: str, diffusers_folder: str, dtype: str, path: str = "") -> io.NodeOutput:
        location = resolve_model_path(diffusers_folder, path, _diffusers_roots())
        family_cls = get_family(family)
        check = getattr(family_cls, "check_folder", None)
        if check is None:
            raise ModelError(f"the {family} family cannot check a folder before loading it")
        check(location)  # ModelError naming the folder and what is wrong, in a second
        return io.NodeOutput({"family": family, "path": location, "dtype": dtype})


class LoadTrainingModelFile(io.ComfyNode):
    """A single ComfyUI-format model file (what UNETLoader loads): no diffusers folder needed. Outputs the same
    light PT_MODEL spec; the variant is detected here from the file's header."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        files = model_file_choices({f: folder_paths.get_filename_list(f) for f in MODEL_FILE_FOLDERS})
        experts = [f for f in files if f.startswith("diffusion_models/")]
        return io.Schema(
            node_id=f"{PREFIX}LoadModelFile",
            display_name="Load Training Model (ComfyUI file)",
            category=CATEGORY,
            description="The base model to train a LoRA for, from a file in models/diffusion_models or "
                        "models/checkpoints (what UNETLoader and CheckpointLoaderSimple load). The variant is "
                        "detected from the weights' shapes: Wan 2.1 T2V / I2V, Wan 2.2 TI2V-5B, Wan 2.2 A14B (two "
                        "files: the high-noise expert here, the low-noise one as low_noise_file), FLUX.1 dev / "
                        "schnell, SD 1.5 and SDXL checkpoints. A diffusion-model file holds only the denoiser: "
                        "connect the CLIP and VAE you load for sampling (and CLIP vision for Wan 2.1 I2V) to the "
                        "Train node. A checkpoint brings its own (or connect CheckpointLoaderSimple's CLIP and VAE).",
            inputs=[
                io.Combo.Input("model_file", options=files or [""],
                               tooltip="A .safetensors file from models/diffusion_models or models/checkpoints "
                                       "(Wan 2.2 A14B: the high-noise expert)"),
                io.Combo.Input("dtype", options=list(DTYPES), default="bf16",
                               tooltip="Weight dtype of the frozen base model (the LoRA trains in fp32); an fp8 "
                                       "file is upcast to it, a scaled-fp8 file dequantized to it. fp8: the "
                                       "denoiser's block Linear weights are stored as float8 (half of bf16: Wan "
                                       "14B / Flux LoRAs on a 24 GB GPU; an fp8 file is loaded in bf16 and "
                                       "re-quantized), everything else in bf16"),
                io.String.Input("config", default="", optional=True, extra_dict={"advanced": True},
                                tooltip="Optional: a diffusers transformer config.json (or its folder) for a "
                                        "model of non-standard size; empty: detect a released variant. For an "
                                        "SD 1.5 checkpoint: 'v_prediction' for a v-prediction fine-tune (a "
                                        "checkpoint cannot say so), or a diffusers SD folder of its size"),
                # last, so saved workflows keep their widget order
                io.Combo.Input("low_noise_file", options=[NO_FILE] + experts, default=NO_FILE, optional=True,
                               tooltip="Wan 2.2 A14B only: the low-noise expert file (model_file is the "
                                       "high-noise one); the pair trains one LoRA per expert. none: one model"),
            ],
            outputs=[PTModel.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model_file: str, dtype: str, config: str = "", low_noise_file: str = NO_FILE) -> io.NodeOutput:
        path = resolve_model_file(model_file, folder_paths.get_full_path)
        low = None if low_noise_file in (NO_FILE, "", None) else \
            resolve_model_file(low_noise_file, folder_paths.get_full_path)
        # ModelError listing what was found; an SD 1.5 checkpoint's tokenizer is ComfyUI's own copy
        return io.NodeOutput(single_file_model(path, dtype, config, tokenizer_from=_comfy_sd1_tokenizer(),
                                               low_noise_path=low))


def _comfy_sd1_tokenizer() -> str | None:
    """ComfyUI's CLIP ViT-L tokenizer folder (comfy/sd1_tokenizer: vocab.json + merges.txt), the one its own SD 1.5
    CLIP uses; the trainer library never imports ComfyUI, so the node layer finds it and passes it in."""
    from pathlib import Path

    import comfy

    # `comfy` may be a namespace package (no __init__.py, __file__ None): take its folder(s) from __path__
    for root in comfy.__path__:
        folder = Path(root).resolve() / "sd1_tokenizer"
        if (folder / "vocab.json").is_file():
            return str(folder)
    return None
