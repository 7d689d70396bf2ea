"""`python -m trainer bench`: what the trainer costs, measured side by side with a baseline in one process.

Every benchmark runs its baseline and ours in the same process on the same tiny random models (no
downloads), alternating them (A B B A ...) so that load from other processes hits both alike, and reports
medians over repeats and their ratio. It prints a Markdown table; it never fails on a number.

Timing runs use one CPU thread (``torch.set_num_threads(1)``): the tiny models' ops are too small to split
across threads, and on a 2-core machine thread hand-offs would dominate what is measured. Training steps are
timed in CPU time of the process (``time.process_time``), which on one thread equals wall time on an idle
machine but is not inflated when other processes share the cores; data loading (decoding, file reads) is
timed in wall time, because waiting is part of its cost.

Memory is the peak of live tensor bytes in torch's CPU allocator: the running sum of the allocation and
free events that ``torch.profiler`` records with ``profile_memory=True``, from the start of the measured
call. That is the CPU counterpart of ``torch.cuda.max_memory_allocated``, the number a GPU user pays.
Process RSS would add the allocator's cached pages, the Python heap and fragmentation, which differ from run
to run; ``tracemalloc`` sees Python objects only, never tensor storage. The profiler slows the ops it
records, so memory is measured in separate, shorter runs and never mixed into the timings.
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class BenchConfig:
    rounds: int = 9                      # A/B pairs per timing comparison (medians over these)
    loop_steps: int = 50                 # timed steps per training run (includes one health step)
    warmup_steps: int = 5                # steps before timing starts in each run
    memory_steps: int = 4                # steps in a profiled (memory) run
    stats_updates: int = 5000            # scheduler statistics updates per timing
    bookkeeping_steps: int = 2000        # scheduler + metrics record + JSONL line, per timing
    sign_repeats: int = 200              # gradient sign agreement updates per timing
    video_size: tuple = (640, 360)       # sampling benchmark clip size (width, height)
    video_length: int = 240              # frames in each sampling benchmark clip
    sparse_gop: int = 120                # keyframe interval of the "sparse" clip
    dense_gop: int = 6                   # keyframe interval of the "dense" clip
    sample_frames: int = 17              # frames sampled evenly from each clip
    sampling_repeats: int = 5
    cache_rounds: int = 3
    image_sizes: tuple = (32, 64, 128, 256)  # pixel sizes of the image scale rows (SD 1.5 latent: size / 8)
    video_frames: tuple = (5, 9, 17, 33)  # frame counts for the video scale rows (Wan 2.1)
    video_pixels: int = 128              # pixel size of the video scale rows
    scale_steps: int = 10
    scale_warmup: int = 2


FULL = BenchConfig()
QUICK = BenchConfig(rounds=3, loop_steps=15, warmup_steps=3, memory_steps=3, stats_updates=1500,
                    bookkeeping_steps=500, sign_repeats=60, video_size=(160, 120), video_length=96, sparse_gop=48,
                    dense_gop=4, sample_frames=9, sampling_repeats=2, cache_rounds=2,
                    image_sizes=(32, 64), video_frames=(5, 9), video_pixels=64, scale_steps=3, scale_warmup=1)

# Row names, in print order (the smoke test checks that each is printed).
ROWS = (
    "loop step time",
    "loop peak tensor memory",
    "scheduler statistics update",
    "scheduler + metrics per step",
    "gradient sign agreement",
    "video sampling, sparse keyframes",
    "video sampling, dense keyframes",
    "epoch 2 (cached) vs epoch 1 (encode)",
    "new run, latents from disk cache",
    "scale: image",
    "gradient checkpointing",
    "scale: video",
    "fp8 base weights",
)


@dataclass
class Row:
    name: str
    ours: str
    baseline: str
    ratio: str
    target: str = ""
    note: str = ""
    values: dict = field(default_factory=dict)  # the raw numbers, for callers and docs


def _fmt_ratio(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


# ----------------------------------------------------------------------------------------------- measuring


def peak_tensor_bytes(fn: Callable[[], object]) -> tuple[int, object]:
    """(peak live tensor bytes allocated while `fn` ran, above what was live when it started; fn's result).

    Read from the allocation events torch.profiler records with profile_memory=True.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with _quiet_profiler(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    events.sort()
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak, result


@contextlib.contextmanager
def _quiet_profiler():
    """Kineto prints a line per profiler start/stop on stderr; keep the table readable."""
    import os
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _median(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def _alternate(rounds: int, a: Callable[[], object], b: Callable[[], object]) -> tuple[list, list]:
    """Run a and b `rounds` times each as A B B A A B ..., so drifting machine load hits both alike."""
    xa, xb = [], []
    for r in range(rounds):
        order = ((a, xa), (b, xb)) if r % 2 == 0 else ((b, xb), (a, xa))
        for fn, out in order:
            out.append(fn())
    return xa, xb


def _now() -> tuple[float, float]:
    """(wall clock, CPU time of this process). Training steps are timed in CPU time: on one thread it equals
    wall time on an idle machine, and other processes' load does not inflate it (on a busy 2-core machine
    wall times swing by 2x). The process clock also counts any helper thread a step might start."""
    return time.perf_counter(), time.process_time()


class _StepClock:
    """Callbacks for train(): silent, and a stamp per step (taken after the step's record is written)."""

    def __init__(self):
        self.stamps: list[tuple[float, float]] = []

    def log(self, message: str) -> None:
        pass

    def on_step(self, record: dict) -> None:
        self.stamps.append(_now())

    def should_stop(self) -> bool:
        return False


def _step_times(stamps: list[tuple[float, float]], warmup: int) -> dict:
    """Median and mean step intervals after the first `warmup` steps, in CPU and wall time. The mean counts
    periodic work (health steps) that the median leaves out."""
    d = np.diff(np.asarray(stamps[warmup:], dtype=np.float64).reshape(-1, 2), axis=0)
    if not len(d):
        return {k: float("nan") for k in ("cpu", "wall", "cpu_mean", "wall_mean")}
    return {"cpu": float(np.median(d[:, 1])), "wall": float(np.median(d[:, 0])),
            "cpu_mean": float(np.mean(d[:, 1])), "wall_mean": float(np.mean(d[:, 0]))}


def _paired(a: list[dict], b: list[dict], key: str) -> float:
    """Median over A/B pairs of a[key] / b[key]: adjacent runs share the machine's state, so drift cancels."""
    return _median([x[key] / y[key] for x, y in zip(a, b)])


# ----------------------------------------------------------------------------------------------- the fixture


class _Fixture:
    """Tiny random models and synthetic media in a temp folder, built once per bench run."""

    def __init__(self, root: Path, cfg: BenchConfig, sd15_path: str | Path | None = None):
        from .demo import make_images
        from .tiny import build_tiny_sd15

        self.root, self.cfg = root, cfg
        self.sd15_path = Path(sd15_path) if sd15_path else build_tiny_sd15(root / "sd15")
        self.images = root / "images"
        make_images(self.images)
        self._runs = 0

    def run_dir(self) -> Path:
        self._runs += 1
        return self.root / "runs" / str(self._runs)

    def sd15_job(self, steps: int, *, resolution: int = 32, batch_size: int = 2, schedule: bool = True,
                 **train) -> dict:
        """The demo's job (its schedule, ranks, lr) at `steps`, no intermediate checkpoints, a fresh folder."""
        from .demo import demo_job

        job = demo_job(self.run_dir(), self.sd15_path, self.images, steps)
        job["datasets"][0]["resolution"] = [resolution]
        job["train"].update(batch_size=batch_size, **train)
        job["save"] = {"every": steps, "keep_last": 1, "resume": "none"}
        if not schedule:
            job["network"].pop("alpha_schedule")
        return job

    def load_sd15(self, job):
        from .data.training_set import TrainingSet
        from .families import get_family

        family = get_family("sd15").load(str(self.sd15_path), dtype=torch.float32)
        training_set = TrainingSet.build(job.datasets, family, seed=job.train.seed, log=lambda m: None)
        return family, training_set


# ----------------------------------------------------------------------------------------------- the bare loop


class _BareLoRA(nn.Module):
    """The textbook LoRA wrapper: base(x) + up(down(x)) * alpha / rank."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        self.base = base
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        else:
            conv = type(base)
            self.down = conv(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation,
                             bias=False)
            self.up = conv(rank, base.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + self.up(self.down(x)) * self.scale


def bare_lora_loop(family, training_set, *, steps: int, linear_rank: int, linear_alpha: float, conv_rank: int,
                   conv_alpha: float, lr: float, batch_size: int, max_grad_norm: float, seed: int,
                   on_step: Callable[[], None] = lambda: None, sign_agreement: bool = False) -> dict:
    """A minimal hand-written PyTorch LoRA training loop on an SD 1.5-shaped family's UNet.

    The same targets, ranks, alphas, init, AdamW, gradient clipping and DDPM objective as `train`, with none of
    its bookkeeping (no schedule, metrics, checkpoints, accelerate). `sign_agreement` adds exactly the
    gradient sign agreement measurement `train` makes, for measuring its cost. The UNet is restored afterwards.
    Returns ``{"losses": [...], "lora_parameters": n}``.
    """
    from .schedule.gradient_stability import GradientSignAgreement

    unet = family.denoiser
    unet.requires_grad_(False)
    scheduler = family.scheduler
    torch.manual_seed(seed)
    wrapped = []
    for target in family.target_modules(linear_rank, conv_rank):
        rank, alpha = (linear_rank, linear_alpha) if target.group == "linear" else (conv_rank, conv_alpha)
        parent_name, _, child = target.name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        lora = _BareLoRA(target.module, rank, alpha)
        setattr(parent, child, lora)
        wrapped.append((parent, child, target.module))
    try:
        params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr)
        latents = torch.stack([s.latent for s in training_set.samples])
        conds = torch.stack([training_set.conds[s.item.caption]["encoder_hidden_states"]
                             for s in training_set.samples])
        generator = torch.Generator().manual_seed(seed)
        stability = GradientSignAgreement() if sign_agreement else None
        losses = []
        unet.train()
        for _ in range(steps):
            index = torch.randint(len(latents), (batch_size,), generator=generator)
            x0, cond = latents[index], conds[index]
            noise = torch.randn(x0.shape, generator=generator)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
            noisy = scheduler.add_noise(x0, noise, timesteps)
            pred = unet(noisy, timesteps, encoder_hidden_states=cond, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            if stability is not None:
                agreement = stability.update(params)
                loss_value = torch.stack([loss.detach(), agreement if agreement is not None
                                          else torch.tensor(float("nan"))]).tolist()[0]
            else:
                loss_value = loss.item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss_value)
            on_step()
    finally:
        for parent, child, module in wrapped:
            setattr(parent, child, module)
    return {"losses": losses, "lora_parameters": sum(p.numel() for p in params)}


# ----------------------------------------------------------------------------------------------- the benchmarks


def _loop_settings(job) -> dict:
    n, t = job.network, job.train
    return dict(linear_rank=n.linear, linear_alpha=n.linear_alpha, conv_rank=n.conv, conv_alpha=n.conv_alpha,
                lr=t.lr, batch_size=t.batch_size, max_grad_norm=t.max_grad_norm, seed=t.seed)


@dataclass
class _Context:
    """What later benchmarks reuse from the loop benchmark."""

    family: object = None
    training_set: object = None
    job: object = None
    settings: dict = field(default_factory=dict)
    bare_step_s: float = float("nan")
    ours_step_s: float = float("nan")


def bench_loop(fx: _Fixture, cfg: BenchConfig, ctx: _Context) -> list[Row]:
    """Our train() against the bare loop on the demo's tiny SD 1.5 job: step time, then peak tensor memory."""
    from .job import parse_job
    from .loop import train

    steps = cfg.warmup_steps + cfg.loop_steps
    job = parse_job(fx.sd15_job(steps))
    family, training_set = fx.load_sd15(job)
    family.release_encoders()
    settings = _loop_settings(job)

    def ours(n: int = steps) -> dict:
        clock = _StepClock()
        train(parse_job(fx.sd15_job(n)), clock, family=family, training_set=training_set)
        return _step_times(clock.stamps, min(cfg.warmup_steps, n - 2))

    def bare(n: int = steps) -> dict:
        stamps: list = []
        bare_lora_loop(family, training_set, steps=n, on_step=lambda: stamps.append(_now()), **settings)
        return _step_times(stamps, min(cfg.warmup_steps, n - 2))

    ours(cfg.warmup_steps + 2)  # one-time costs (lazy imports and inits) out of the way for both
    bare(cfg.warmup_steps + 2)
    t_ours, t_bare = _alternate(cfg.rounds, ours, bare)
    step_ours, step_bare = _median([r["cpu"] for r in t_ours]), _median([r["cpu"] for r in t_bare])
    ratio = _paired(t_ours, t_bare, "cpu")
    # three decimals: at three significant digits a 1.034 printed as "1.03" would read as on target
    rows = [Row("loop step time", _ms(step_ours), _ms(step_bare), f"{ratio:.3f}", "<= 1.03",
                f"tiny SD 1.5 (UNet 32/64 ch), 32 px, batch 2, rank 4 linear + conv, AdamW, the demo's schedule; "
                f"{cfg.rounds} A/B pairs of {cfg.loop_steps}-step runs, CPU time per step; ratio = median over "
                f"pairs. Wall-time ratio {_paired(t_ours, t_bare, 'wall'):.3f}; ratio of mean step times "
                f"(counting the health step every 50) {_paired(t_ours, t_bare, 'cpu_mean'):.3f}",
                {"ours_s": step_ours, "bare_s": step_bare, "ratio": ratio, "runs_ours": t_ours, "runs_bare": t_bare})]

    m = cfg.memory_steps
    mem_ours, _ = peak_tensor_bytes(lambda: ours(m))
    mem_bare, _ = peak_tensor_bytes(lambda: bare(m))
    weights = sum(p.numel() * p.element_size() for p in family.denoiser.parameters())
    with_weights = (mem_ours + weights) / (mem_bare + weights)
    rows.append(Row("loop peak tensor memory", _mb(mem_ours), _mb(mem_bare), _fmt_ratio(mem_ours / mem_bare),
                    "<= 1.10", f"peak above the loaded UNet ({_mb(weights)}), whole run incl. checkpoint + export; "
                               f"counting the UNet: ratio {_fmt_ratio(with_weights)}",
                    {"ours_bytes": mem_ours, "bare_bytes": mem_bare, "weights_bytes": weights}))
    ctx.family, ctx.training_set, ctx.job, ctx.settings = family, training_set, job, settings
    ctx.bare_step_s, ctx.ours_step_s = step_bare, step_ours
    return rows


def _bookkeeping_us(job, network, steps: int, path: Path) -> float:
    """Microseconds per step for what the loop does for schedule and metrics: scheduler update, alphas onto the
    network, the record, and its JSONL line (written and flushed)."""
    from .loop import _record
    from .metrics import MetricsLog
    from .schedule.scheduler import AlphaScheduler

    scheduler = AlphaScheduler(job.network.alpha_schedule, job.network.base_alphas())
    rng = np.random.default_rng(0)
    losses = (0.2 + 0.05 * rng.random(steps)).tolist()
    with MetricsLog(path) as log:
        started = time.process_time()
        for step, loss in enumerate(losses, start=1):
            scheduler.update(step, loss, 0.55)
            network.set_alphas(scheduler.alphas())
            log.write(_record(step, loss, 0.55, 1.0, 1e-4, None, scheduler, network))
        elapsed = time.process_time() - started
    path.unlink()
    return elapsed / steps * 1e6


def bench_scheduler(fx: _Fixture, cfg: BenchConfig, ctx: _Context) -> list[Row]:
    """The statistics against the seed's approach; the whole per-step bookkeeping against a training step."""
    from .lora import LoRANetwork
    from .schedule.stats import bench_update_cost

    step_us = ctx.bare_step_s * 1e6
    cost = bench_update_cost(n=cfg.stats_updates)
    ours_us, seed_us = cost["ours_us_per_update"], cost["seed_us_per_update"]
    rows = [Row("scheduler statistics update", f"{ours_us:.2f} us", f"{seed_us:.1f} us (seed)",
                f"{seed_us / ours_us:.0f}x faster", ">= 10x, < 1% of step",
                f"= {100 * ours_us / step_us:.3f}% of the tiny step; per loss: OLS slope + R2 over 200, CV over 50, "
                f"EMA (seed: list.pop(0) + scipy linregress + np.std)", dict(cost))]

    n = ctx.job.network
    network = LoRANetwork(ctx.family.target_modules(n.linear, n.conv), linear_rank=n.linear,
                          linear_alpha=n.linear_alpha, conv_rank=n.conv, conv_alpha=n.conv_alpha)
    runs = [_bookkeeping_us(ctx.job, network, cfg.bookkeeping_steps, fx.root / "bookkeeping.jsonl")
            for _ in range(3)]
    us = _median(runs)
    rows.append(Row("scheduler + metrics per step", f"{us:.1f} us", f"{_ms(ctx.bare_step_s)} (step)",
                    f"{100 * us / step_us:.2f}%", "< 1% of step",
                    f"scheduler.update + alphas onto {len(network.lora)} modules + metrics record + JSONL line "
                    "(flushed)", {"us": us, "step_us": step_us}))
    return rows


def bench_sign_agreement(fx: _Fixture, cfg: BenchConfig, ctx: _Context) -> list[Row]:
    """A step with the gradient sign agreement measurement against the same step without it."""
    from .lora import LoRANetwork
    from .schedule.gradient_stability import GradientSignAgreement

    steps = cfg.warmup_steps + cfg.loop_steps

    def step_with(flag: bool) -> Callable[[], dict]:
        def run() -> dict:
            stamps: list = []
            bare_lora_loop(ctx.family, ctx.training_set, steps=steps, sign_agreement=flag,
                           on_step=lambda: stamps.append(_now()), **ctx.settings)
            return _step_times(stamps, cfg.warmup_steps)
        return run

    with_it, without = _alternate(cfg.rounds, step_with(True), step_with(False))
    t_with, t_without = _median([r["cpu"] for r in with_it]), _median([r["cpu"] for r in without])
    paired = _paired(with_it, without, "cpu")

    # The update alone, on gradients shaped like the tiny LoRA's (plus the host read the loop makes).
    n = ctx.job.network
    network = LoRANetwork(ctx.family.target_modules(n.linear, n.conv), linear_rank=n.linear,
                          linear_alpha=n.linear_alpha, conv_rank=n.conv, conv_alpha=n.conv_alpha)
    params = network.trainable_parameters()
    generator = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    agreement = GradientSignAgreement()
    agreement.update(params)
    timings = []
    for _ in range(3):
        started = time.process_time()
        for _ in range(cfg.sign_repeats):
            agreement.update(params).item()
        timings.append((time.process_time() - started) / cfg.sign_repeats)
    alone = _median(timings)
    elements = sum(p.numel() for p in params)
    return [Row("gradient sign agreement", _ms(t_with), f"{_ms(t_without)} (without)",
                _fmt_ratio(paired), "",
                f"update alone: {alone * 1e6:.0f} us = {100 * alone / t_without:.2f}% of the step "
                f"({len(params)} tensors, {elements:,} elements)",
                {"with_s": t_with, "without_s": t_without, "ratio": paired, "update_s": alone})]


# ---- data ----


def _clip_frames(count: int, width: int, height: int, seed: int = 0):
    """A smooth texture drifting across the frame, with mild grain: compresses and decodes like real footage
    (random noise would cost far more than real video; flat frames far less)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 8 + 2, (width + count) // 8 + 2, 3), dtype=np.uint8)
    texture = np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)
    for i in range(count):
        grain = rng.integers(0, 24, (height, width, 1), dtype=np.uint8)
        yield texture[:height, i:i + width] // 2 + grain


def write_clip(path: Path, *, width: int, height: int, frames: int, gop: int, fps: int = 24) -> Path:
    """An H.264 mp4 with a keyframe exactly every `gop` frames."""
    import av

    container = av.open(str(path), "w")
    try:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = {"x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0", "crf": "23",
                          "preset": "veryfast"}
        for array in _clip_frames(frames, width, height):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()
    return path


def decode_every_frame(path: Path, indices: list[int]) -> list[tuple[int, np.ndarray]]:
    """The naive reader: decode the whole clip to RGB, then pick the frames."""
    import av

    container = av.open(str(path))
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    finally:
        container.close()
    return [(i, frames[i]) for i in sorted(set(indices))]


def bench_video_sampling(fx: _Fixture, cfg: BenchConfig) -> list[Row]:
    from .data.video import choose_strategy, probe_video, read_frames, sample_indices

    width, height = cfg.video_size
    rows = []
    for label, gop in (("sparse", cfg.sparse_gop), ("dense", cfg.dense_gop)):
        path = write_clip(fx.root / f"clip_{label}.mp4", width=width, height=height, frames=cfg.video_length, gop=gop)
        info = probe_video(path)
        indices = sample_indices(info.frame_count, cfg.sample_frames)
        auto = choose_strategy(info, indices, "auto")
        outputs: dict[str, list] = {}
        decoded: dict[str, int] = {}

        def reader(strategy: str) -> Callable[[], float]:
            def run() -> float:
                started = time.perf_counter()
                if strategy == "all":
                    frames = decode_every_frame(path, indices)
                    decoded["all"] = info.frame_count
                else:
                    stats: dict = {}
                    frames = list(read_frames(path, indices, strategy, info, stats))
                    decoded[strategy] = stats["decoded"]
                elapsed = time.perf_counter() - started
                outputs[strategy] = frames
                return elapsed
            return run

        times: dict[str, list] = {"all": [], "decode": [], "seek": []}
        order = ["all", "decode", "seek"]
        for r in range(cfg.sampling_repeats):
            for strategy in (order if r % 2 == 0 else order[::-1]):
                times[strategy].append(reader(strategy)())
        med = {k: _median(v) for k, v in times.items()}
        same = all(len(outputs[k]) == len(outputs["all"]) and
                   all(a[0] == b[0] and np.array_equal(a[1], b[1]) for a, b in zip(outputs[k], outputs["all"]))
                   for k in ("decode", "seek"))
        fps = {k: len(indices) / v for k, v in med.items()}
        rows.append(Row(
            f"video sampling, {label} keyframes", f"{fps[auto]:.0f} frames/s ({auto})",
            f"{fps['all']:.0f} frames/s (decode all)", f"{med['all'] / med[auto]:.1f}x faster", "",
            f"{cfg.sample_frames} of {info.frame_count} frames, {width}x{height} H.264, keyframe every "
            f"{info.keyframe_interval:g}; decode {fps['decode']:.0f}/s ({decoded['decode']} decoded), seek "
            f"{fps['seek']:.0f}/s ({decoded['seek']} decoded); identical pixels: {'yes' if same else 'NO'}",
            {"seconds": med, "auto": auto, "same_frames": same, "decoded": dict(decoded)}))
    return rows


def bench_cache(fx: _Fixture, cfg: BenchConfig, ctx: _Context) -> list[Row]:
    """Epoch 1 (read + encode everything, then train) against epoch 2 (train from the cache); a new run that
    finds its latents in the disk cache against one that encodes them."""
    from .data.training_set import TrainingSet
    from .families import get_family
    from .job import parse_job

    family = get_family("sd15").load(str(fx.sd15_path), dtype=torch.float32)
    job = parse_job(fx.sd15_job(10))
    build = lambda **kw: TrainingSet.build(job.datasets, family, seed=0, log=lambda m: None, **kw)  # noqa: E731

    builds, collates = [], []
    for _ in range(cfg.cache_rounds):
        started = time.perf_counter()
        training_set = build()
        builds.append(time.perf_counter() - started)
        batches = training_set.epoch_batches(0, job.train.batch_size, 0)
        generator = torch.Generator().manual_seed(0)
        started = time.perf_counter()
        for batch in batches:
            training_set.collate(batch, generator)
        collates.append(time.perf_counter() - started)
    encode_s, collate_s = _median(builds), _median(collates)
    samples, steps = len(training_set), len(batches)
    epoch1 = encode_s + steps * ctx.ours_step_s
    epoch2 = collate_s + steps * ctx.ours_step_s
    rows = [Row("epoch 2 (cached) vs epoch 1 (encode)", _ms(epoch2), _ms(epoch1), _fmt_ratio(epoch2 / epoch1),
                "", f"{samples} images, {steps} steps/epoch at {_ms(ctx.ours_step_s)}; data alone: "
                    f"{encode_s / samples * 1e3:.1f} ms/sample to read + encode (VAE, text) vs "
                    f"{collate_s / samples * 1e6:.1f} us/sample from the cache",
                {"encode_s": encode_s, "collate_s": collate_s, "epoch1_s": epoch1, "epoch2_s": epoch2})]

    disk_job = parse_job(fx.sd15_job(10))
    disk_job.datasets[0].cache_latents_to_disk = True
    cold, warm = [], []
    for r in range(cfg.cache_rounds):
        cache_dir = fx.root / f"latent_cache_{r}"
        started = time.perf_counter()
        TrainingSet.build(disk_job.datasets, family, seed=0, log=lambda m: None, cache_dir=cache_dir)
        cold.append(time.perf_counter() - started)
        started = time.perf_counter()
        TrainingSet.build(disk_job.datasets, family, seed=0, log=lambda m: None, cache_dir=cache_dir)
        warm.append(time.perf_counter() - started)
    rows.append(Row("new run, latents from disk cache", _ms(_median(warm)), f"{_ms(_median(cold))} (encode + write)",
                    _fmt_ratio(_median(warm) / _median(cold)), "",
                    f"TrainingSet.build of {samples} images; both scan the files and encode the captions "
                    "(text embeddings live in memory only)", {"warm_s": _median(warm), "cold_s": _median(cold)}))
    return rows


# ---- scale ----


def _synthetic_set(latent_shape: tuple, cond: dict, *, kind: str, frames: int, size: int, count: int = 2):
    """A TrainingSet of random latents of one shape and one caption (what TrainingSet.build would make)."""
    from .data.sources import MediaItem
    from .data.training_set import Sample, TrainingSet

    generator = torch.Generator().manual_seed(0)
    samples = []
    for i in range(count):
        item = MediaItem(kind=kind, caption="bench", width=size, height=size, source="bench", extra={"index": i},
                         num_frames=frames, frame_count=frames)
        samples.append(Sample(item, size, (size, size), tuple(range(frames)),
                              torch.randn(latent_shape, generator=generator)))
    return TrainingSet(samples, {"bench": cond}, seed=0)


def _train_once(fx: _Fixture, job_dict: dict, family, training_set, steps: int, warmup: int) -> float:
    from .job import parse_job
    from .loop import train

    job_dict = dict(job_dict, output_dir=str(fx.run_dir()), train=dict(job_dict["train"], steps=steps),
                    save={"every": steps, "keep_last": 1, "resume": "none"})
    clock = _StepClock()
    train(parse_job(job_dict, require_datasets=False), clock, family=family, training_set=training_set)
    return _step_times(clock.stamps, warmup)["cpu"]


def _scale_point(fx: _Fixture, job_dict, family, training_set, cfg: BenchConfig) -> tuple[float, int]:
    step_s = _train_once(fx, job_dict, family, training_set, cfg.scale_warmup + cfg.scale_steps, cfg.scale_warmup)
    memory, _ = peak_tensor_bytes(lambda: _train_once(fx, job_dict, family, training_set, 2, 0))
    return step_s, memory


def bench_scale(fx: _Fixture, cfg: BenchConfig, wan21_path: Path | None) -> list[Row]:
    from .families import get_family

    rows = []
    family = get_family("sd15").load(str(fx.sd15_path), dtype=torch.float32)
    cond = family.encode_prompts(["bench"])[0]
    family.release_encoders()
    first = None
    for size in cfg.image_sizes:
        latent = (4, size // 8, size // 8)
        job = fx.sd15_job(10, resolution=size, batch_size=1, schedule=False)
        job["datasets"] = []
        training_set = _synthetic_set(latent, cond, kind="image", frames=1, size=size)
        step_s, memory = _scale_point(fx, job, family, training_set, cfg)
        first = first or (step_s, memory, size)
        rows.append(Row(f"scale: image {size}x{size} px", f"{_ms(step_s)}, {_mb(memory)}",
                        f"{_ms(first[0])}, {_mb(first[1])} ({first[2]} px)",
                        f"{step_s / first[0]:.2f}x time, {memory / first[1]:.2f}x mem", "",
                        f"tiny SD 1.5, latent {'x'.join(map(str, latent))}, batch 1, rank 4",
                        {"step_s": step_s, "memory_bytes": memory}))

    size = cfg.image_sizes[-1]
    job = fx.sd15_job(10, resolution=size, batch_size=1, schedule=False, gradient_checkpointing=True)
    job["datasets"] = []
    training_set = _synthetic_set((4, size // 8, size // 8), cond, kind="image", frames=1, size=size)
    step_ck, memory_ck = _scale_point(fx, job, family, training_set, cfg)
    family.denoiser.disable_gradient_checkpointing()
    plain_s, plain_m = rows[-1].values["step_s"], rows[-1].values["memory_bytes"]
    rows.append(Row("gradient checkpointing", f"{_ms(step_ck)}, {_mb(memory_ck)}",
                    f"{_ms(plain_s)}, {_mb(plain_m)} (off)",
                    f"{step_ck / plain_s:.2f}x time, {memory_ck / plain_m:.2f}x mem", "",
                    f"tiny SD 1.5 at {size}x{size} px (train.gradient_checkpointing: true)",
                    {"step_s": step_ck, "memory_bytes": memory_ck}))

    if wan21_path is None:
        return rows
    wan = get_family("wan21").load(str(wan21_path), dtype=torch.float32)
    cond = wan.encode_prompts(["bench"])[0]
    wan.release_encoders()
    px = cfg.video_pixels
    first = None
    for frames in cfg.video_frames:
        latent = (16, (frames - 1) // 4 + 1, px // 8, px // 8)
        job = {"job": "scale",
               "model": {"family": "wan21", "path": str(wan21_path), "dtype": "fp32"}, "datasets": [],
               "network": {"linear": 4, "linear_alpha": 4}, "train": {"batch_size": 1, "lr": 1e-4, "seed": 0}}
        training_set = _synthetic_set(latent, cond, kind="video", frames=frames, size=px)
        step_s, memory = _scale_point(fx, job, wan, training_set, cfg)
        first = first or (step_s, memory, frames)
        tokens = latent[1] * (px // 16) ** 2
        rows.append(Row(f"scale: video {frames} frames", f"{_ms(step_s)}, {_mb(memory)}",
                        f"{_ms(first[0])}, {_mb(first[1])} ({first[2]} frames)",
                        f"{step_s / first[0]:.2f}x time, {memory / first[1]:.2f}x mem", "",
                        f"tiny Wan 2.1, {px}x{px} px, latent {'x'.join(map(str, latent))} = {tokens} tokens, "
                        "batch 1, rank 4", {"step_s": step_s, "memory_bytes": memory}))
    return rows


# ---- fp8 base weights ----


def full_size_fp8_ratio() -> float:
    """Stored bytes of the full-size Wan 2.1 14B transformer with model.dtype fp8 over bf16, counted on the meta
    device (no memory): what the quantized block Linears save at the size fp8 is for."""
    from diffusers import WanTransformer3DModel

    from .fp8_base import quantizable

    with torch.device("meta"):
        model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128,
                                      in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824,
                                      num_layers=40, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
    total = sum(p.numel() for p in model.parameters())
    in_fp8 = sum(m.weight.numel() for n, m in model.named_modules() if quantizable(n, m))
    return (in_fp8 + 2 * (total - in_fp8)) / (2 * total)


# The fp8 row's transformer: the tiny Wan 2.1 made wide enough (model width 256, 4 blocks, 8 MiB in bf16) that
# its block Linears hold most of its weights, as in the real 1.3B / 14B models; the tiny fixture's own
# transformer (width 24) is mostly embeddings and would show nothing of what fp8 saves.
FP8_WAN_WIDTH = {"num_attention_heads": 4, "attention_head_dim": 64, "ffn_dim": 1024, "num_layers": 4}


def bench_fp8(fx: _Fixture, cfg: BenchConfig, wan21_path: Path) -> list[Row]:
    """model.dtype fp8 against bf16 on a widened tiny Wan 2.1, both in this process: step time (alternated runs)
    and peak tensor memory of a run counting the denoiser's own weights (the peak probe starts above them)."""
    import copy

    from diffusers import WanTransformer3DModel

    from .families import get_family
    from .fp8_base import quantize_family, stored_bytes

    families = {d: get_family("wan21").load(str(wan21_path), dtype=torch.bfloat16) for d in ("fp8", "bf16")}
    torch.manual_seed(0)
    folder = fx.root / "wan21_wide"  # saved and loaded as a family loads it: what diffusers keeps in fp32 stays so
    WanTransformer3DModel.from_config({**families["bf16"].denoiser.config, **FP8_WAN_WIDTH}).save_pretrained(folder)
    wide = WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16).requires_grad_(False).eval()
    for d, family in families.items():
        family.loaded.denoiser = copy.deepcopy(wide)
    quantize_family(families["fp8"], "cpu")
    cond = families["bf16"].encode_prompts(["bench"])[0]
    for family in families.values():
        family.release_encoders()
    px, frames = cfg.video_pixels, cfg.video_frames[0]
    latent = (16, (frames - 1) // 4 + 1, px // 8, px // 8)
    training_set = _synthetic_set(latent, cond, kind="video", frames=frames, size=px)

    def job(dtype: str) -> dict:
        return {"job": "fp8", "model": {"family": "wan21", "path": str(wan21_path), "dtype": dtype}, "datasets": [],
                "network": {"linear": 4, "linear_alpha": 4}, "train": {"batch_size": 1, "lr": 1e-4, "seed": 0}}

    def run(dtype: str) -> Callable[[], float]:
        steps = cfg.scale_warmup + cfg.scale_steps
        return lambda: _train_once(fx, job(dtype), families[dtype], training_set, steps, cfg.scale_warmup)

    times_fp8, times_bf16 = _alternate(min(cfg.rounds, 3), run("fp8"), run("bf16"))
    step_fp8, step_bf16 = _median(times_fp8), _median(times_bf16)
    time_ratio = _median([a / b for a, b in zip(times_fp8, times_bf16)])
    weights = {d: stored_bytes(f.denoiser) for d, f in families.items()}
    peak = {d: peak_tensor_bytes(lambda d=d: _train_once(fx, job(d), families[d], training_set, 2, 0))[0]
            for d in families}
    total = {d: weights[d] + peak[d] for d in families}
    full = full_size_fp8_ratio()
    return [Row("fp8 base weights", f"{_ms(step_fp8)}, {_mb(total['fp8'])}", f"{_ms(step_bf16)}, {_mb(total['bf16'])} "
                "(bf16)", f"{time_ratio:.2f}x time, {total['fp8'] / total['bf16']:.2f}x mem", "",
                f"tiny Wan 2.1 widened to 256 ch x 4 blocks ({_mb(weights['bf16'])} bf16), {px}x{px} px, {frames} "
                f"frames, batch 1, rank 4; mem = denoiser weights + the run's peak above them; weights alone "
                f"{weights['fp8'] / weights['bf16']:.2f}x, full-size Wan 2.1 14B {full:.3f}x; time: every fp8 layer "
                "is dequantized twice a step (forward, backward)",
                {"step_fp8_s": step_fp8, "step_bf16_s": step_bf16, "time_ratio": time_ratio, "weights": weights,
                 "peak": peak, "memory_ratio": total["fp8"] / total["bf16"], "full_size_ratio": full})]


# ----------------------------------------------------------------------------------------------- the table


def machine() -> str:
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} thread), "
            f"Python {platform.python_version()}")


