"""The training set: every sample encoded once before training, then batches drawn from the cache.

`TrainingSet.build` validates and scans the datasets, assigns buckets, encodes each distinct caption once
and each (media, bucket) once (or reads it from the disk cache), keeping everything on CPU. After it returns
the caller may release the family's encoders: the training set never needs them again.

A *sample* is one media item at one resolution; ``len(ts)`` counts samples, and an epoch visits each
sample `num_repeats` times.

Per-item conditioning: a family whose denoiser is conditioned on the item itself (image-to-video: the clip's
first frame) returns a dict from `encode_pixels`: ``{"latents": ..., <cond key>: ...}``. The extra entries
are cached with the sample (in memory, and on disk under keys derived from the latent's) and `collate`
stacks them into ``batch["cond"]`` beside the caption's conditioning. Such a family sets `item_cond_keys`
(the names it returns) and, when its conditioning can be switched per dataset, `supports_i2v`: then
`encode_pixels(pixels, i2v=<the dataset's do_i2v>)` is called.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from trainer.data.buckets import bucket_size
from trainer.data.cache import (
    DiskLatentCache,
    encode_captions,
    file_sha256,
    latent_cache_key,
    tensor_sha256,
)
from trainer.data.captions import apply_dropout
from trainer.data.sources import CACHE_DIRNAME, MediaItem, load_pixels, resolutions_of, scan_folder
from trainer.data.video import STRATEGIES, sample_indices
from trainer.errors import DatasetError, JobError


@dataclass
class Sample:
    item: MediaItem
    resolution: int | None
    bucket: tuple[int, int]          # (width, height) in pixels
    frame_indices: tuple[int, ...]
    latent: torch.Tensor | None = None
    cond: dict = field(default_factory=dict)  # per-item conditioning from the family (e.g. an I2V first frame)

    @property
    def shape_key(self) -> str:
        return f"{self.bucket[0]}x{self.bucket[1]}x{len(self.frame_indices)}"


def _setting(cfg, name: str, default):
    return cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)


def validate_dataset_config(cfg, index: int, family) -> None:
    """JobError naming ``datasets[index].<field>`` for any setting the pipeline cannot use."""
    def field(name: str) -> str:
        return f"datasets[{index}].{name}"

    if not str(_setting(cfg, "folder_path", "") or "").strip():
        raise JobError(field("folder_path"), "is required: the folder holding the images or videos")
    if not str(_setting(cfg, "caption_ext", "txt") or "").strip(". "):
        raise JobError(field("caption_ext"), "must name the caption files' extension, e.g. txt")
    rate = _setting(cfg, "caption_dropout_rate", 0.0)
    if not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise JobError(field("caption_dropout_rate"), f"must be a number from 0 to 1, got {rate!r}")
    try:
        resolutions = resolutions_of(cfg)
    except (TypeError, ValueError):
        resolutions = ()
    factor = family.resolution_factor
    if not resolutions or any(r < factor for r in resolutions):
        raise JobError(field("resolution"), f"must be a list of pixel sizes of at least {factor}, got "
                                            f"{_setting(cfg, 'resolution', None)!r}")
    num_frames = _setting(cfg, "num_frames", 1)
    if not isinstance(num_frames, int) or num_frames < 1 or not family.valid_num_frames(num_frames):
        raise JobError(field("num_frames"), f"{num_frames!r} is not allowed for the {family.name or 'chosen'} family: "
                                            f"use {family.num_frames_rule()}")
    repeats = _setting(cfg, "num_repeats", 1)
    if not isinstance(repeats, int) or repeats < 1:
        raise JobError(field("num_repeats"), f"must be a whole number of at least 1, got {repeats!r}")
    if _setting(cfg, "on_bad_file", "error") not in ("error", "skip"):
        raise JobError(field("on_bad_file"), "must be 'error' or 'skip'")
    if _setting(cfg, "frame_sampling", "auto") not in STRATEGIES:
        raise JobError(field("frame_sampling"), f"must be one of {', '.join(STRATEGIES)}")
    do_i2v = _setting(cfg, "do_i2v", False)
    if not isinstance(do_i2v, bool):
        raise JobError(field("do_i2v"), f"must be true or false, got {do_i2v!r}")
    if do_i2v and not getattr(family, "supports_i2v", False):
        raise JobError(field("do_i2v"), f"the {family.name or 'chosen'} family has no first-frame (image) "
                                        "conditioning; remove do_i2v or use an image-to-video family")


def _flatten(datasets) -> list:
    if isinstance(datasets, MediaItem) or not isinstance(datasets, (list, tuple)):
        return [datasets]
    out = []
    for entry in datasets:
        out.extend(_flatten(entry) if isinstance(entry, (list, tuple)) else [entry])
    return out


def _check_item_for_family(item: MediaItem, family) -> None:
    name = item.name
    if item.kind == "video" and not family.video:
        raise DatasetError(name, f"this is a clip, but the {family.name or 'chosen'} family trains on still images")
    frames = item.num_frames if item.kind == "video" else 1
    if not family.valid_num_frames(frames):
        what = "a still image (1 frame)" if item.kind == "image" else f"a clip of {frames} frames"
        raise DatasetError(name, f"is {what}; the {family.name or 'chosen'} family needs {family.num_frames_rule()}")


def scan_datasets(datasets, family, *, log: Callable[[str], None] = print) -> list[MediaItem]:
    """Validate every dataset setting and check every file, without loading any model.

    `datasets` as for `TrainingSet.build` (MediaItems pass through, checked against the family); `family` may
    be the ModelFamily class. Raises JobError / DatasetError naming the field or file.
    """
    items: list[MediaItem] = []
    config_index = 0
    for entry in _flatten(datasets):
        if isinstance(entry, MediaItem):
            items.append(entry)
            continue
        validate_dataset_config(entry, config_index, family)
        scanned = scan_folder(entry, family, dataset_index=config_index, log=log)
        if _setting(entry, "do_i2v", False):
            for item in scanned:
                item.extra["do_i2v"] = True
        items.extend(scanned)
        config_index += 1
    if not items:
        raise DatasetError("datasets", "no datasets given: add at least one folder or image batch")
    for item in items:
        _check_item_for_family(item, family)
    return items


class TrainingSet:
    def __init__(self, samples: list[Sample], conds: dict[str, dict[str, torch.Tensor]], seed: int):
        self.samples = samples
        self.conds = conds
        self.seed = seed

    # ---- building ----
    @classmethod
    def build(cls, datasets, family, *, seed: int, log: Callable[[str], None] = print,
              cache_dir: str | Path | None = None) -> "TrainingSet":
        """Scan, bucket and encode everything once.

        `datasets`: a list of DatasetConfig (or dicts with its keys) and/or MediaItems (`items_from_tensors`,
        or `scan_datasets`' result, which is not scanned again), nested lists allowed. `family`: a loaded
        ModelFamily. `cache_dir`: where disk-cached latents go instead
        of ``<folder>/.phase_trainer_cache/`` (e.g. for read-only dataset folders); it also turns the disk
        cache on for in-memory items. Raises JobError / DatasetError before encoding anything.
        """
        items = scan_datasets(datasets, family, log=log)
        samples = _plan_samples(items, family)
        captions = [s.item.caption for s in samples]
        if any(s.item.caption_dropout_rate > 0 for s in samples):
            captions.append("")
        started = time.perf_counter()
        conds = encode_captions(family, captions)
        _check_cond_shapes(conds, family)
        log(f"encoded {len(conds)} distinct caption(s) in {time.perf_counter() - started:.1f}s")

        samples = _encode_latents(samples, family, log, Path(cache_dir) if cache_dir is not None else None)
        if not samples:
            raise DatasetError("datasets", "no usable media left after skipping bad files")
        return cls(samples, conds, seed)

    # ---- using ----
    def __len__(self) -> int:
        return len(self.samples)

    def epoch_batches(self, epoch: int, batch_size: int, seed: int) -> list[list[int]]:
        """Sample indices for one epoch, grouped into same-shape batches; a pure function of (seed, epoch).

        Each sample appears `num_repeats` times. Order: shuffle, group by latent shape in shuffled order,
        cut each group into batches of `batch_size` (the remainder is a smaller batch), shuffle the batches.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        rng = np.random.default_rng([int(seed) % 2**64, int(epoch) % 2**64])
        order = [i for i, sample in enumerate(self.samples) for _ in range(sample.item.num_repeats)]
        order = [order[j] for j in rng.permutation(len(order))]
        groups: dict[tuple, list[int]] = {}
        for index in order:
            groups.setdefault(tuple(self.samples[index].latent.shape), []).append(index)
        batches = [group[k : k + batch_size] for group in groups.values() for k in range(0, len(group), batch_size)]
        return [batches[j] for j in rng.permutation(len(batches))]

    def collate(self, indices: list[int], generator: torch.Generator | None) -> dict:
        """``{"latents": [B, ...], "cond": {key: [B, ...]}, "captions": [...]}`` with caption dropout drawn
        from `generator` (one draw per sample). ``generator=None`` means no dropout (evaluation)."""
        samples = [self.samples[i] for i in indices]
        captions = [s.item.caption for s in samples]
        if generator is not None:
            captions = apply_dropout(captions, [s.item.caption_dropout_rate for s in samples], generator)
        latents = torch.stack([s.latent for s in samples])
        keys = self.conds[captions[0]].keys()
        cond = {key: torch.stack([self.conds[c][key] for c in captions]) for key in keys}
        item_keys = samples[0].cond.keys()
        if any(s.cond.keys() != item_keys for s in samples) or set(item_keys) & set(keys):
            raise RuntimeError(f"per-item conditioning {sorted(item_keys)} differs within a batch or collides with "
                               f"the caption conditioning {sorted(keys)}")
        for key in item_keys:
            cond[key] = torch.stack([s.cond[key] for s in samples])
        return {"latents": latents, "cond": cond, "captions": captions}

    def summary(self) -> dict:
        """Counts for the exported file's metadata (JSON-serializable)."""
        items = list({id(s.item): s.item for s in self.samples}.values())
        return {
            "folders": sorted({i.source for i in items if i.path is not None}),
            "images": sum(1 for i in items if i.kind == "image"),
            "videos": sum(1 for i in items if i.kind == "video"),
            "in_memory_items": sum(1 for i in items if i.path is None),
            "samples": len(self.samples),
            "samples_per_epoch": sum(s.item.num_repeats for s in self.samples),
            "buckets": dict(sorted(Counter(s.shape_key for s in self.samples).items())),
            "distinct_captions": len({i.caption for i in items}),
        }


def _plan_samples(items: list[MediaItem], family) -> list[Sample]:
    samples = []
    for item in items:
        if item.kind == "video":
            indices = tuple(sample_indices(item.frame_count, item.num_frames))
        else:
            indices = (0,)
        for resolution in item.resolutions:
            try:
                bucket = bucket_size(item.width, item.height, resolution, family.resolution_factor)
            except ValueError as exc:
                raise DatasetError(item.name, str(exc)) from exc
            samples.append(Sample(item, resolution, bucket, indices))
    return samples


def _check_cond_shapes(conds: dict, family) -> None:
    shapes = {caption: {k: tuple(v.shape) for k, v in cond.items()} for caption, cond in conds.items()}
    if len({tuple(sorted(s.items())) for s in shapes.values()}) > 1:
        raise RuntimeError(f"{type(family).__name__}.encode_prompts returned differently shaped conditioning for "
                           "different captions; batches need one shape (pad to a fixed length)")


def _disk_cache_for(item: MediaItem, cache_dir: Path | None, caches: dict, log) -> DiskLatentCache | None:
    if item.path is not None and item.cache_to_disk:
        directory = cache_dir or item.path.parent / CACHE_DIRNAME
    elif item.path is None and cache_dir is not None:
        directory = cache_dir
    else:
        return None
    if directory not in caches:
        caches[directory] = DiskLatentCache(directory, log)
    return caches[directory]


def _encode_kwargs(item: MediaItem, family) -> dict:
    """What `encode_pixels` is told about the item: only families with switchable I2V get the flag."""
    return {"i2v": bool(item.extra.get("do_i2v", False))} if getattr(family, "supports_i2v", False) else {}


def _derived_key(key: str, suffix: str) -> str:
    return hashlib.sha256(f"{key}|{suffix}".encode()).hexdigest()


def _entry_key(key: str, name: str) -> str:
    """The disk key of a per-item conditioning entry (its own namespace: names are the family's choice)."""
    return _derived_key(key, f"entry:{name}")


def _split_encoded(encoded, family) -> tuple[torch.Tensor, dict]:
    """encode_pixels' result for one item ([1, ...] or a dict of them) -> (latent, {cond key: tensor}) on CPU."""
    if not isinstance(encoded, dict):
        return encoded[0].detach().to("cpu"), {}
    expected = set(getattr(family, "item_cond_keys", ()))
    if "latents" not in encoded or set(encoded) - {"latents"} != expected:
        raise RuntimeError(f"{type(family).__name__}.encode_pixels returned {sorted(encoded)}; expected 'latents' "
                           f"and its item_cond_keys {sorted(expected)}")
    cond = {k: v[0].detach().to("cpu") for k, v in encoded.items() if k != "latents"}
    return encoded["latents"][0].detach().to("cpu"), cond


def _load_cached(disk: DiskLatentCache, key: str, family) -> tuple[torch.Tensor | None, dict]:
    """The latent and every per-item conditioning entry from disk, or (None, {}) unless all are there."""
    latent = disk.load(key)
    cond = {}
    for name in getattr(family, "item_cond_keys", ()):
        if latent is None:
            break
        cond[name] = disk.load(_entry_key(key, name))
        if cond[name] is None:
            latent = None
    return (latent, cond) if latent is not None else (None, {})


def _encode_latents(samples: list[Sample], family, log, cache_dir: Path | None) -> list[Sample]:
    """Fill `sample.latent` for every sample: memory, then disk, then the VAE. Returns the samples kept."""
    by_item: dict[int, list[Sample]] = {}
    for sample in samples:
        by_item.setdefault(id(sample.item), []).append(sample)
    caches: dict[Path, DiskLatentCache] = {}
    kept: list[Sample] = []
    encoded = from_disk = 0
    started = last_report = time.perf_counter()
    log(f"caching latents: {len(samples)} sample(s) from {len(by_item)} media item(s)")
    for done, item_samples in enumerate(by_item.values(), start=1):
        item = item_samples[0].item
        disk = _disk_cache_for(item, cache_dir, caches, log)
        keys: dict[int, str] = {}
        if disk is not None:
            content = file_sha256(item.path) if item.path is not None else tensor_sha256(item.pixels)
            kwargs = _encode_kwargs(item, family)
            for sample in item_samples:
                key = latent_cache_key(content, bucket=sample.bucket, frame_indices=list(sample.frame_indices),
                                       num_frames=len(sample.frame_indices), family=family)
                # the I2V flag changes what is encoded; keys without it stay as they were
                keys[id(sample)] = _derived_key(key, "do_i2v") if kwargs.get("i2v") else key
                sample.latent, sample.cond = _load_cached(disk, keys[id(sample)], family)
                from_disk += sample.latent is not None
        missing_buckets = list(dict.fromkeys(s.bucket for s in item_samples if s.latent is None))
        if missing_buckets:
            try:
                pixels = load_pixels(item, list(item_samples[0].frame_indices), missing_buckets)
            except DatasetError as exc:
                if item.on_bad_file != "skip":
                    raise
                log(f"warning: skipping {exc}")
                continue
            for bucket, bucket_pixels in zip(missing_buckets, pixels):
                with torch.no_grad():
                    latent, cond = _split_encoded(family.encode_pixels(bucket_pixels[None],
                                                                       **_encode_kwargs(item, family)), family)
                encoded += 1
                for sample in item_samples:
                    if sample.bucket == bucket and sample.latent is None:
                        sample.latent, sample.cond = latent, cond
                        if disk is not None:
                            meta = {"source": item.name, "bucket": sample.shape_key,
                                    "family": str(getattr(family, "name", ""))}
                            # entries first, latent last: a latent on disk means its entries are there too
                            for name, tensor in cond.items():
                                disk.save(_entry_key(keys[id(sample)], name), tensor, {**meta, "entry": name})
                            disk.save(keys[id(sample)], latent, meta)
        kept.extend(item_samples)
        now = time.perf_counter()
        if now - last_report > 10 or done == len(by_item):
            last_report = now
            log(f"  latents {done}/{len(by_item)} media: {encoded} encoded, {from_disk} from disk "
                f"({now - started:.1f}s)")
    return kept
