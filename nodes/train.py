"""Train: runs the job the graph describes, with ComfyUI's progress bar, Cancel and a live plot in the node."""

from __future__ import annotations

import math
from pathlib import Path

import comfy.model_management as mm
import comfy.utils
import folder_paths
from comfy_api.latest import io
from server import PromptServer

from trainer.comfy_bridge import (
    OUTPUT_SUBDIR,
    build_job_mapping,
    check_name,
    next_free_path,
    train_from_nodes,
    validation_section,
)
from trainer.errors import InterruptedTraining
from trainer.job import LR_SCHEDULERS, MIXED_PRECISION, OPTIMIZERS, ValidationConfig

from .common import (
    CATEGORY,
    PREFIX,
    LoraModel,
    LossMap,
    PTDataset,
    PTMetrics,
    PTModel,
    PTNetwork,
    PTSchedule,
    log_line,
)

LIVE_EVENT = "phase_trainer.metrics"  # web/phase_trainer.js listens for it
UI_KEY = "phase_trainer_metrics"  # the node's ui output the widget restores from


def training_inputs() -> list:
    """The inputs Train and Export Job share (so the two can never disagree about a setting)."""
    adv = {"advanced": True}
    return [
        PTModel.Input("model"),
        PTDataset.Input("dataset"),
        PTNetwork.Input("network"),
        PTSchedule.Input("schedule", optional=True, tooltip="None: the network's alphas stay fixed"),
        io.String.Input("job_name", default="my_lora",
                        tooltip="Names the LoRA file and output/phase_trainer/<job_name>/ (metrics log, "
                                "checkpoints). Letters, digits, _ - . only."),
        io.Int.Input("steps", default=2000, min=1, max=10_000_000, tooltip="Optimizer steps"),
        io.Float.Input("learning_rate", default=1e-4, min=1e-8, max=1.0, step=1e-6, round=False),
        io.Combo.Input("optimizer", options=list(OPTIMIZERS), default="adamw",
                       tooltip="adamw8bit needs bitsandbytes and a CUDA GPU"),
        io.Combo.Input("lr_scheduler", options=list(LR_SCHEDULERS), default="constant"),
        io.Int.Input("warmup_steps", default=0, min=0, max=10_000_000),
        io.Int.Input("batch_size", default=1, min=1, max=1024),
        io.Int.Input("gradient_accumulation", default=1, min=1, max=1024),
        io.Int.Input("seed", default=42, min=0, max=2**31 - 1, control_after_generate=False,
                     tooltip="LoRA initialization, noise and data order"),
        io.Int.Input("save_every", default=500, min=1, max=10_000_000,
                     tooltip="Checkpoint every N steps (also on Cancel and at the end)"),
        io.Boolean.Input("resume", default=False,
                         tooltip="Continue this job from its last checkpoint (after a Cancel). Off: start fresh; "
                                 "an earlier run's checkpoints are moved aside, not deleted."),
        io.Int.Input("keep_last", default=3, min=1, max=1000, optional=True, extra_dict=adv,
                     tooltip="Checkpoints kept"),
        io.Combo.Input("mixed_precision", options=list(MIXED_PRECISION), default="auto", optional=True,
                       extra_dict=adv, tooltip="auto: bf16 on GPUs that support it, else none"),
        io.Boolean.Input("gradient_checkpointing", default=False, optional=True, extra_dict=adv,
                         tooltip="Less memory, slower steps"),
        io.Float.Input("max_grad_norm", default=1.0, min=0.0, max=1000.0, step=0.1, optional=True,
                       extra_dict=adv, tooltip="Gradient clipping (0: off)"),
        *validation_input(),
    ]


def validation_input() -> list:
    """The validation option group: off, or on with its settings (a DynamicCombo). Optional and last, so that
    workflows saved before it existed keep their widget values. A ComfyUI too old for DynamicCombo gets no
    option (the node still loads; validation is then only available in job files)."""
    if not hasattr(io, "DynamicCombo"):
        return []
    d = ValidationConfig()
    on = [
        io.Int.Input("every", default=d.every, min=1, max=10_000_000,
                     tooltip="Evaluate the validation loss after every N optimizer steps (and at the end)"),
        io.Int.Input("items", default=d.items, min=1, max=256,
                     tooltip="Probe items: a fixed sample spread over the training set, each with noise drawn "
                             "once and fixed timesteps, so only the LoRA changes between evaluations"),
        io.Int.Input("patience", default=d.patience, min=1, max=10_000,
                     tooltip="Evaluations without a new best (in the last phase) before the node suggests "
                             "stopping (the amber 'stop?' line in the plot)"),
        io.Float.Input("min_delta", default=d.min_delta, min=0.0, max=0.5, step=0.001, round=False,
                       tooltip="How much better (relative) a validation loss must be to count as a new best: 0.01 "
                               "= 1% below the best so far. 0: any improvement resets the patience, so a slowly "
                               "falling curve never gets the advice"),
        io.Boolean.Input("stop_on_plateau", default=d.stop_on_plateau,
                         tooltip="End the run (checkpoint and LoRA) when the stop advice fires"),
    ]
    return [io.DynamicCombo.Input(
        "validation", optional=True,
        options=[io.DynamicCombo.Option("off", []), io.DynamicCombo.Option("on", on)],
        tooltip="on: a fixed-noise validation loss every N steps, plotted as 'val loss'; the LoRA with the lowest "
                "one is also saved as <lora>_best.safetensors, and a plateau gives the stop advice. A preset "
                "schedule's phases then end on a plateau of the validation loss instead of the training loss.")]


