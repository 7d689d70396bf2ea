"""train(job): the training loop, read top to bottom.

model -> dataset -> network -> schedule -> loop -> export. Everything cheap is checked before anything slow:
the job is already validated, then the checkpoint to resume is checked against the job, then the dataset files
are scanned, and only then is the model loaded.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from . import checkpoint as ckpt
from .errors import CheckpointError, InterruptedTraining, TrainerError
from .export import comfy_state_dict, lora_metadata, save_lora
from .health import DEFAULT_EVERY as HEALTH_EVERY, HealthMonitor
from .families import get_family
from .families.base import masked_mse
from .job import Job
from .lora import LoRANetwork
from .metrics import MetricsLog, read_records
from .schedule.gradient_stability import GradientSignAgreement
from .schedule.scheduler import AlphaScheduler
from .schedule.stop_advice import StopAdvisor, format_advice
from .schedule.transitions import preserve_output
from .validation import build_probe, scan_validation

# fp8: loaded and computed in bf16, then the denoiser's block Linears are stored in float8 (trainer/fp8_base.py)
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.bfloat16}


class Callbacks:
    """What a caller (the CLI, the ComfyUI node, a test) hooks into the loop."""

    def log(self, message: str) -> None:
        print(message, flush=True)

    def on_step(self, record: dict) -> None:
        pass

    def should_stop(self) -> bool:
        return False


@dataclass
class TrainResult:
    lora_path: Path
    metrics_path: Path
    step: int
    records: list
    lora_state: dict  # ComfyUI-keyed tensors (what the LORA_MODEL output carries)
    checkpoint_path: Path | None = None
    transitions: list = field(default_factory=list)
    best_lora_path: Path | None = None  # <job>_best.safetensors: the weights of the best validation loss
    stop_advice: dict | None = None  # the last suggest_stop detail, if the advice fired
    lora_paths: dict = field(default_factory=dict)  # two-expert models: {expert: file}


class _StopFlag:
    """SIGINT / SIGTERM set a flag; the loop stops at the next step boundary and saves."""

    def __init__(self):
        self.stop = False
        self._old = {}

    def __enter__(self):
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread (e.g. inside ComfyUI's worker): the caller's should_stop rules
            self._old = {}
        return self

    def _handle(self, signum, frame):
        if self.stop:  # a second Ctrl+C means now
            raise KeyboardInterrupt
        self.stop = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _DataPosition:
    """Walks epochs of batches deterministically; (epoch, index) is all a checkpoint needs to continue."""

    def __init__(self, training_set, batch_size: int, seed: int, epoch: int = 0, index: int = 0):
        self.ts, self.batch_size, self.seed = training_set, batch_size, seed
        self.epoch, self.index = epoch, index
        self._batches = training_set.epoch_batches(epoch, batch_size, seed)

    def next_for(self, rank: int, world: int) -> list:
        """Data-parallel: every process walks the same global order and takes the rank-th of each `world`
        batches, so the position stays one number for all of them."""
        mine = None
        for r in range(world):
            batch = self.next()
            if r == rank:
                mine = batch
        return mine

    def next(self) -> list:
        if self.index >= len(self._batches):
            self.epoch, self.index = self.epoch + 1, 0
            self._batches = self.ts.epoch_batches(self.epoch, self.batch_size, self.seed)
        batch = self._batches[self.index]
        self.index += 1
        return batch

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}


def _mixed_precision(setting: str) -> str:
    if setting == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return setting


def _make_optimizer(job: Job, params: list, device: torch.device) -> torch.optim.Optimizer:
    t = job.train
    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainerError("train.optimizer: adamw8bit needs the bitsandbytes package (pip install "
                               "bitsandbytes) and a CUDA GPU; use adamw otherwise") from None
        return bnb.optim.AdamW8bit(params, lr=t.lr)
    return torch.optim.AdamW(params, lr=t.lr, fused=device.type == "cuda")


def _rng_state(noise_gen: torch.Generator, data_gen: torch.Generator, stability: dict) -> dict:
    state = {"torch": torch.get_rng_state(), "noise_gen": noise_gen.get_state(), "data_gen": data_gen.get_state(),
             "stability": stability}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict, noise_gen, data_gen) -> None:
    torch.set_rng_state(state["torch"])
    noise_gen.set_state(state["noise_gen"])
    data_gen.set_state(state["data_gen"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def train(job: Job, callbacks: Callbacks | None = None, *, family=None, training_set=None, extra_items=None,
          lora_path: Path | None = None, accelerator: Accelerator | None = None) -> TrainResult:
    """Run a job. `family` (a loaded ModelFamily) and `training_set` (a built TrainingSet) may be given by a
    caller that already has them; `extra_items` (MediaItems, e.g. from ComfyUI IMAGE batches) are trained
    beside the job's dataset folders. `lora_path` overrides where the final LoRA goes."""
    undo = []  # run on every exit, error or not: a caller's model (ComfyUI keeps it) must not keep our LoRA hooks
    try:
        return _train(job, callbacks, family, training_set, extra_items, lora_path, accelerator, undo)
    finally:
        for fn in reversed(undo):
            fn()