def _load() -> str:
    import os

    try:
        return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "n/a"


HEADER = "| benchmark | ours | baseline | ratio | target | notes |\n|---|---|---|---|---|---|"


def format_row(row: Row) -> str:
    cells = (row.name, row.ours, row.baseline, row.ratio, row.target, row.note)
    return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"


def run_bench(quick: bool = False, *, config: BenchConfig | None = None, workdir: str | Path | None = None,
              sd15_path: str | Path | None = None, wan21_path: str | Path | None = None,
              out: Callable[[str], None] = print) -> list[Row]:
    """Run every benchmark and print one Markdown table row per result as it completes; return the rows.

    `config` overrides the FULL / QUICK sizes (tests use tiny ones). `sd15_path` / `wan21_path`: tiny model
    folders to use instead of building them. Never raises because of a measured number.
    """
    from .tiny import build_tiny_wan21

    cfg = config or (QUICK if quick else FULL)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: thread hand-offs would dominate (see the module docstring)
    started = time.perf_counter()
    rows: list[Row] = []
    try:
        with tempfile.TemporaryDirectory(prefix="phase_trainer_bench_") as tmp:
            root = Path(workdir) if workdir else Path(tmp)
            root.mkdir(parents=True, exist_ok=True)
            out(f"Phase Trainer bench ({'quick' if quick else 'full'}) on {machine()}; load average {_load()}")
            out("")
            out(HEADER)
            fx = _Fixture(root, cfg, sd15_path=sd15_path)
            ctx = _Context()

            def emit(new_rows: list[Row]) -> None:
                for row in new_rows:
                    rows.append(row)
                    out(format_row(row))

            emit(bench_loop(fx, cfg, ctx))
            emit(bench_scheduler(fx, cfg, ctx))
            emit(bench_sign_agreement(fx, cfg, ctx))
            emit(bench_video_sampling(fx, cfg))
            emit(bench_cache(fx, cfg, ctx))
            wan = Path(wan21_path) if wan21_path else build_tiny_wan21(root / "wan21")
            emit(bench_scale(fx, cfg, wan))
            emit(bench_fp8(fx, cfg, wan))
            out("")
            out(f"{len(rows)} rows in {time.perf_counter() - started:.0f} s; load average at the end {_load()}")
    finally:
        torch.set_num_threads(threads)
    return rows