def encoder_inputs() -> list:
    """ComfyUI's own encoders, used instead of loading the family's (trainer/comfy_encoders/)."""
    note = ("Captions and pixels are encoded once before training and cached, then this encoder is released "
            "(moved out of GPU memory) for the training steps.")
    return [
        io.Clip.Input("clip", optional=True,
                      tooltip="Optional: the model's text encoder as you load it for sampling (Wan: CLIPLoader type "
                              "wan; FLUX.1: DualCLIPLoader type flux; SD 1.5 / SDXL: CheckpointLoaderSimple's CLIP, "
                              "and the checkpoint's own text encoders are then not loaded). Required with a Wan or "
                              "Flux model from a ComfyUI file. Captions are read literally (no (word:1.2) weights) "
                              "and cut to the pipeline's length, so the encodings equal the diffusers pipeline's; a "
                              "CLIPSetLastLayer to another layer than the pipeline's is refused. " + note),
        io.Vae.Input("vae", optional=True,
                     tooltip="Optional: the model's VAE from VAELoader or CheckpointLoaderSimple (Wan 2.1 and "
                             "A14B: wan_2.1_vae; TI2V-5B: wan2.2_vae; FLUX.1: ae). Required with a Wan or Flux "
                             "model from a ComfyUI file. " + note),
        io.ClipVision.Input("clip_vision", optional=True,
                            tooltip="Optional (Wan 2.1 I2V): the CLIP vision model from CLIPVisionLoader "
                                    "(clip_vision_h) that encodes each clip's first frame; required with a Wan 2.1 "
                                    "I2V model from a ComfyUI file. " + note),
    ]


def comfy_encoders(family: str, clip, vae, clip_vision=None):
    """The graph's encoders as the library's ExternalEncoders for `family` (None when none is connected).
    Releasing them after caching also unloads them from the GPU."""
    from trainer.comfy_encoders import for_family
    from trainer.errors import ModelError

    try:
        encoders = for_family(family, clip, vae, clip_vision)
    except ValueError as e:
        raise ModelError(str(e)) from e
    if encoders is None:
        return None
    if mm.get_torch_device().type != "cpu":
        def unload() -> None:
            mm.unload_all_models()
            mm.soft_empty_cache()

        encoders.on_release = unload
    return encoders


def job_mapping(*, model, dataset, network, schedule, job_name, steps, learning_rate, optimizer, lr_scheduler,
                warmup_steps, batch_size, gradient_accumulation, seed, save_every, resume, keep_last=3,
                mixed_precision="auto", gradient_checkpointing=False, max_grad_norm=1.0, validation=None) -> dict:
    """The job mapping for the shared inputs; metrics and checkpoints go to output/phase_trainer/<job>/."""
    name = check_name(job_name, "job_name")
    output_dir = Path(folder_paths.get_output_directory()) / OUTPUT_SUBDIR / name
    train = {"steps": steps, "batch_size": batch_size, "gradient_accumulation": gradient_accumulation,
             "lr": learning_rate, "optimizer": optimizer, "lr_scheduler": lr_scheduler,
             "warmup_steps": warmup_steps, "seed": seed, "mixed_precision": mixed_precision,
             "gradient_checkpointing": gradient_checkpointing, "max_grad_norm": max_grad_norm}
    return build_job_mapping(job_name=name, model=model, dataset=dataset, network=network, schedule=schedule,
                             train=train, output_dir=output_dir, resume=resume, save_every=save_every,
                             keep_last=keep_last, validation=validation_section(validation))


def _accelerator_for_comfyui(mixed_precision: str):
    """Train where ComfyUI computes: with --cpu (or no GPU) on the CPU, else let accelerate pick the GPU."""
    if mm.get_torch_device().type != "cpu":
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=True, mixed_precision="no" if mixed_precision == "auto" else mixed_precision)


