"""Fixed-noise loss: the mean loss on fixed items, fixed noise and fixed timesteps, without gradients.

Same inputs every time, so only the weights change between two evaluations: unlike the training loss it does
not mostly measure which timestep was drawn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class FixedNoiseProbe:
    def __init__(self, training_set, family, *, items: int = 4, timesteps: int = 8, seed: int = 1234):
        n = min(items, len(training_set))
        step = max(1, len(training_set) // n)
        self.indices = list(range(0, step * n, step))[:n]
        # quantile midpoints of the family's u in [0, 1): 1/16, 3/16, ... for 8 timesteps
        self.u = (torch.arange(timesteps, dtype=torch.float64) + 0.5) / timesteps
        g = torch.Generator().manual_seed(seed)
        self.batches = []
        for i in self.indices:
            b = training_set.collate([i], None)  # no caption dropout
            noise = torch.randn((timesteps, *b["latents"].shape[1:]), generator=g, dtype=b["latents"].dtype)
            self.batches.append((b["latents"], b["cond"], noise))
        self.family = family

    @torch.no_grad()
    def loss(self, device=None, dtype=None, per_timestep: bool = False):
        fam = self.family
        total = torch.zeros(len(self.u), dtype=torch.float64)
        for latents, cond, noise in self.batches:
            n = len(self.u)
            lat = latents.expand(n, *latents.shape[1:])
            noisy = fam.add_noise(lat, noise, self.u.to(torch.float32))
            dev = device or next(fam.denoiser.parameters()).device
            dt = dtype or next(fam.denoiser.parameters()).dtype
            noisy.model_input = noisy.model_input.to(dev, dt)
            noisy.timesteps = noisy.timesteps.to(dev)
            c = {k: v.to(dev, dt).expand(n, *v.shape[1:]) for k, v in cond.items()}
            pred = fam.predict(noisy, c).float()
            target = noisy.target.to(dev, torch.float32)
            total += F.mse_loss(pred, target, reduction="none").flatten(1).mean(1).double().cpu()
        per_t = total / len(self.batches)
        return (float(per_t.mean()), per_t.tolist()) if per_timestep else float(per_t.mean())
