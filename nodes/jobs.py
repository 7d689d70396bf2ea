"""Export Job: the graph's training settings as a job file for `python -m trainer run`."""

from __future__ import annotations

from pathlib import Path

from comfy_api.latest import io

from trainer.comfy_bridge import export_items, job_file_text, next_free_path, parse_node_job
from trainer.export import atomic_write_bytes
from trainer.families import get_family
from trainer.job import job_to_dict

from .common import CATEGORY, PREFIX, log_line
from .train import job_mapping, training_inputs


class ExportJob(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}ExportJob",
            display_name="Export Job",
            category=CATEGORY,
            description="Writes these training settings as a YAML job file into output/phase_trainer/<job_name>/ "
                        "(run it with `python -m trainer run <file>`, e.g. on a training machine). Images from "
                        "the graph (Images to Dataset) are written beside it as a captioned folder.",
            inputs=training_inputs(),
            outputs=[io.String.Output(display_name="job_file")],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, model, dataset, network, job_name, steps, learning_rate, optimizer, lr_scheduler,
                warmup_steps, batch_size, gradient_accumulation, seed, save_every, resume, schedule=None,
                keep_last=3, mixed_precision="auto", gradient_checkpointing=False,
                max_grad_norm=1.0, validation=None) -> io.NodeOutput:
        mapping = job_mapping(model=model, dataset=dataset, network=network, schedule=schedule, job_name=job_name,
                              steps=steps, learning_rate=learning_rate, optimizer=optimizer,
                              lr_scheduler=lr_scheduler, warmup_steps=warmup_steps, batch_size=batch_size,
                              gradient_accumulation=gradient_accumulation, seed=seed, save_every=save_every,
                              resume=resume, keep_last=keep_last, mixed_precision=mixed_precision,
                              gradient_checkpointing=gradient_checkpointing, max_grad_norm=max_grad_norm,
                              validation=validation)
        job = parse_node_job(mapping)  # every setting checked before anything is written
        path = next_free_path(Path(mapping["output_dir"]), mapping["job"], ".yaml")
        if dataset.items:
            factor = get_family(model["family"]).resolution_factor
            mapping["datasets"] = list(mapping["datasets"]) + export_items(
                dataset.items, path.with_suffix("") / "datasets", size_step=factor)
            job = parse_node_job(mapping)  # exactly what `python -m trainer run` will accept
        atomic_write_bytes(path, job_file_text(job_to_dict(job)).encode("utf-8"))
        log_line(f"wrote job file {path}")
        return io.NodeOutput(str(path), ui={"text": [str(path)]})