class Train(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}Train",
            display_name="Train LoRA (Phase Trainer)",
            category=CATEGORY,
            description="Trains a LoRA with the graph's model, dataset, network and alpha schedule, plotting "
                        "loss, alpha and the phase statistics live in the node. The LoRA goes into "
                        "models/loras (<job_name>_00001.safetensors, never overwritten); the metrics log and "
                        "checkpoints into output/phase_trainer/<job_name>/. Cancel saves a checkpoint and the "
                        "partial LoRA; queue again with resume on to continue. With validation on, the plot "
                        "shows the validation loss and the stop advice, and the best LoRA is kept as "
                        "<lora>_best.safetensors. Wan 2.2 A14B trains both experts: two files, "
                        "<lora>_high_noise and <lora>_low_noise.",
            inputs=training_inputs() + encoder_inputs(),
            outputs=[
                LoraModel.Output(display_name="lora",
                                 tooltip="For the stock Load LoRA Model / Save LoRA nodes. Wan 2.2 A14B: the "
                                         "high-noise expert's LoRA (the low-noise one's if only that expert "
                                         "trains); apply it to the high-noise model"),
                PTMetrics.Output(display_name="metrics", tooltip="For Plot Metrics"),
                LossMap.Output(display_name="loss_map", tooltip="For the stock Plot Loss Graph node"),
                io.String.Output(display_name="lora_path",
                                 tooltip="The saved .safetensors file (Wan 2.2 A14B: the high-noise expert's). "
                                         "The best-by-validation file, each expert's file and the stop advice "
                                         "are listed under the plot and in the log."),
                LoraModel.Output(display_name="lora_low_noise",
                                 tooltip="Wan 2.2 A14B: the low-noise expert's LoRA, for the low-noise model. "
                                         "Other models: empty (applies nothing)"),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return math.nan  # never equal to itself: queuing again trains again

    @classmethod
    def execute(cls, model, dataset, network, job_name, steps, learning_rate, optimizer, lr_scheduler,
                warmup_steps, batch_size, gradient_accumulation, seed, save_every, resume, schedule=None,
                keep_last=3, mixed_precision="auto", gradient_checkpointing=False,
                max_grad_norm=1.0, clip=None, vae=None, clip_vision=None, validation=None) -> io.NodeOutput:
        mapping = job_mapping(model=model, dataset=dataset, network=network, schedule=schedule, job_name=job_name,
                              steps=steps, learning_rate=learning_rate, optimizer=optimizer,
                              lr_scheduler=lr_scheduler, warmup_steps=warmup_steps, batch_size=batch_size,
                              gradient_accumulation=gradient_accumulation, seed=seed, save_every=save_every,
                              resume=resume, keep_last=keep_last, mixed_precision=mixed_precision,
                              gradient_checkpointing=gradient_checkpointing, max_grad_norm=max_grad_norm,
                              validation=validation)
        node_id = str(cls.hidden.unique_id)
        lora_path = next_free_path(folder_paths.get_folder_paths("loras")[0], mapping["job"])
        server = PromptServer.instance
        bar = comfy.utils.ProgressBar(steps, node_id=node_id)

        def send(message: dict) -> None:
            server.send_sync(LIVE_EVENT, message, server.client_id)

        def progress(step: int, total: int) -> None:
            # ComfyUI's progress hook raises on Cancel; the loop must see Cancel through should_stop instead,
            # so that it saves a checkpoint first. Put the flag back for the next should_stop.
            if mm.processing_interrupted():
                return
            try:
                bar.update_absolute(step, total)
            except mm.InterruptProcessingException:
                mm.interrupt_current_processing(True)

        if mm.get_torch_device().type != "cpu":
            mm.unload_all_models()  # training needs the GPU memory that cached ComfyUI models hold
            mm.soft_empty_cache()
        log_line(f"training {mapping['job']} ({steps} steps) -> {lora_path}")
        import torch

        try:
            with torch.inference_mode(False), torch.enable_grad():
                run = train_from_nodes(mapping, dataset, lora_path=lora_path, node_id=node_id, send=send,
                                       progress=progress, interrupted=mm.processing_interrupted, log=log_line,
                                       accelerator=_accelerator_for_comfyui(mixed_precision), model=model,
                                       encoders=comfy_encoders(model["family"], clip, vae, clip_vision))
        except InterruptedTraining as stop:
            log_line(f"cancelled: queue again with resume on to continue from step {stop.step}")
            mm.throw_exception_if_processing_interrupted()  # ComfyUI's own interrupt (and it clears the flag)
            raise mm.InterruptProcessingException()
        finally:
            if mm.get_torch_device().type != "cpu":
                mm.soft_empty_cache()
        log_line(f"saved {run.lora_path} after {run.step} steps ({run.live_messages} live plot updates)")
        return io.NodeOutput(run.lora_state, run.metrics, run.loss_map, str(run.lora_path), run.lora_low_noise,
                             ui={UI_KEY: [run.payload]})