def _train(job, callbacks, family, training_set, extra_items, lora_path, accelerator, undo) -> TrainResult:
    cb = callbacks or Callbacks()
    t, s = job.train, job.save
    lora_path = Path(lora_path) if lora_path else job.lora_path
    family_cls = get_family(job.model.family)
    accelerator = accelerator or Accelerator(mixed_precision=_mixed_precision(t.mixed_precision),
                                             gradient_accumulation_steps=t.gradient_accumulation)
    device = accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    if not main:
        cb = _Quiet(cb)  # one process speaks for all

    # ---- cheap checks first: the optimizer, the checkpoint to resume, the model folder, the dataset files ----
    if t.optimizer == "adamw8bit":
        _make_optimizer(job, [torch.nn.Parameter(torch.zeros(1))], device)  # bitsandbytes missing: say so now
    ckpt.check_owner(job.checkpoint_dir, job.job)
    resume_from = ckpt.find_resume(job.checkpoint_dir, s.resume)
    bundle = None
    if resume_from is not None:
        ckpt.check_compatible(ckpt.read_state(resume_from), resume_from, job_name=job.job,
                              signature=job.network_signature())
        bundle = ckpt.load_bundle(resume_from)  # small next to the model: a bad file shows before any loading
    # a single model file, for the families that load one (Wan 2.1); others get check_folder's "is a file"
    single_file = family is None and Path(job.model.path).is_file() and hasattr(family_cls, "from_single_file")
    if single_file:
        from .families.single_file import check_encoder_files, detect_variant

        # the files' headers only: a wrong model or encoder file fails in a second, before the dataset scan
        variant = detect_variant(job.model.path, config=job.model.config)
        check_encoder_files(job.model, variant)
    elif family is None and hasattr(family_cls, "check_folder"):
        family_cls.check_folder(job.model.path)  # configs only: "not this family" in a second
    from .data.training_set import TrainingSet, scan_datasets

    items = None
    if training_set is None:
        items = scan_datasets(list(job.datasets) + list(extra_items or []), family_cls, log=cb.log)
        if not items:
            raise TrainerError("datasets: nothing to train on; give a dataset folder or images")

    held_out = scan_validation(job, family_cls, log=cb.log)  # the validation folder's files, checked now

    # ---- model, then data encoded once and cached, then the encoders go ----
    set_seed(t.seed)
    fp8 = job.model.dtype == "fp8"
    if fp8:
        from .fp8_base import check_device, quantize_family

        check_device(device)
    if family is None:
        cb.log(f"loading {family_cls.name} from {job.model.path}")
        # fp8: loaded on the CPU and quantized there (converted on the GPU), so the whole bf16 model never has to fit
        # the GPU; the loop moves the trained denoiser to the device below, as it does for every dtype
        load_device = "cpu" if fp8 else device
        if single_file:  # a ComfyUI diffusion-model file; text encoder and VAE from model.encoders_from / vae_file
            from .families.single_file import load_single_file

            m = job.model
            family = load_single_file(m.path, TORCH_DTYPES[m.dtype], load_device, config=m.config,
                                      encoders_from=m.encoders_from, vae_file=m.vae_file, family=m.family,
                                      low_noise_path=m.low_noise_path, text_encoder_file=m.text_encoder_file,
                                      image_encoder_file=m.image_encoder_file)
        else:
            family = family_cls.load(job.model.path, dtype=TORCH_DTYPES[job.model.dtype], device=load_device)
    if fp8:  # before any LoRA wraps a layer (the LoRA's base forward is then the fp8 one); also a caller's family
        cb.log(f"model.dtype fp8: {quantize_family(family, device)} Linear layers of the denoiser stored as "
               "float8_e4m3fn")
    if training_set is None:
        training_set = TrainingSet.build(items, family, seed=t.seed, log=cb.log)
    experts = _experts_to_train(job, family)
    probes = {e: build_probe(job, family, training_set, held_out, log=cb.log, **_expert_kw(family, e, "u_range"))
              for e in experts}  # held-out items need the encoders; each expert is probed on its own timesteps
    family.release_encoders()
    weight_dtype = TORCH_DTYPES[job.model.dtype]

    # ---- one LoRA network, optimizer and alpha schedule per trained denoiser (two for Wan 2.2 A14B) ----
    from diffusers.optimization import get_scheduler

    val_cfg = job.validation
    torch.manual_seed(t.seed)  # LoRA init is part of the run's identity
    units: dict = {}
    for e in experts:
        if e is not None:
            family.activate(e, device)
        denoiser = family.denoiser
        denoiser.requires_grad_(False)
        if t.gradient_checkpointing and hasattr(denoiser, "enable_gradient_checkpointing"):
            denoiser.enable_gradient_checkpointing()
            undo.append(denoiser.disable_gradient_checkpointing)  # a caller's cached model gets it back as it was
        unit = _Unit.build(e, job, family, device, lora_path, cb)
        unit.network.apply_to()
        undo.append(unit.network.remove)
        unit.optimizer = _make_optimizer(job, unit.params, device)
        unit.lr_scheduler = get_scheduler(t.lr_scheduler, unit.optimizer, num_warmup_steps=t.warmup_steps,
                                          num_training_steps=t.steps)
        # The denoiser is not wrapped by accelerate: its own weights are frozen (DDP refuses a module with nothing
        # to train) and the LoRA lives beside it, so the loop averages the LoRA's gradients across processes
        # itself. The LR schedule is stepped once per optimizer step whatever the process count.
        if e is None:
            denoiser = denoiser.to(device)
            family.loaded.denoiser = denoiser
        unit.optimizer = accelerator.prepare(unit.optimizer)
        unit.denoiser = denoiser
        unit.probe = probes[e]
        unit.advisor = StopAdvisor(val_cfg.patience, val_cfg.min_delta) if val_cfg is not None else None
        unit.health = HealthMonitor(unit.network, every=val_cfg.every if val_cfg is not None else HEALTH_EVERY)
        unit.best_path = (unit.lora_path.with_name(f"{unit.lora_path.stem}_best.safetensors")
                          if val_cfg is not None and val_cfg.keep_best else None)
        units[e] = unit
    moe = experts != [None]
    # accelerate's per-step wrappers (AcceleratedOptimizer.step / zero_grad, Accelerator.clip_grad_norm_) probe the
    # environment on every call (an importlib search for an optional package, inspect.signature): `python -m
    # trainer bench` measured ~0.8 ms a step, 3.5% of the tiny SD 1.5 step. Where accelerate has nothing to add
    # (no fp16 gradient scaler; no XLA, FSDP or DeepSpeed) the loop calls torch directly.
    direct = accelerator.scaler is None and accelerator.distributed_type in (
        DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    clip_grad_norm = torch.nn.utils.clip_grad_norm_ if direct else accelerator.clip_grad_norm_
    # In the direct case accelerate's accumulate() has nothing to do either (the denoiser is not DDP-wrapped, and
    # the loop steps the inner optimizer itself, so the sync flag it keeps is never read), and backward() is
    # `(loss / accumulation).backward()`; autocast() is a null context without mixed precision. Calling them
    # anyway cost ~0.1 ms a step of generator context managers.
    amp = accelerator.native_amp
    accumulation = accelerator.gradient_accumulation_steps  # what accelerator.backward divides by

    noise_gen = torch.Generator().manual_seed(t.seed + 1 + 7919 * rank)  # each process its own noise
    data_gen = torch.Generator().manual_seed(t.seed + 2 + 7919 * rank)
    data = _DataPosition(training_set, t.batch_size, t.seed)
    step, bad_steps, stop_advised = 0, 0, False

    # ---- resume ----
    if resume_from is not None:
        for e, unit in units.items():
            try:
                unit.network.load_state_dict(_of(bundle["lora"], e, prefix=True))
                unit.optimizer.load_state_dict(_of(bundle["optimizer"], e))
            except (RuntimeError, ValueError, KeyError) as err:
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise CheckpointError(f"{resume_from}: its LoRA or optimizer state does not fit this model "
                                      f"({reason}); it was made with another model. Resume with that model, or set "
                                      "resume: none to start fresh") from None
            unit.lr_scheduler.load_state_dict(_of(bundle["lr_scheduler"], e))
            unit.stability.load_state_dict(_of(_of_rank(bundle["rng"], rank, world)["stability"], e))
            st = bundle["state"]
            if unit.scheduler is not None:
                unit.scheduler.load_state_dict(_of(st["scheduler"], e))
                unit.network.set_alphas(unit.scheduler.alphas())
            if unit.advisor is not None and _of(st.get("stop_advice"), e):
                unit.advisor.load_state_dict(_of(st["stop_advice"], e))
            unit.health.load_state_dict(_of(st.get("health"), e) or {})
            if unit.best_path is not None and unit.best_path.exists():
                unit.best_file = unit.best_path
            elif _of(st.get("best_file"), e) and Path(_of(st["best_file"], e)).exists():
                unit.best_file = Path(_of(st["best_file"], e))  # resumed under another name (a node's counter)
        _restore_rng(_of_rank(bundle["rng"], rank, world), noise_gen, data_gen)
        st = bundle["state"]
        step, bad_steps = st["step"], st.get("bad_steps", 0)
        data = _DataPosition(training_set, t.batch_size, t.seed, **st["data"])
        cb.log(f"resumed from {resume_from} at step {step}")
    if resume_from is None and main:
        moved = ckpt.set_aside(job.checkpoint_dir)  # a fresh run neither mixes with nor prunes an old run's
        if moved is not None:
            cb.log(f"starting fresh: the earlier checkpoints were moved to {moved}")
    accelerator.wait_for_everyone()
    log = MetricsLog(job.metrics_path, resume_from_step=step if resume_from is not None else None) if main \
        else _NoLog()
    undo.append(log.close)
    records = read_records(job.metrics_path) if resume_from is not None else []

    def checkpoint_now() -> Path:
        rng = _rng_state(noise_gen, data_gen, per_unit(lambda u: u.stability.state_dict()))
        if world > 1:  # every process's generators, so each continues its own stream on resume
            from accelerate.utils import gather_object

            rng = {"per_rank": gather_object([rng])}
        path = ckpt.bundle_path(job.checkpoint_dir, step)
        if main:
            path = _save(rng)
        accelerator.wait_for_everyone()
        return path

    def per_unit(fn):
        return fn(units[None]) if not moe else {e: fn(u) for e, u in units.items()}

    def _save(rng) -> Path:
        per = per_unit
        lora = (units[None].network.state_dict() if not moe else
                {f"{e}.{k}": v for e, u in units.items() for k, v in u.network.state_dict().items()})
        state = {"job": job.job, "signature": job.network_signature(), "data": data.state(), "bad_steps": bad_steps,
                 "scheduler": per(lambda u: u.scheduler.state_dict() if u.scheduler else None),
                 "stop_advice": per(lambda u: u.advisor.state_dict() if u.advisor else None),
                 "health": per(lambda u: u.health.state_dict()),
                 "best_file": per(lambda u: str(u.best_file) if u.best_file else None)}
        return ckpt.save_checkpoint(job.checkpoint_dir, step=step, lora=lora,
                                    optimizer=per(lambda u: u.optimizer.state_dict()),
                                    lr_scheduler=per(lambda u: u.lr_scheduler.state_dict()),
                                    rng=rng, state=state, keep_last=s.keep_last)

    def export(unit: _Unit, path: Path) -> Path:
        sched = unit.scheduler
        if not main:
            return path
        meta = lora_metadata(family, unit.network, step=step, phase=sched.phase.name if sched else None,
                             history=sched.history if sched else [], dataset_summary=training_set.summary(),
                             job_name=job.job)
        if unit.name is not None:
            meta["phase_trainer.expert"] = unit.name
        try:
            return save_lora(path, unit.network, family, meta)
        except TrainerError as err:
            raise TrainerError(f"{err}. The trained weights are safe in the checkpoint {last_ckpt}: run the job "
                               "again (save.resume: latest) to write the LoRA") from err

    def emit(record: dict, unit: _Unit) -> None:
        record.update(unit.health.counters())
        log.write(record)
        records.append(record)
        if main:
            cb.on_step(record)

    pending = [("resume", {"checkpoint": str(resume_from)})] if resume_from is not None else []

    # ---- the loop ----
    for unit in units.values():
        unit.denoiser.train()
    last_ckpt = resume_from
    active = None
    t0 = time.perf_counter()
    with _StopFlag() as stop:
        while step < t.steps:
            step += 1
            unit = units[experts[((step - 1) // t.switch_boundary_every) % len(experts)]]
            if unit.name != active and unit.name is not None:
                family.activate(unit.name, device)  # the other expert waits on the CPU
            active = unit.name
            kw = {} if unit.name is None else {"expert": unit.name}
            micro_losses = []
            for _ in range(t.gradient_accumulation):
                batch = training_set.collate(data.next_for(rank, world), data_gen)
                latents = batch["latents"]
                u = family.sample_timesteps(latents.shape[0], noise_gen, **kw)
                noise = torch.randn(latents.shape, generator=noise_gen, dtype=latents.dtype)
                noisy = family.add_noise(latents, noise, u)
                noisy.model_input = noisy.model_input.to(device, weight_dtype)
                noisy.timesteps = noisy.timesteps.to(device)
                cond = {k: v.to(device, weight_dtype) for k, v in batch["cond"].items()}
                with nullcontext() if direct else accelerator.accumulate(unit.denoiser):
                    with accelerator.autocast() if amp or not direct else nullcontext():
                        pred = family.predict(noisy, cond, **kw)
                    loss = masked_mse(pred.float(), noisy.target.to(device, torch.float32),
                                      family.loss_mask(cond, pred.shape))
                    if direct:  # what accelerator.backward does here; x / 1 would change no bit: left out
                        (loss / accumulation if accumulation != 1 else loss).backward()
                    else:
                        accelerator.backward(loss)
                micro_losses.append(loss.detach())
            health, params = unit.health, unit.params
            optimizer, lr_scheduler, scheduler, network = unit.optimizer, unit.lr_scheduler, unit.scheduler, unit.network
            step_optimizer = optimizer.optimizer if direct else optimizer
            if world > 1:
                _average_gradients(params, world)
            health_step = health.due(step)
            if health_step:
                health.before_clip()
            grad_norm = clip_grad_norm(params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
            agreement = unit.stability.update(params)
            # the mean of one loss is that loss, bit for bit: no stack + mean for the usual single micro-batch
            step_loss = micro_losses[0] if len(micro_losses) == 1 else torch.stack(micro_losses).mean()
            values = torch.stack([step_loss.float(), torch.as_tensor(grad_norm, device=device).float(),
                                  agreement.float() if agreement is not None
                                  else torch.tensor(float("nan"), device=device)])
            if world > 1:  # the mean loss over processes: every process's scheduler decides on the same numbers
                values[0] = accelerator.reduce(values[0], reduction="mean")
            loss_v, norm_v, stab_v = values.tolist()
            stab_v = stab_v if _finite(stab_v) else None
            lr = lr_scheduler.get_last_lr()[0]
            if not (_finite(loss_v) and _finite(norm_v)):
                # a NaN/Inf loss or gradient: skip the update, keep the last good weights
                step_optimizer.zero_grad(set_to_none=True)
                bad_steps += 1
                unit.stability.undo()
                health.count(loss_v, norm_v)
                emit(_record(step, loss_v, None, norm_v, lr, optimizer, scheduler, network, event="nan_skip",
                             detail={"consecutive": bad_steps}, expert=unit.name), unit)
                if bad_steps >= t.max_bad_steps:
                    path = checkpoint_now()
                    log.close()
                    raise TrainerError(f"{bad_steps} consecutive steps had a NaN/Inf loss or gradient; stopped. The "
                                       f"last good weights are in {path}. Lower train.lr, or use fp32/bf16 weights")
                continue
            bad_steps = 0
            if health_step:
                health.before_step()
            step_optimizer.step()
            lr_scheduler.step()
            step_optimizer.zero_grad(set_to_none=True)
            health_now = health.after_step() if health_step else None

            events = list(pending)
            pending.clear()
            val = None
            if unit.probe is not None and (step % val_cfg.every == 0 or step == t.steps):
                val = unit.probe.loss(per_timestep=True, modules=(network,))
                if scheduler is not None:
                    scheduler.observe_validation(step, val[0])
                new_best, advice = unit.advisor.observe(step, val[0],
                                                        armed=scheduler is None or scheduler.is_final_phase)
                if new_best and unit.best_path is not None:
                    unit.best_file = export(unit, unit.best_path)
                if advice is not None:
                    events.append(("suggest_stop", advice))
                    cb.log(format_advice(advice) + ("; stopping (validation.stop_on_plateau)"
                                                    if val_cfg.stop_on_plateau else ""))
                    stop_advised = val_cfg.stop_on_plateau
            if scheduler is not None:
                transition = scheduler.update(step, loss_v, stab_v)
                if transition is not None and scheduler.config.transition_kind == "preserve":
                    # same output, rescaled up-projections and moments (trainer/schedule/transitions.py)
                    transition["preserve_factors"] = preserve_output(network, optimizer, scheduler.alphas())
                network.set_alphas(scheduler.alphas())
                if transition is not None:
                    if unit.name is not None:
                        transition["expert"] = unit.name
                    events.append(("transition", transition))
                    cb.log(_describe_transition(transition))
            stopping = (stop.stop or cb.should_stop()) and step < t.steps
            if world > 1:  # one process told to stop stops them all, at the same step
                stopping = bool(accelerator.reduce(torch.tensor(float(stopping), device=device), "sum").item())
            saving = stopping or (step % s.every == 0 and step < t.steps and not stop_advised)
            if saving:
                events.append(("interrupt" if stopping else "checkpoint",
                               {"path": str(ckpt.bundle_path(job.checkpoint_dir, step))}))
            record = _record(step, loss_v, stab_v, norm_v, lr, optimizer, scheduler, network,
                             event=events[0][0] if events else None,
                             detail=(events[0][1] if len(events) == 1 else dict(events)) if events else None,
                             expert=unit.name)
            if val is not None:
                record.update(val_loss=val[0], val_loss_t=val[1],
                              **(scheduler.validation_snapshot() if scheduler is not None else {}))
            if health_now is not None:
                record["health"] = health_now
            emit(record, unit)  # the record first: a log never lacks a step that a checkpoint holds
            if saving:
                last_ckpt = checkpoint_now()
            if stopping:
                partials = [export(u, u.lora_path.with_name(f"{u.lora_path.stem}_step{step}.safetensors"))
                            for u in units.values()]
                log.close()
                cb.log(f"interrupted at step {step}: checkpoint {last_ckpt}, partial LoRA "
                       f"{', '.join(map(str, partials))}")
                raise InterruptedTraining(step, partials[0], last_ckpt)
            if step == 1 or step % 50 == 0 or step == t.steps:
                rate = (time.perf_counter() - t0) / max(1, len(records))
                who = f" [{unit.name}]" if unit.name else ""
                cb.log(f"step {step}/{t.steps}{who} loss {loss_v:.4f} phase {record['phase']} "
                       f"alpha {record['linear_alpha']}/{record['conv_alpha']} ({rate:.3f} s/step)")
            if stop_advised:
                break  # a normal end: final checkpoint and export below

    last_ckpt = checkpoint_now()
    outs = {e: export(u, u.lora_path) for e, u in units.items()}
    log.close()
    for e, out in outs.items():
        cb.log(f"saved LoRA {out}")
    first = units[experts[0]]
    return TrainResult(lora_path=outs[experts[0]], metrics_path=job.metrics_path, step=step, records=records,
                       lora_state=comfy_state_dict(first.network, family_cls), checkpoint_path=last_ckpt,
                       transitions=[tr for u in units.values() if u.scheduler for tr in u.scheduler.history],
                       best_lora_path=first.best_file, stop_advice=first.advisor.advice if first.advisor else None,
                       lora_paths={e: p for e, p in outs.items()} if moe else {})


@dataclass
class _Unit:
    """What is trained for one denoiser: the whole model, or one expert of a two-expert model."""

    name: str | None
    network: LoRANetwork
    params: list
    scheduler: AlphaScheduler | None
    lora_path: Path
    stability: GradientSignAgreement = field(default_factory=GradientSignAgreement)
    denoiser: object = None
    optimizer: object = None
    lr_scheduler: object = None
    probe: object = None
    advisor: object = None
    health: object = None
    best_path: Path | None = None
    best_file: Path | None = None

    @classmethod
    def build(cls, expert, job: Job, family, device, lora_path: Path, cb) -> "_Unit":
        net_cfg = job.network
        targets = family.target_modules(net_cfg.linear, net_cfg.conv, **_expert_kw(family, expert))
        network = LoRANetwork(targets, linear_rank=net_cfg.linear, linear_alpha=net_cfg.linear_alpha,
                              conv_rank=net_cfg.conv, conv_alpha=net_cfg.conv_alpha,
                              only_if_contains=net_cfg.only_if_contains, ignore_if_contains=net_cfg.ignore_if_contains,
                              dropout=net_cfg.dropout).to(device)
        counts = network.group_counts()
        config = net_cfg.schedule_for(expert)
        scheduler = None
        if config is not None:
            for group in config.groups:
                if counts[group] == 0:
                    raise TrainerError(f"network.alpha_schedule: the {group} group is scheduled but no {group} "
                                       f"module is trained (modules: {counts}); schedule the other group or widen "
                                       "the filters")
            scheduler = AlphaScheduler(config, net_cfg.base_alphas())
            network.set_alphas(scheduler.alphas())
        who = f" [{expert}]" if expert else ""
        cb.log(f"LoRA{who}: {counts['linear']} linear + {counts['conv']} conv modules, "
               f"{network.num_parameters():,} parameters")
        if expert is not None:
            from .families.wan22_14b import expert_lora_path

            lora_path = expert_lora_path(lora_path, expert)
        return cls(expert, network, network.trainable_parameters(), scheduler, lora_path)


class _Quiet(Callbacks):
    """The callbacks of a process other than the main one: it still obeys a stop, and says nothing."""

    def __init__(self, inner: Callbacks):
        self.inner = inner

    def log(self, message: str) -> None:
        pass

    def should_stop(self) -> bool:
        return self.inner.should_stop()


class _NoLog:
    """Processes other than the main one write no metrics log."""

    def write(self, record):
        return record

    def close(self):
        pass


def _average_gradients(params: list, world: int) -> None:
    """One flat all-reduce of the LoRA's gradients (what DDP would do, without wrapping the frozen model)."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in params if p.grad is not None]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def _of_rank(rng: dict, rank: int, world: int) -> dict:
    if "per_rank" in rng:
        states = rng["per_rank"]
        if len(states) != world:
            raise CheckpointError(f"the checkpoint was written by {len(states)} processes, this run has {world}: "
                                  "resume with the same number of processes")
        return states[rank]
    if world > 1:
        raise CheckpointError("the checkpoint was written by one process, this run has "
                              f"{world}: resume with one process")
    return rng


def _experts_to_train(job: Job, family) -> list:
    """[None] for a one-denoiser family; the chosen experts, in order, for a two-expert family."""
    names = getattr(family, "experts_names", None)
    if not names:
        return [None]
    on = {"high_noise": job.model.train_high_noise, "low_noise": job.model.train_low_noise}
    return [e for e in names if on.get(e, True)]


def _expert_kw(family, expert, what: str = "expert") -> dict:
    if expert is None:
        return {}
    return {"u_range": family.u_range(expert)} if what == "u_range" else {"expert": expert}


def _of(value, expert, prefix: bool = False):
    """A one-denoiser checkpoint stores each state bare; a two-expert one keys it by expert."""
    if expert is None or value is None:
        return value
    if prefix:
        return {k[len(expert) + 1:]: v for k, v in value.items() if k.startswith(f"{expert}.")}
    return value.get(expert)


def _record(step, loss, stability, grad_norm, lr, optimizer, scheduler, network, *, event=None, detail=None,
            expert=None) -> dict:
    snap = scheduler.snapshot() if scheduler else {}
    alphas = network.alphas()
    return {
        "step": step,
        "timestamp": None,  # MetricsLog stamps it
        "loss": loss,
        "loss_slope": snap.get("loss_slope"),
        "loss_r2": snap.get("loss_r2"),
        "loss_cv": snap.get("loss_cv"),
        "loss_samples": snap.get("loss_samples", 0),
        "gradient_stability": stability,
        "gradient_stability_avg": snap.get("gradient_stability_avg"),
        "grad_norm": grad_norm,
        "lr": lr if lr is not None else optimizer.param_groups[0]["lr"],
        "phase": scheduler.phase.name if scheduler else None,
        "phase_idx": scheduler.phase_idx if scheduler else None,
        "steps_in_phase": scheduler.steps_in_phase if scheduler else None,
        "linear_alpha": alphas["linear"],
        "conv_alpha": alphas["conv"],
        "expert": expert,
        "event": event,
        "event_detail": detail,
    }


def _describe_transition(tr: dict) -> str:
    nums = ", ".join(f"{k} {tr[k]:.3g}" for k in ("slope", "r2", "cv", "stability", "val_rate")
                     if _finite(tr.get(k)))
    return (f"step {tr['step']}: phase {tr['from_phase']} -> {tr['to_phase']} after {tr['steps_in_phase']} steps "
            f"(alpha {tr.get('from_alphas')} -> {tr.get('to_alphas')}; {nums})")
