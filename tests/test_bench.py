"""`python -m trainer bench`: every row is printed (on tiny sizes), its baselines are what they claim to be,
and the memory probe measures what it says. No assertion here is about a timing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures_models import tiny_sd15_path, tiny_wan21_path  # noqa: F401
from trainer.bench import (
    HEADER,
    ROWS,
    BenchConfig,
    bare_lora_loop,
    decode_every_frame,
    peak_tensor_bytes,
    run_bench,
    write_clip,
)
from trainer.data.training_set import TrainingSet
from trainer.data.video import probe_video, read_frames, sample_indices
from trainer.demo import make_images
from trainer.families import get_family
from trainer.job import parse_job
from trainer.lora import LoRANetwork
from trainer.schedule.gradient_stability import GradientSignAgreement

TINY = BenchConfig(rounds=1, loop_steps=3, warmup_steps=1, memory_steps=2, stats_updates=60, bookkeeping_steps=30,
                   sign_repeats=3, video_size=(64, 48), video_length=24, sparse_gop=24, dense_gop=4,
                   sample_frames=5, sampling_repeats=1, cache_rounds=1, image_sizes=(32,), video_frames=(5,),
                   video_pixels=32, scale_steps=2, scale_warmup=1)


def test_quick_bench_prints_every_row(tiny_sd15_path, tiny_wan21_path, tmp_path):
    lines: list[str] = []
    rows = run_bench(quick=True, config=TINY, workdir=tmp_path, sd15_path=tiny_sd15_path,
                     wan21_path=tiny_wan21_path, out=lines.append)
    text = "\n".join(lines)
    assert HEADER in text
    table = [line for line in lines if line.startswith("| ") and not line.startswith("| benchmark")]
    assert len(table) == len(rows)
    for name in ROWS:
        assert any(line.startswith(f"| {name}") for line in table), f"row {name!r} missing:\n{text}"
    for row in rows:
        assert row.ours and row.baseline and row.ratio, row
    by_name = {row.name: row for row in rows}
    # The numbers behind the rows are real measurements (positive, finite), whatever their size.
    loop = by_name["loop step time"].values
    assert loop["ours_s"] > 0 and loop["bare_s"] > 0
    memory = by_name["loop peak tensor memory"].values
    assert memory["ours_bytes"] > 0 and memory["bare_bytes"] > 0
    assert by_name["scheduler statistics update"].values["speedup"] > 0
    assert all(row.values["same_frames"] for row in rows if row.name.startswith("video sampling"))
    assert torch.get_num_threads() == 1  # restored to what conftest set


def test_bare_loop_trains_the_same_lora_size_and_restores_the_unet(tiny_sd15_path, tmp_path):
    data = tmp_path / "images"
    make_images(data)
    job = parse_job({"job": "b", "output_dir": str(tmp_path / "out"),
                     "model": {"family": "sd15", "path": str(tiny_sd15_path), "dtype": "fp32"},
                     "datasets": [{"folder_path": str(data), "resolution": [32]}],
                     "network": {"linear": 4, "linear_alpha": 4, "conv": 4, "conv_alpha": 8}})
    family = get_family("sd15").load(str(tiny_sd15_path), dtype=torch.float32)
    training_set = TrainingSet.build(job.datasets, family, seed=0,
                                     log=lambda m: None)
    modules_before = dict(family.denoiser.named_modules())
    weights_before = {k: v.clone() for k, v in family.denoiser.state_dict().items()}
    out = bare_lora_loop(family, training_set, steps=25, linear_rank=4, linear_alpha=4, conv_rank=4, conv_alpha=8,
                         lr=3e-3, batch_size=2, max_grad_norm=1.0, seed=0, sign_agreement=True)
    ours = LoRANetwork(family.target_modules(4, 4), linear_rank=4, linear_alpha=4, conv_rank=4, conv_alpha=8)
    assert out["lora_parameters"] == ours.num_parameters()
    assert len(out["losses"]) == 25 and all(np.isfinite(out["losses"]))
    assert dict(family.denoiser.named_modules()).keys() == modules_before.keys()
    assert all(a is modules_before[k] for k, a in family.denoiser.named_modules())
    after = family.denoiser.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights_before.items())


def test_peak_tensor_bytes_sees_a_freed_temporary():
    def work():
        kept = torch.ones(250_000)             # 1 MB, alive at the end
        temporary = torch.ones(1_000_000)      # 4 MB, freed before the end
        total = float(temporary.sum())
        del temporary
        return kept, total

    peak, (kept, total) = peak_tensor_bytes(work)
    assert total == 1_000_000.0
    assert 5_000_000 <= peak < 5_000_000 + 64_000  # both buffers at once, plus a few scalars


def test_write_clip_keyframes_and_naive_decoder_match_read_frames(tmp_path):
    path = write_clip(tmp_path / "c.mp4", width=64, height=48, frames=30, gop=5)
    info = probe_video(path)
    assert info.frame_count == 30 and info.keyframe_interval == 5
    indices = sample_indices(30, 7)
    naive = decode_every_frame(path, indices)
    for strategy in ("decode", "seek"):
        ours = list(read_frames(path, indices, strategy, info))
        assert [i for i, _ in ours] == [i for i, _ in naive] == sorted(set(indices))
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(ours, naive))


def _reference_agreement(history: list[list], current: list) -> float | None:
    """Per-parameter NumPy reference: compare each parameter with the last step where it had a gradient."""
    disagree = compared = 0
    for i, grad in enumerate(current):
        if grad is None:
            continue
        previous = next((step[i] for step in reversed(history) if step[i] is not None), None)
        if previous is not None:
            disagree += int(np.count_nonzero((previous > 0) != (grad > 0)))
            compared += grad.size
    return None if compared == 0 else 1.0 - disagree / compared


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sign_agreement_matches_per_parameter_reference(seed, tmp_path):
    """The flat fast path (every parameter has a gradient) and the per-parameter path (some do not), mixed in
    any order and across a state round trip, give the reference's value."""
    from safetensors.torch import load_file, save_file

    rng = np.random.default_rng(seed)
    shapes = [(4, 8), (8, 4), (3, 3, 2, 2), (5,), (1,)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    agreement = GradientSignAgreement()
    history: list[list] = []
    for step in range(30):
        grads = []
        for s in shapes:
            if rng.random() < 0.15:
                grads.append(None)
            else:
                g = rng.standard_normal(s).astype(np.float32)
                g[rng.random(s) < 0.1] = 0.0
                grads.append(g)
        for p, g in zip(params, grads):
            p.grad = None if g is None else torch.from_numpy(g)
        expected = _reference_agreement(history, grads)
        got = agreement.update(params)
        if expected is None:
            assert got is None
        else:
            assert got.item() == pytest.approx(expected, abs=1e-6)
        history.append(grads)
        if step % 7 == 3:
            save_file(agreement.state_dict(), tmp_path / "s.safetensors")
            agreement = GradientSignAgreement()
            agreement.load_state_dict(load_file(tmp_path / "s.safetensors"))
