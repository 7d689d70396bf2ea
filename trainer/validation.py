"""Fixed-noise validation loss: the mean loss on fixed items, fixed noise and fixed timesteps, without gradients.

Same inputs every time, so only the weights change between two evaluations: unlike the training loss it does
not mostly measure which timestep was drawn.

- Items: held-out items (the job's ``validation.folder_path``, scanned and encoded like a dataset) or, without
  one, ``items`` training items spread evenly over the training set. Latents and embeddings are the cached ones.
- Timesteps: ``timesteps`` quantile midpoints of u in ``u_range`` = [lo, hi) (u is the uniform number a family
  maps to its own timestep distribution, so these are quantiles of that distribution: e.g. shifted sigmas for
  Wan). For a two-expert model each expert is validated on the u range it trains on.
- Noise: drawn once from ``seed``, one tensor per (item, timestep).
- No RNG is consumed and dropout is off while evaluating, so validating does not change the training run.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .families.base import masked_mse


def quantile_midpoints(n: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """``n`` quantile midpoints of U[lo, hi): lo + (hi - lo) * (i + 0.5) / n, float64."""
    if n < 1:
        raise ValueError(f"need at least one timestep, got {n}")
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"u range must satisfy 0 <= lo < hi <= 1, got [{lo}, {hi})")
    return lo + (hi - lo) * (torch.arange(n, dtype=torch.float64) + 0.5) / n


@contextmanager
def eval_mode(*modules):
    """Put modules in eval mode (dropout off) for the block, then restore each one's previous mode."""
    modules = [m for m in modules if m is not None]
    was = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, w in zip(modules, was):
            m.train(w)


class FixedNoiseProbe:
    def __init__(self, training_set, family, *, items: int = 4, timesteps: int = 8, seed: int = 1234,
                 u_range: tuple = (0.0, 1.0), chunk: int | None = None):
        if items < 1:
            raise ValueError(f"validation needs at least one item, got {items}")
        n = min(items, len(training_set))
        step = max(1, len(training_set) // n)
        self.indices = list(range(0, step * n, step))[:n]
        self.u = quantile_midpoints(timesteps, *u_range)
        self.u_range = (float(u_range[0]), float(u_range[1]))
        self.chunk = max(1, int(chunk)) if chunk else timesteps  # timesteps per forward (memory on big models)
        g = torch.Generator().manual_seed(seed)
        self.batches = []
        for i in self.indices:
            b = training_set.collate([i], None)  # no caption dropout
            noise = torch.randn((timesteps, *b["latents"].shape[1:]), generator=g, dtype=b["latents"].dtype)
            self.batches.append((b["latents"], b["cond"], noise))
        self.family = family

    @torch.no_grad()
    def loss(self, device=None, dtype=None, per_timestep: bool = False, modules=()):
        """Mean loss over items and timesteps; with ``per_timestep`` also the per-timestep means (list).

        ``modules``: extra modules to hold in eval mode while evaluating (e.g. the LoRA network, whose
        dropout lives outside the denoiser's module tree); the denoiser always is."""
        fam = self.family
        n = len(self.u)
        total = torch.zeros(n, dtype=torch.float64)
        dev = device or next(fam.denoiser.parameters()).device
        dt = dtype or next(fam.denoiser.parameters()).dtype
        with eval_mode(fam.denoiser, *modules):
            for latents, cond, noise in self.batches:
                for a in range(0, n, self.chunk):
                    b = min(n, a + self.chunk)
                    lat = latents.expand(b - a, *latents.shape[1:])
                    noisy = fam.add_noise(lat, noise[a:b], self.u[a:b].to(torch.float32))
                    noisy.model_input = noisy.model_input.to(dev, dt)
                    noisy.timesteps = noisy.timesteps.to(dev)
                    c = {k: v.to(dev, dt).expand(b - a, *v.shape[1:]) for k, v in cond.items()}
                    pred = fam.predict(noisy, c).float()
                    target = noisy.target.to(dev, torch.float32)
                    total[a:b] += masked_mse(pred, target, fam.loss_mask(c, pred.shape), per_item=True).double().cpu()
        per_t = total / len(self.batches)
        return (float(per_t.mean()), per_t.tolist()) if per_timestep else float(per_t.mean())


def validation_dataset(job, folder_path: str):
    """The held-out folder as a dataset entry: the first training dataset's settings (resolution, frames,
    captions, trigger), without caption dropout or repeats."""
    from dataclasses import replace

    from .job import DatasetConfig

    base = job.datasets[0] if job.datasets else DatasetConfig(folder_path=folder_path)
    return replace(base, folder_path=folder_path, caption_dropout_rate=0.0, num_repeats=1)


def scan_validation(job, family_cls, log=print) -> list:
    """Check the held-out folder's files (cheap, before any model loads); [] without a held-out folder."""
    v = getattr(job, "validation", None)
    if v is None or not v.folder_path:
        return []
    from .data.training_set import scan_datasets

    return scan_datasets([validation_dataset(job, v.folder_path)], family_cls, log=log)


def build_probe(job, family, training_set, held_out_items=(), log=print, u_range=(0.0, 1.0)):
    """The job's FixedNoiseProbe (None when validation is off). Held-out items are encoded here, so call this
    before the family releases its encoders."""
    v = getattr(job, "validation", None)
    if v is None:
        return None
    source = training_set
    if held_out_items:
        from .data.training_set import TrainingSet

        source = TrainingSet.build(list(held_out_items), family, seed=v.seed, log=log)
    probe = FixedNoiseProbe(source, family, items=v.items, timesteps=v.timesteps, seed=v.seed,
                            chunk=job.train.batch_size, u_range=u_range)
    where = "held-out items" if held_out_items else "training items (no validation.folder_path)"
    log(f"validation every {v.every} steps on {len(probe.indices)} {where} x {v.timesteps} fixed timesteps")
    return probe
