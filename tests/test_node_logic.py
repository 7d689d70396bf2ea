"""The node layer's logic without ComfyUI (trainer.comfy_bridge): names and folders, datasets from folders and
IMAGE batches, network and schedule values, the job the nodes build, live metrics batching, the outputs, job
export, and the Train node's whole run (train, cancel, resume) on a tiny real model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures_models import tiny_sd15_path, tiny_wan22_14b_path  # noqa: F401  (fixtures)
from tests.media import write_caption, write_image, write_video
from trainer import comfy_bridge as cb
from trainer.data.sources import scan_folder
from trainer.errors import DatasetError, InterruptedTraining, JobError
from trainer.job import job_to_dict, load_job, parse_job
from trainer.metrics import COLUMNS, metrics_payload, read_records

# ---------------------------------------------------------------------------------------------- names, folders


@pytest.mark.parametrize("bad", ["../x", "a/b", "a\\b", "", "..", " ", "x" * 200, None, ".hidden"])
def test_check_name_rejects_paths_and_junk(bad):
    with pytest.raises(JobError) as e:
        cb.check_name(bad, "job_name")
    assert e.value.field == "job_name"


def test_check_name_accepts_plain_names_and_strips_spaces():
    assert cb.check_name(" my_lora-v1.2 ", "job_name") == "my_lora-v1.2"


def test_resolve_input_folder_choice_typed_and_escapes(tmp_path):
    inp = tmp_path / "input"
    (inp / "faces" / "set1").mkdir(parents=True)
    assert cb.resolve_input_folder("faces/set1", "", inp, "folder") == inp / "faces" / "set1"
    typed = tmp_path / "elsewhere"
    assert cb.resolve_input_folder("faces", str(typed), inp, "folder") == typed  # typed path wins
    for choice in ("../outside", "/etc", "faces/../../x"):
        with pytest.raises(JobError, match="input folder"):
            cb.resolve_input_folder(choice, "", inp, "folder")
    with pytest.raises(JobError, match="not an absolute path"):
        cb.resolve_input_folder("faces", "relative/dir", inp, "folder")
    with pytest.raises(JobError, match="no folder"):
        cb.resolve_input_folder(cb.TYPED_PATH, "  ", inp, "folder")
    (inp / "link").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(JobError, match="outside"):
        cb.resolve_input_folder("link", "", inp, "folder")


def test_input_subfolders_lists_nested_visible_folders_to_a_depth(tmp_path):
    for sub in ("a", "a/b", "a/b/c", "a/b/c/d", ".cache", "a/.git", "z"):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
    (tmp_path / "file.png").write_bytes(b"x")
    assert cb.input_subfolders(tmp_path) == ["a", "a/b", "a/b/c", "z"]
    assert cb.input_subfolders(tmp_path / "missing") == []


def test_diffusers_folders_finds_pipelines_not_their_components(tmp_path):
    root1, root2 = tmp_path / "d1", tmp_path / "d2"
    for folder in (root1 / "sd15", root1 / "org" / "wan", root2 / "other"):
        (folder / "unet").mkdir(parents=True)
        (folder / "model_index.json").write_text("{}")
        (folder / "unet" / "model_index.json").write_text("{}")  # never listed: inside a pipeline
    (root1 / "not_a_model").mkdir()
    (root1 / "org" / "loop").symlink_to(root1, target_is_directory=True)  # a link cycle ends at the depth limit
    assert cb.diffusers_folders([root1, root2, tmp_path / "missing"]) == [
        "org/loop/org/wan", "org/loop/sd15", "org/wan", "other", "sd15"]
    assert cb.resolve_model_path("org/wan", "", [root1, root2]) == str(root1 / "org" / "wan")
    assert cb.resolve_model_path("other", "", [root1, root2]) == str(root2 / "other")
    assert cb.resolve_model_path("sd15", "org/hub-model", [root1]) == "org/hub-model"
    with pytest.raises(JobError, match="not a diffusers folder"):
        cb.resolve_model_path("not_a_model", "", [root1])
    with pytest.raises(JobError, match="without '..'"):
        cb.resolve_model_path("../d2/other", "", [root1])


def test_next_free_path_counts_up_and_never_overwrites(tmp_path):
    first = cb.next_free_path(tmp_path, "style")
    assert first.name == "style_00001.safetensors"
    first.write_bytes(b"1")
    (tmp_path / "style_00004.safetensors").write_bytes(b"4")  # a gap: the next is after the highest
    (tmp_path / "style_00007_step12.safetensors").write_bytes(b"p")  # a partial LoRA of a cancelled run
    (tmp_path / "style_extra_00009.safetensors").write_bytes(b"x")  # another name
    (tmp_path / "stylish_00020.safetensors").write_bytes(b"x")
    nxt = cb.next_free_path(tmp_path, "style")
    assert nxt.name == "style_00008.safetensors" and not nxt.exists()
    assert cb.next_free_path(tmp_path / "new", "style").name == "style_00001.safetensors"
    assert cb.next_free_path(tmp_path, "job", ".yaml").name == "job_00001.yaml"
    with pytest.raises(JobError):
        cb.next_free_path(tmp_path, "../escape")


def test_folder_fingerprint_follows_content(tmp_path):
    write_image(tmp_path / "a.png")
    f1 = cb.folder_fingerprint(tmp_path)
    assert cb.folder_fingerprint(tmp_path) == f1
    write_caption(tmp_path / "a.png", "a caption")
    f2 = cb.folder_fingerprint(tmp_path)
    assert f2 != f1
    os.utime(tmp_path / "a.txt", ns=(1, 1))
    assert cb.folder_fingerprint(tmp_path) != f2
    assert cb.folder_fingerprint(tmp_path / "missing").startswith("unreadable")


# ---------------------------------------------------------------------------------------------- text inputs


def test_parse_resolutions():
    assert cb.parse_resolutions("512", "r") == [512]
    assert cb.parse_resolutions("512, 768\n1024", "r") == [512, 768, 1024]
    assert cb.parse_resolutions(256, "r") == [256]
    assert cb.parse_resolutions("", "r", allow_empty=True) is None
    for bad in ("", "abc", "512, -3", "0", "51.2"):
        with pytest.raises(JobError) as e:
            cb.parse_resolutions(bad, "resolution")
        assert e.value.field == "resolution"


def test_split_captions_per_image_or_one_for_all():
    assert cb.split_captions("a cat\n\n a dog \n", 2, False) == ["a cat", "a dog"]
    assert cb.split_captions("one for all", 5, False) == "one for all"
    assert cb.split_captions("", 3, False) == ""
    assert cb.split_captions("line one\nline two", 3, True) == "line one line two"
    with pytest.raises(DatasetError, match="2 caption lines for 3 images"):
        cb.split_captions("a\nb", 3, False)


# ---------------------------------------------------------------------------------------------- datasets


def test_folder_dataset_scans_now_and_names_bad_files(tmp_path):
    good = tmp_path / "good"
    for i in range(3):
        write_caption(write_image(good / f"{i}.png", seed=i), f"image {i}")
    cfg = cb.dataset_config(good, trigger_word=" ohwx ", resolution="32, 48", caption_ext=".txt")
    assert cfg["trigger_word"] == "ohwx" and cfg["resolution"] == [32, 48] and cfg["caption_ext"] == "txt"
    ds = cb.folder_dataset(cfg, video=False, log=lambda m: None)
    assert ds.configs == (cfg,) and ds.items == () and "3 images" in ds.describe()
    parse_job({"job": "j", "model": {"family": "sd15", "path": "/m"}, "datasets": [cfg]})  # a valid job entry

    with pytest.raises(DatasetError, match="does not exist"):
        cb.folder_dataset(cb.dataset_config(tmp_path / "missing"), video=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no images"):
        cb.folder_dataset(cb.dataset_config(empty), video=False)
    bad = tmp_path / "bad"
    write_image(bad / "ok.png")
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DatasetError) as e:
        cb.folder_dataset(cb.dataset_config(bad), video=False)
    assert e.value.path.endswith("broken.png")
    skipped = cb.folder_dataset(cb.dataset_config(bad, on_bad_file="skip"), video=False, log=lambda m: None)
    assert "1 image" in skipped.describe()


def test_image_folder_rejects_videos_video_folder_takes_them(tmp_path):
    folder = tmp_path / "mixed"
    write_image(folder / "still.png")
    write_video(folder / "clip.mp4", num_frames=9)
    with pytest.raises(DatasetError, match="Video Folder Dataset"):
        cb.folder_dataset(cb.dataset_config(folder), video=False)
    ds = cb.folder_dataset(cb.dataset_config(folder, num_frames=5), video=True)
    assert "1 image" in ds.describe() and "1 video" in ds.describe()


def test_images_dataset_separate_images_and_one_clip():
    images = torch.rand(3, 40, 56, 3)
    ds = cb.images_dataset(images, "red\ngreen\nblue", as_video=False, trigger_word="ohwx")
    assert [i.caption for i in ds.items] == ["ohwx, red", "ohwx, green", "ohwx, blue"]
    assert all(i.kind == "image" and i.resolutions == (None,) for i in ds.items)
    assert torch.equal(ds.items[1].pixels[0], images[1])
    clip = cb.images_dataset(images, "a clip", as_video=True, resolution="32", num_repeats=4)
    (item,) = clip.items
    assert item.kind == "video" and item.num_frames == 3 and item.resolutions == (32,) and item.num_repeats == 4
    assert "1 clip of 3 frames at 56x40" in clip.describe()
    with pytest.raises(DatasetError, match="2 caption lines for 3 images"):
        cb.images_dataset(images, "a\nb", as_video=False)


def test_merge_datasets_concatenates_in_order(tmp_path):
    a = cb.Dataset(configs=({"folder_path": "/a"},), summaries=("a",))
    b = cb.images_dataset(torch.rand(2, 16, 16, 3), "x", as_video=False)
    c = cb.Dataset(configs=({"folder_path": "/c"},), summaries=("c",))
    m = cb.merge_datasets(a, b, None, c)
    assert [x["folder_path"] for x in m.configs] == ["/a", "/c"]
    assert m.items == b.items and m.summaries == ("a", b.summaries[0], "c")
    assert cb.merge_datasets().empty


def test_trainable_items_copies_inference_tensors_without_touching_the_input():
    with torch.inference_mode():
        ds = cb.images_dataset(torch.rand(2, 16, 16, 3), "x", as_video=False)
    assert ds.items[0].pixels.is_inference()
    items = cb.trainable_items(ds)
    assert not any(i.pixels.is_inference() for i in items)
    assert ds.items[0].pixels.is_inference()  # the (cached) node output is unchanged
    assert torch.equal(items[0].pixels, ds.items[0].pixels)


# ---------------------------------------------------------------------------------------------- network, schedule


def test_network_config_lists_and_zero_ranks():
    net = cb.network_config(linear=8, linear_alpha=4, conv=0, only_if_contains="attn, ff\nproj",
                            ignore_if_contains="")
    assert net["only_if_contains"] == ["attn", "ff", "proj"] and net["ignore_if_contains"] == []
    with pytest.raises(JobError, match="both 0"):
        cb.network_config(linear=0, linear_alpha=1, conv=0)


def _exit(**over):
    base = dict(loss_improvement_rate_below=0.002, min_gradient_stability=0.5, min_loss_r2=0.05, max_loss_cv=0.4,
                r2_gate=True)
    base.update(over)
    return cb.exit_criteria(**base)


def test_alpha_phase_chain_in_order_with_checks():
    s1 = cb.alpha_phase(None, name="foundation", alpha=8, group="auto", min_steps=100, exit=_exit())
    s2 = cb.alpha_phase(s1, name="balance", alpha=14, group="auto", min_steps=200, exit=_exit(), ramp_steps=5)
    assert [p["name"] for p in s2["phases"]] == ["foundation", "balance"] and s2["ramp_steps"] == 5
    assert [p["name"] for p in s1["phases"]] == ["foundation"]  # the earlier node's value is not mutated
    with pytest.raises(JobError, match="already earlier"):
        cb.alpha_phase(s2, name="foundation", alpha=1, group="auto", min_steps=1, exit=_exit())
    with pytest.raises(JobError, match="same module group"):
        cb.alpha_phase(s2, name="emphasis", alpha=20, group="linear", min_steps=1, exit=_exit())
    with pytest.raises(JobError):
        cb.alpha_phase(None, name="bad/name", alpha=1, group="auto", min_steps=1, exit=_exit())
    with pytest.raises(JobError, match="> 0"):
        cb.alpha_phase(None, name="zero", alpha=0, group="auto", min_steps=1, exit=_exit())


def test_schedule_groups_resolve_by_family_and_parse():
    from trainer.families import get_family

    sd15, wan = get_family("sd15"), get_family("wan21")
    sched = cb.alpha_phase(cb.alpha_phase(None, name="a", alpha=4, group="auto", min_steps=10, exit=_exit()),
                           name="b", alpha=12, group="auto", min_steps=20, exit=_exit(r2_gate=False))
    assert set(cb.schedule_mapping(sched, sd15, conv_rank=4)) >= {"conv_alpha_phases"}
    assert "linear_alpha_phases" in cb.schedule_mapping(sched, sd15, conv_rank=0)
    assert "linear_alpha_phases" in cb.schedule_mapping(sched, wan, conv_rank=0)
    both = cb.preset_schedule("video", group="both", min_steps=(1, 2, 3))
    m = cb.schedule_mapping(both, sd15, conv_rank=4)
    assert list(m["conv_alpha_phases"]) == list(m["linear_alpha_phases"]) == ["foundation", "balance", "emphasis"]

    mapping = {"job": "j", "model": {"family": "sd15", "path": "/m"}, "datasets": [{"folder_path": "/d"}],
               "network": {"linear": 4, "conv": 4, "alpha_schedule": cb.schedule_mapping(sched, sd15, 4)}}
    phases = parse_job(mapping).network.alpha_schedule.phases
    assert [(p.name, p.alphas, p.min_steps) for p in phases] == [("a", {"conv": 4.0}, 10), ("b", {"conv": 12.0}, 20)]
    assert phases[0].exit.r2_gate and not phases[1].exit.r2_gate and phases[0].exit.max_loss_cv == 0.4


def test_preset_schedule_is_the_seeds():
    from trainer.job import PRESET_EXITS

    s = cb.preset_schedule("image", alphas=(8, 14, 20), min_steps=(2000, 3000, 2000))
    assert [(p["name"], p["alpha"], p["min_steps"]) for p in s["phases"]] == [
        ("foundation", 8.0, 2000), ("balance", 14.0, 3000), ("emphasis", 20.0, 2000)]
    crit = PRESET_EXITS["image"]
    assert s["phases"][0]["exit_criteria"]["min_gradient_stability"] == crit.min_gradient_stability
    with pytest.raises(JobError):
        cb.preset_schedule("audio")
    with pytest.raises(JobError):
        cb.preset_schedule("video", alphas=(8, -1, 20))


# ---------------------------------------------------------------------------------------------- the job


def _mapping(tmp_path, dataset=None, **over):
    kw = dict(job_name="node_job", model={"family": "sd15", "path": str(tmp_path / "model"), "dtype": "fp32"},
              dataset=dataset or cb.Dataset(configs=(cb.dataset_config(tmp_path / "data", resolution="32"),)),
              network=cb.network_config(linear=4, linear_alpha=4, conv=4, conv_alpha=8),
              schedule=cb.preset_schedule("video", min_steps=(5, 5, 5)),
              train={"steps": 12, "lr": 1e-3, "batch_size": 2, "seed": 3}, output_dir=tmp_path / "out",
              resume=False, save_every=5)
    kw.update(over)
    return cb.build_job_mapping(**kw)


def test_build_job_mapping_parses_into_the_job_the_nodes_describe(tmp_path):
    job = cb.parse_node_job(_mapping(tmp_path))
    assert job.job == "node_job" and job.output_dir == str(tmp_path / "out")
    assert job.datasets[0].resolution == [32] and job.network.conv == 4
    assert [p.alphas for p in job.network.alpha_schedule.phases] == [{"conv": 8.0}, {"conv": 14.0}, {"conv": 20.0}]
    assert job.save.resume is None and job.save.every == 5 and job.train.steps == 12
    assert cb.parse_node_job(_mapping(tmp_path, resume=True)).save.resume == "latest"
    assert job_to_dict(cb.parse_node_job(_mapping(tmp_path, schedule=None)))["network"].get("alpha_schedule") is None


def test_job_errors_name_the_node_that_owns_the_setting(tmp_path):
    with pytest.raises(JobError) as e:
        cb.parse_node_job(_mapping(tmp_path, dataset=cb.Dataset(configs=(
            cb.dataset_config(tmp_path / "data", resolution="30"),))))
    assert e.value.field == "datasets[0].resolution" and "the dataset nodes" in str(e.value)
    with pytest.raises(JobError) as e:
        cb.parse_node_job(_mapping(tmp_path, network=cb.network_config(linear=4, linear_alpha=4, conv=0),
                                   schedule=cb.preset_schedule("video", group="conv")))
    assert e.value.field.startswith("network.alpha_schedule") and "Alpha Phase" in str(e.value)
    with pytest.raises(JobError) as e:
        cb.parse_node_job(_mapping(tmp_path, train={"steps": 10, "warmup_steps": 10}))
    assert e.value.field == "train.warmup_steps" and "this node" in str(e.value)
    with pytest.raises(JobError, match="connect a dataset"):
        _mapping(tmp_path, dataset=cb.Dataset())
    with pytest.raises(JobError) as e:
        _mapping(tmp_path, job_name="../../etc")
    assert e.value.field == "job_name"
    assert cb.field_owner("model.path") == "the Load Training Model node"
    assert cb.field_owner("modelx") is None


# ---------------------------------------------------------------------------------------------- metrics


def _records(n, phase_at=(), start=1):
    recs, phase = [], 0
    for step in range(start, start + n):
        event = None
        if step in phase_at:
            phase += 1
            event = "transition"
        recs.append({"step": step, "timestamp": None, "loss": 1.0 / step, "loss_slope": None, "loss_r2": None,
                     "loss_cv": None, "loss_samples": step, "gradient_stability": 0.5,
                     "gradient_stability_avg": 0.5, "grad_norm": 1.0, "lr": 1e-3, "phase": f"p{phase}",
                     "phase_idx": phase, "steps_in_phase": 0, "linear_alpha": 4.0, "conv_alpha": 8.0 + phase,
                     "expert": None, "event": event, "event_detail": {"to_phase": f"p{phase}"} if event else None})
    return recs


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_live_metrics_throttles_batches_and_accumulates_phases():
    clock, sent = _Clock(), []
    live = cb.LiveMetrics("7", ["p0", "p1", "p2"], sent.append, job="j", min_interval_s=0.25, clock=clock)
    records = _records(100, phase_at=(40, 80))
    for rec in records:
        live.add(rec)
        clock.t += 0.01  # 100 steps a second
    live.flush(done=True)
    # the first step goes out at once, then one message per 0.25 s, then the closing one
    assert 4 <= len(sent) <= 6, len(sent)
    assert [m["reset"] for m in sent] == [True] + [False] * (len(sent) - 1)
    assert [m["done"] for m in sent] == [False] * (len(sent) - 1) + [True]
    assert all(m["node"] == "7" and m["columns"] == list(COLUMNS) and m["job"] == "j" for m in sent)
    rows = [r for m in sent for r in m["rows"]]
    assert rows == metrics_payload(records, ["p0", "p1", "p2"])["rows"]  # every row once, in order
    assert [(p["name"], p["start_step"]) for p in sent[-1]["phases"]] == [("p0", 1), ("p1", 40), ("p2", 80)]
    assert [e["step"] for m in sent for e in m["events"]] == [40, 80]
    assert live.sent_rows == 100 and live.sent_messages == len(sent)
    assert live.flush() is None  # nothing pending, not done: no message


def test_live_metrics_first_message_of_a_resumed_run_carries_the_history():
    sent, history = [], _records(30)
    live = cb.LiveMetrics("3", [], sent.append, min_interval_s=0.0, history=lambda step: history[:step])
    live.add(_records(1, start=21)[0])
    assert sent[0]["reset"] and [r[0] for r in sent[0]["rows"]] == list(range(1, 22))
    live.add(_records(1, start=22)[0])
    assert [r[0] for r in sent[1]["rows"]] == [22]


def test_metrics_output_loss_map_and_plot_image():
    from trainer.plot import render_png

    records = _records(50, phase_at=(25,))
    out = cb.metrics_output(records, ["warm", "hot"], "j")
    assert out["tensor"].shape == (50, len(COLUMNS)) and out["columns"] == list(COLUMNS)
    assert [(p["name"], p["start_step"]) for p in out["phases"]] == [("warm", 1), ("hot", 25)]
    payload = cb.payload_from_metrics(out)
    assert payload["job"] == "j" and len(payload["rows"]) == 50 and payload["phases"][1]["name"] == "hot"
    with pytest.raises(Exception, match="columns"):
        cb.payload_from_metrics({**out, "columns": ["step"]})
    lm = cb.loss_map(records + [{**records[0], "step": 51, "loss": None}, {**records[0], "step": 52,
                                                                         "loss": float("nan")}])
    assert lm == {"loss": [r["loss"] for r in records]}
    image = cb.png_to_image(render_png(out["tensor"].numpy(), payload["phases"], "t", width=400, height=300))
    assert image.shape == (1, 300, 400, 3) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0 and float(image.std()) > 0.05


# ---------------------------------------------------------------------------------------------- export


def test_export_items_writes_folders_the_job_file_can_train_on(tmp_path):
    images = torch.rand(2, 24, 40, 3)
    clip = torch.rand(5, 32, 32, 3)
    items = (cb.images_dataset(images, "ohwx red\nohwx blue", as_video=False).items
             + cb.images_dataset(clip, "a clip", as_video=True, resolution="32", num_repeats=2).items)
    entries = cb.export_items(items, tmp_path / "datasets", size_step=8)
    assert [Path(e["folder_path"]).name for e in entries] == ["images_1", "clips_2"]
    assert entries[0]["resolution"] == [40] and entries[1]["resolution"] == [32]
    assert entries[1]["num_frames"] == 5 and entries[1]["num_repeats"] == 2

    class Fam:
        name, resolution_factor, video = "x", 8, True

    scanned = scan_folder(entries[0], Fam)
    assert [i.caption for i in scanned] == ["ohwx red", "ohwx blue"]
    png = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(scanned[1].path).convert("RGB"))
    assert np.abs(png.astype(int) - (images[1] * 255).round().numpy().astype(int)).max() == 0  # lossless
    (vid,) = scan_folder({**entries[1], "num_frames": 5}, Fam)
    assert vid.kind == "video" and vid.frame_count == 5 and vid.caption == "a clip"
    with pytest.raises(DatasetError, match="already exists"):
        cb.write_items_as_folder(items[:1], Path(entries[0]["folder_path"]))
    assert not list((tmp_path / "datasets").glob(".*tmp*"))  # no temporary folder left

    job_file = tmp_path / "job.yaml"
    mapping = _mapping(tmp_path)
    mapping["datasets"] = entries[:1]
    job_file.write_text(cb.job_file_text(job_to_dict(cb.parse_node_job(mapping))))
    assert job_file.read_text().startswith("# Phase Trainer job")
    job = load_job(job_file)
    assert job.datasets[0].folder_path == entries[0]["folder_path"] and job.job == "node_job"


# ---------------------------------------------------------------------------------------------- the Train node's run


def _shapes(folder: Path, n: int = 4) -> Path:
    colors = [(220, 40, 40), (40, 180, 60), (40, 70, 220), (230, 210, 40)]
    for i in range(n):
        write_caption(write_image(folder / f"{i}.png", 32, 32, color=colors[i % 4]), f"shape {i}")
    return folder


@pytest.mark.slow
def test_train_from_nodes_runs_cancels_and_resumes(tmp_path, tiny_sd15_path):  # noqa: F811
    data = _shapes(tmp_path / "data")
    generated = cb.images_dataset(torch.rand(2, 32, 32, 3), "generated", as_video=False)
    dataset = cb.merge_datasets(cb.folder_dataset(cb.dataset_config(data, resolution="32"), video=False), generated)
    loras = tmp_path / "loras"

    def mapping(resume):
        return cb.build_job_mapping(
            job_name="nodes", model={"family": "sd15", "path": str(tiny_sd15_path), "dtype": "fp32"},
            dataset=dataset, network=cb.network_config(linear=4, linear_alpha=4, conv=4, conv_alpha=8),
            schedule=cb.preset_schedule("video", min_steps=(4, 4, 4)),
            train={"steps": 10, "lr": 1e-3, "batch_size": 2, "seed": 1}, output_dir=tmp_path / "out",
            resume=resume, save_every=4)

    sent, progress = [], []
    stop_after = {"n": 6}

    def interrupted():
        return len(progress) >= stop_after["n"]

    lora1 = cb.next_free_path(loras, "nodes")
    with pytest.raises(InterruptedTraining) as stop:
        cb.train_from_nodes(mapping(False), dataset, lora_path=lora1, node_id="5", send=sent.append,
                            progress=lambda s, t: progress.append((s, t)), interrupted=interrupted,
                            log=lambda m: None, min_interval_s=0.0)
    # Cancel seen after step 6 ends the next step, 7, with a checkpoint and the partial LoRA
    assert stop.value.step == 7 and progress[-1] == (7, 10)
    assert Path(stop.value.checkpoint_path).name == "step_00000007"
    assert Path(stop.value.lora_path).name == "nodes_00001_step7.safetensors" and not lora1.exists()
    assert sent[-1]["done"] and [r[0] for m in sent for r in m["rows"]] == list(range(1, 8))

    # a fresh run (resume off): the loop moves the cancelled run's checkpoints aside instead of mixing them
    sent.clear()
    progress.clear()
    stop_after["n"] = 3
    with pytest.raises(InterruptedTraining):
        cb.train_from_nodes(mapping(False), dataset, lora_path=cb.next_free_path(loras, "nodes"), node_id="5",
                            send=sent.append, progress=lambda s, t: progress.append((s, t)),
                            interrupted=interrupted, log=lambda m: None, min_interval_s=0.0)
    assert (tmp_path / "out" / "checkpoints.1" / "step_00000007").is_dir()
    assert progress[0] == (1, 10)

    # resume continues from the last checkpoint (step 4) to the end
    sent.clear()
    progress.clear()
    stop_after["n"] = 10**9
    lora2 = cb.next_free_path(loras, "nodes")
    assert lora2.name == "nodes_00003.safetensors"  # above both cancelled runs' partial LoRAs
    run = cb.train_from_nodes(mapping(True), dataset, lora_path=lora2, node_id="5", send=sent.append,
                              progress=lambda s, t: progress.append((s, t)), interrupted=interrupted,
                              log=lambda m: None, min_interval_s=0.0)
    assert progress[0] == (5, 10) and progress[-1] == (10, 10) and run.step == 10
    assert sent[0]["reset"] and [r[0] for r in sent[0]["rows"]] == [1, 2, 3, 4, 5]  # history, then step 5
    assert [r[0] for m in sent for r in m["rows"]] == list(range(1, 11)) and sent[-1]["done"]
    assert "resume" in [e["event"] for m in sent for e in m["events"]]
    assert [r["step"] for r in read_records(run.job.metrics_path)] == list(range(1, 11))

    assert run.lora_path == lora2 and lora2.is_file()
    on_disk = load_file(str(lora2))
    assert sorted(on_disk) == sorted(run.lora_state)
    assert all(torch.equal(on_disk[k].float(), run.lora_state[k].float()) for k in on_disk)
    assert run.metrics["tensor"].shape == (10, len(COLUMNS)) and len(run.loss_map["loss"]) == 10
    assert run.payload["job"] == "nodes" and len(run.payload["rows"]) == 10
    assert run.payload["phases"][0]["name"] == "foundation"


# ---------------------------------------------------------------------------------------------- validation, experts


def test_validation_section_from_the_train_nodes_option():
    assert cb.validation_section(None) is None and cb.validation_section({"validation": "off"}) is None
    on = {"validation": "on", "every": 25, "items": 3, "patience": 4, "min_delta": 0.01, "stop_on_plateau": True}
    assert cb.validation_section(on) == {"every": 25, "items": 3, "patience": 4, "min_delta": 0.01,
                                         "stop_on_plateau": True}
    with pytest.raises(JobError) as e:
        cb.validation_section({"validation": "sometimes"})
    assert e.value.field == "validation"


def test_build_job_mapping_with_validation(tmp_path):
    section = cb.validation_section({"validation": "on", "every": 5, "items": 2, "patience": 3,
                                     "stop_on_plateau": True})
    job = cb.parse_node_job(_mapping(tmp_path, validation=section))
    v = job.validation
    assert (v.every, v.items, v.patience, v.stop_on_plateau, v.keep_best) == (5, 2, 3, True, True)
    # a preset's phases end on the validation loss (as a job file's `preset:` with a validation section) ...
    assert {p.exit.source for p in job.network.alpha_schedule.phases} == {"validation"}
    # ... not without validation, and a chain of Alpha Phase nodes keeps its own criteria
    assert {p.exit.source for p in cb.parse_node_job(_mapping(tmp_path)).network.alpha_schedule.phases} == {"train"}
    chain = cb.alpha_phase(None, name="a", alpha=4, group="auto", min_steps=5, exit=_exit())
    chain = cb.alpha_phase(chain, name="b", alpha=8, group="auto", min_steps=5, exit=_exit())
    job = cb.parse_node_job(_mapping(tmp_path, schedule=chain, validation=section))
    assert {p.exit.source for p in job.network.alpha_schedule.phases} == {"train"}
    assert cb.parse_node_job(_mapping(tmp_path)).validation is None
    with pytest.raises(JobError) as e:
        cb.parse_node_job(_mapping(tmp_path, validation={**section, "every": 0}))
    assert e.value.field == "validation.every" and "validation option" in str(e.value)


def _moe_records(n=40, block=5, high_moves_at=21):
    recs = _records(n)
    for rec in recs:
        step = rec["step"]
        rec["expert"] = ("high_noise", "low_noise")[((step - 1) // block) % 2]
        moved = rec["expert"] == "high_noise" and step >= high_moves_at
        rec["phase_idx"], rec["phase"] = (1, "p1") if moved else (0, "p0")
        rec["event"] = "transition" if step == high_moves_at else None
        rec["event_detail"] = {"expert": "high_noise", "to_phase": "p1"} if step == high_moves_at else None
    return recs


def test_expert_phases_one_list_per_expert():
    records = _moe_records()  # experts in blocks of 5 steps, high noise first; high noise moves to p1 at 21
    from trainer.metrics import records_to_tensor

    phases = cb.expert_phases(records_to_tensor(records), ["p0", "p1"])
    assert [(p["expert"], p["name"], p["phase_idx"], p["start_step"]) for p in phases] == [
        ("high_noise", "p0", 0, 1), ("low_noise", "p0", 0, 6), ("high_noise", "p1", 1, 21)]
    assert cb.expert_phases(records_to_tensor(_records(10)), ["p0"]) == []  # one denoiser: no expert lanes
    # the live messages accumulate the same phases, chunk after chunk, and the final payload agrees
    sent = []
    live = cb.LiveMetrics("1", ["p0", "p1"], sent.append, min_interval_s=0.0)
    for rec in records:
        live.add(rec)
    assert sent[-1]["phases"] == phases
    assert cb.widget_payload(records, ["p0", "p1"], "j")["phases"] == phases
    # Plot Metrics rebuilds them from PT_METRICS
    assert cb.payload_from_metrics(cb.metrics_output(records, ["p0", "p1"], "j"))["phases"] == phases


def test_metrics_output_keeps_event_details_for_plot_metrics():
    records = _records(12)
    advice = {"step": 10, "best_step": 6, "best_val_loss": 0.5, "val_loss": 0.55,
              "evaluations_without_improvement": 2, "trend": "plateau"}
    for rec in records:
        if rec["step"] % 2 == 0:
            rec["val_loss"] = 0.5 if rec["step"] == 6 else 0.6
    records[9].update(event=["suggest_stop", "checkpoint"], event_detail={"suggest_stop": advice,
                                                                         "checkpoint": {"path": "p"}})
    payload = cb.payload_from_metrics(cb.metrics_output(records, ["p0"], "j"))
    (stop,) = [e for e in payload["events"] if e["event"] == "suggest_stop"]
    assert stop["step"] == 10 and stop["detail"]["suggest_stop"]["best_step"] == 6
    assert payload["job"] == "j"


@pytest.mark.slow
def test_train_from_nodes_with_validation_stops_and_keeps_the_best(tmp_path, tiny_sd15_path):  # noqa: F811
    from trainer.plot import render_png
    from trainer.schedule.stop_advice import format_advice

    data = _shapes(tmp_path / "data")
    dataset = cb.folder_dataset(cb.dataset_config(data, resolution="32"), video=False)
    # min_delta 0.5: no evaluation after the first can be a new best, so the advice fires after `patience` more
    section = cb.validation_section({"validation": "on", "every": 2, "items": 2, "patience": 2, "min_delta": 0.5,
                                     "stop_on_plateau": True})
    mapping = cb.build_job_mapping(
        job_name="val", model={"family": "sd15", "path": str(tiny_sd15_path), "dtype": "fp32"}, dataset=dataset,
        network=cb.network_config(linear=4, linear_alpha=4), schedule=None,
        train={"steps": 20, "lr": 1e-3, "batch_size": 2, "seed": 1}, output_dir=tmp_path / "out", resume=False,
        save_every=50, validation=section)
    lines, sent = [], []
    loras = tmp_path / "loras"
    run = cb.train_from_nodes(mapping, dataset, lora_path=cb.next_free_path(loras, "val"), node_id="2",
                              send=sent.append, progress=lambda s, t: None, interrupted=lambda: False,
                              log=lines.append, min_interval_s=0.0)
    assert run.step == 6  # stop_on_plateau: evaluations at 2 (best), 4, 6 -> advice at 6, the run ends there
    assert run.stop_advice["step"] == 6 and run.stop_advice["best_step"] == 2
    assert run.lora_path == loras / "val_00001.safetensors" and run.lora_path.is_file()
    assert run.best_lora_path == loras / "val_00001_best.safetensors" and run.best_lora_path.is_file()
    assert cb.next_free_path(loras, "val").name == "val_00002.safetensors"  # the best file holds the counter too
    assert run.summary == [format_advice(run.stop_advice),
                           "best LoRA (lowest validation loss): val_00001_best.safetensors"]
    assert all(line in lines for line in run.summary) and run.payload["summary"] == run.summary
    assert run.lora_paths == {} and run.lora_low_noise == {}
    # the validation points and the advice reach the widget, live and at the end
    val_col = COLUMNS.index("val_loss")
    assert [r[0] for m in sent for r in m["rows"] if r[val_col] is not None] == [2, 4, 6]
    (stop,) = [e for e in run.payload["events"] if e["event"] == "suggest_stop"]
    assert stop["step"] == 6 and "suggest_stop" in [e["event"] for m in sent for e in m["events"]]
    # Plot Metrics: the advice's details survive in PT_METRICS, so its chart gets the best step
    payload = cb.payload_from_metrics(run.metrics)
    (stop,) = [e for e in payload["events"] if e["event"] == "suggest_stop"]
    detail = stop["detail"].get("suggest_stop", stop["detail"])
    assert detail["best_step"] == 2
    png = render_png(run.metrics["tensor"].numpy(), cb.render_phases(payload["phases"]), "val", width=300,
                     height=200, events=cb.own_details(payload["events"]))
    assert cb.png_to_image(png).shape == (1, 200, 300, 3)


@pytest.mark.slow
def test_train_from_nodes_two_experts_write_two_loras(tmp_path, tiny_wan22_14b_path):  # noqa: F811
    from tests.media import textured_frames

    data = tmp_path / "clips"
    for i in range(2):
        write_caption(write_video(data / f"c{i}.mp4", textured_frames(5, 32, 32, seed=i), num_frames=5, width=32,
                                  height=32), f"clip {i}")
    dataset = cb.folder_dataset(cb.dataset_config(data, resolution="32", num_frames=5), video=True)
    chain = cb.alpha_phase(None, name="low", alpha=4, group="auto", min_steps=1, exit=_exit())
    chain = cb.alpha_phase(chain, name="high", alpha=8, group="auto", min_steps=1, exit=_exit())
    mapping = cb.build_job_mapping(
        job_name="moe", model={"family": "wan22_14b", "path": str(tiny_wan22_14b_path), "dtype": "fp32"},
        dataset=dataset, network=cb.network_config(linear=4, linear_alpha=4), schedule=chain,
        train={"steps": 4, "lr": 1e-3, "seed": 1, "switch_boundary_every": 1}, output_dir=tmp_path / "out",
        resume=False, save_every=50, validation={"every": 1, "items": 1})
    loras = tmp_path / "loras"
    run = cb.train_from_nodes(mapping, dataset, lora_path=cb.next_free_path(loras, "moe"), node_id="2",
                              send=lambda m: None, progress=lambda s, t: None, interrupted=lambda: False,
                              log=lambda m: None, min_interval_s=0.0)
    high, low = loras / "moe_00001_high_noise.safetensors", loras / "moe_00001_low_noise.safetensors"
    assert run.lora_paths == {"high_noise": high, "low_noise": low} and run.lora_path == high
    best = {e: cb.best_path_for(p) for e, p in run.lora_paths.items()}
    assert best == {"high_noise": loras / "moe_00001_high_noise_best.safetensors",
                    "low_noise": loras / "moe_00001_low_noise_best.safetensors"}
    assert sorted(p.name for p in loras.iterdir()) == sorted([high.name, low.name] + [p.name for p in best.values()])
    assert cb.next_free_path(loras, "moe").name == "moe_00002.safetensors"
    for state, path in ((run.lora_state, high), (run.lora_low_noise, low)):
        on_disk = load_file(str(path))
        assert sorted(on_disk) == sorted(state) and all(torch.equal(on_disk[k], state[k]) for k in on_disk)
    assert any(not torch.equal(run.lora_state[k], run.lora_low_noise[k]) for k in run.lora_state
               if k.endswith("lora_up.weight"))
    assert run.summary == [f"LoRA per expert: high_noise {high.name}, low_noise {low.name}",
                           "best LoRA per expert (lowest validation loss): high_noise moe_00001_high_noise_best"
                           ".safetensors, low_noise moe_00001_low_noise_best.safetensors"]
    # each expert is validated on its own steps
    val = [(r[0], r[COLUMNS.index("expert_idx")]) for r in run.payload["rows"] if r[COLUMNS.index("val_loss")]]
    assert val == [(1, 0), (2, 1), (3, 0), (4, 1)]
    # one lane of phases per expert for the widget
    assert [(p["expert"], p["name"], p["start_step"]) for p in run.payload["phases"]] == [
        ("high_noise", "low", 1), ("low_noise", "low", 2)]


def test_own_details_render_phases_and_the_family_tooltip():
    from trainer.families import FAMILIES

    advice = {"best_step": 6}
    events = [{"step": 10, "event": "suggest_stop", "detail": {"suggest_stop": advice, "checkpoint": {"path": "p"}}},
              {"step": 10, "event": "checkpoint", "detail": {"suggest_stop": advice, "checkpoint": {"path": "p"}}},
              {"step": 12, "event": "suggest_stop", "detail": advice}, {"step": 13, "event": "resume", "detail": None}]
    assert [e["detail"] for e in cb.own_details(events)] == [advice, {"path": "p"}, advice, None]
    phases = cb.widget_payload(_moe_records(), ["p0", "p1"])["phases"]
    assert [(p["name"], p["start_step"]) for p in cb.render_phases(phases)] == [("p0", 1), ("p1", 21)]
    assert cb.render_phases([{"name": "a", "start_step": 1}]) == [{"name": "a", "start_step": 1}]
    tip = cb.family_tooltip(FAMILIES).splitlines()
    assert [line.split(":")[0] for line in tip] == sorted(FAMILIES)
    assert set(cb.FAMILY_NOTES) == set(FAMILIES)
