"""Bad input: a clear error before the long work starts, naming the file or field and what to do, and nothing
already on disk changed. docs/faults.md is the table of these cases and what the user sees; every case id here
must appear there.

Run-level cases go through `train(job)` -- the CLI's and the nodes' entry point -- in a folder that already holds
a previous run's LoRA, metrics log and checkpoint, with the model loader replaced by a failure: the error must
come from the cheap checks, and a digest of every file before and after must match.
"""

from __future__ import annotations

import errno
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from fixtures_models import tiny_sd15_path, tiny_wan21_path  # noqa: F401
from tests.media import textured_frames, write_image, write_video
from tests.reliability_helpers import REPO, Quiet, cli_env, tree_digest
from trainer import checkpoint as ckpt
from trainer.demo import make_images
from trainer.errors import CheckpointError, DatasetError, JobError, ModelError, TrainerError
from trainer.export import atomic_save_safetensors
from trainer.families import get_family
from trainer.job import load_job, parse_job
from trainer.loop import train

FAULTS_DOC = REPO / "docs" / "faults.md"


def base_spec(family: str, model: Path, data: Path, out: Path) -> dict:
    video = family == "wan21"
    return {
        "job": "bad", "output_dir": str(out),
        "model": {"family": family, "path": str(model), "dtype": "fp32"},
        "datasets": [{"folder_path": str(data), "resolution": [32], "num_frames": 5 if video else 1}],
        "network": {"linear": 4, "linear_alpha": 4, "conv": 0 if video else 4, "conv_alpha": 0 if video else 4},
        "train": {"steps": 20, "batch_size": 1, "lr": 1e-3},
        "save": {"every": 10, "keep_last": 3, "resume": "none"},
    }


def previous_run(job) -> None:
    """What an earlier run of this job left: its LoRA, its metrics log and a checkpoint."""
    out = Path(job.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.ones(2, 2)}, str(job.lora_path))
    job.metrics_path.write_text('{"step":1,"loss":0.5}\n')
    write_checkpoint(job.checkpoint_dir, 10, job.job, job.network_signature())


def write_checkpoint(ckpt_dir, step, job_name, signature, lora=None):
    return ckpt.save_checkpoint(ckpt_dir, step=step, lora=lora or {"w": torch.zeros(2, 2)},
                                optimizer={"state": {}, "param_groups": []}, lr_scheduler={"last_epoch": step},
                                rng={"torch": torch.get_rng_state()},
                                state={"job": job_name, "signature": signature, "data": {"epoch": 0, "index": 0},
                                       "bad_steps": 0, "scheduler": None}, keep_last=10)


# ------------------------------------------------------------------------------------------- data folders

def _noise_bytes(n=2048):
    return bytes(range(256)) * (n // 256)


def _good_png(path):
    return write_image(path, 48, 32)


def _video(path, frames=12):
    return write_video(path, textured_frames(frames, 48, 32), num_frames=frames, width=48, height=32, gop=4)


def case_missing_folder(data):
    data.rmdir()


def case_empty_folder(data):
    pass


def case_only_unsupported_files(data):
    (data / "a.bmp").write_bytes(b"BM" + _noise_bytes())
    (data / "b.gif").write_bytes(b"GIF89a" + _noise_bytes())
    (data / "a.txt").write_text("a caption")


def case_corrupt_image(data):
    _good_png(data / "good.png")
    (data / "broken.png").write_bytes(_noise_bytes())


def case_truncated_image(data):
    _good_png(data / "good.png")
    whole = _good_png(data / "cut.png").read_bytes()
    (data / "cut.png").write_bytes(whole[: len(whole) // 2])


def case_zero_byte_image(data):
    _good_png(data / "good.png")
    (data / "empty.jpg").write_bytes(b"")


def case_unknown_image_type(data):
    _good_png(data / "good.png")
    (data / "notes.webp").write_text("this is a text file with an image extension")


def case_tiny_image(data):
    write_image(data / "tiny.png", 4, 4)


def case_caption_latin1(data):
    _good_png(data / "cafe.png")
    (data / "cafe.txt").write_bytes("un café au lait".encode("latin-1"))


def case_caption_utf16(data):
    _good_png(data / "photo.png")
    (data / "photo.txt").write_bytes("a photo".encode("utf-16"))


def case_video_in_image_family(data):
    _good_png(data / "good.png")
    _video(data / "clip.mp4")


def case_corrupt_video(data):
    _video(data / "good.mp4")
    (data / "broken.mp4").write_bytes(_noise_bytes())


def case_zero_byte_video(data):
    _video(data / "good.mp4")
    (data / "empty.mov").write_bytes(b"")


def case_truncated_mp4(data):
    whole = _video(data / "cut.mp4").read_bytes()
    (data / "cut.mp4").write_bytes(whole[: int(len(whole) * 0.9)])  # the index (moov) at the end is lost


def case_truncated_mkv_too_short(data):
    whole = write_video(data / "cut.mkv", textured_frames(24, 48, 32), num_frames=24, width=48, height=32,
                        gop=4).read_bytes()
    (data / "cut.mkv").write_bytes(whole[: int(len(whole) * 0.3)])  # what remains decodes: 4 frames < 5


def case_unknown_video_type(data):
    _video(data / "good.mp4")
    (data / "notes.mkv").write_text("not a video")


def case_video_shorter_than_num_frames(data):
    _video(data / "short.mp4", frames=3)


def case_skip_leaves_nothing(data):
    (data / "a.png").write_bytes(_noise_bytes())
    (data / "b.png").write_bytes(b"")


# id -> (family, make the data folder, spec change, error class, what the message must contain)
RUN_CASES = {
    "dataset-folder-missing": ("sd15", case_missing_folder, None, DatasetError, ["images", "does not exist",
                                                                                 "datasets[0].folder_path"]),
    "dataset-folder-empty": ("sd15", case_empty_folder, None, DatasetError, ["images", "no images", "add media"]),
    "dataset-only-unsupported-types": ("sd15", case_only_unsupported_files, None, DatasetError,
                                       ["no images", "png, jpg"]),
    "image-corrupt": ("sd15", case_corrupt_image, None, DatasetError, ["broken.png", "not a readable image",
                                                                       "re-save"]),
    "image-truncated": ("sd15", case_truncated_image, None, DatasetError, ["cut.png", "corrupt", "re-save"]),
    "image-zero-bytes": ("sd15", case_zero_byte_image, None, DatasetError, ["empty.jpg", "0 bytes", "remove"]),
    "image-unknown-type": ("sd15", case_unknown_image_type, None, DatasetError, ["notes.webp",
                                                                                  "not a readable image"]),
    "image-smaller-than-model-factor": ("sd15", case_tiny_image, None, DatasetError, ["tiny.png", "4x4",
                                                                                      "remove"]),
    "caption-latin1": ("sd15", case_caption_latin1, None, DatasetError, ["cafe.txt", "not valid UTF-8",
                                                                         "save it as UTF-8"]),
    "caption-utf16": ("sd15", case_caption_utf16, None, DatasetError, ["photo.txt", "not valid UTF-8"]),
    "video-for-image-family": ("sd15", case_video_in_image_family, None, DatasetError,
                               ["clip.mp4", "still images", "video model family"]),
    "video-corrupt": ("wan21", case_corrupt_video, None, DatasetError, ["broken.mp4", "cannot open this video"]),
    "video-zero-bytes": ("wan21", case_zero_byte_video, None, DatasetError, ["empty.mov", "0 bytes"]),
    "video-truncated-mp4": ("wan21", case_truncated_mp4, None, DatasetError, ["cut.mp4", "no readable video stream", "truncated"]),
    "video-truncated-mkv": ("wan21", case_truncated_mkv_too_short, None, DatasetError,
                            ["cut.mkv", "4 frames", "num_frames=5"]),
    "video-unknown-type": ("wan21", case_unknown_video_type, None, DatasetError, ["notes.mkv", "cannot open"]),
    "video-shorter-than-num-frames": ("wan21", case_video_shorter_than_num_frames, None, DatasetError,
                                      ["short.mp4", "3 frames", "num_frames=5", "lower num_frames"]),
    "on-bad-file-skip-leaves-nothing": ("sd15", case_skip_leaves_nothing,
                                        lambda s: s["datasets"][0].update(on_bad_file="skip"), DatasetError,
                                        ["no usable media left"]),
}


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading weights is the long work: any case here must fail before it."""
    for name in ("sd15", "wan21"):
        monkeypatch.setattr(get_family(name), "load",
                            classmethod(lambda *a, **k: pytest.fail("the model was loaded before the error")))


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_bad_dataset_fails_before_loading_and_changes_nothing(case, tmp_path, tiny_sd15_path, tiny_wan21_path,
                                                              no_model_loading):
    family, make, change, error, needles = RUN_CASES[case]
    data, out = tmp_path / "images", tmp_path / "out"
    data.mkdir()
    make(data)
    spec = base_spec(family, tiny_sd15_path if family == "sd15" else tiny_wan21_path, data, out)
    if change:
        change(spec)
    job = parse_job(spec)
    previous_run(job)
    before = tree_digest(tmp_path)
    with pytest.raises(error) as err:
        train(job, Quiet())
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))
    assert tree_digest(tmp_path) == before


# ------------------------------------------------------------------------------------------- model folders

def test_model_folder_problems_fail_in_the_cheap_checks(tmp_path, tiny_sd15_path, tiny_wan21_path,
                                                         no_model_loading):
    data = tmp_path / "images"
    make_images(data, size=32)
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.safetensors").write_bytes(b"\0" * 16)
    cases = {  # model-*: the model folder is not what model.family needs
        "model-folder-of-another-family": ("wan21", tiny_sd15_path, ["_class_name 'StableDiffusionPipeline'",
                                                                     "model.family 'sd15'", "WanPipeline"]),
        "model-folder-of-another-family-reverse": ("sd15", tiny_wan21_path, ["WanPipeline", "model.family 'wan21'"]),
        "model-folder-missing": ("sd15", tmp_path / "nowhere" / "model", ["nowhere", "no such folder"]),
        "model-folder-empty": ("sd15", tmp_path / "empty", ["empty", "model_index.json"]),
        "model-path-is-a-file": ("sd15", tmp_path / "file.safetensors", ["file.safetensors", "is a file",
                                                                         "model_index.json"]),
    }
    for case, (family, model, needles) in cases.items():
        spec = base_spec(family, model, data, tmp_path / "out")
        spec["datasets"][0]["num_frames"] = 1
        job = parse_job(spec)
        before = tree_digest(tmp_path)
        with pytest.raises(ModelError) as err:
            train(job, Quiet())
        for needle in needles:
            assert needle in str(err.value), (case, needle, str(err.value))
        assert tree_digest(tmp_path) == before, case


# ------------------------------------------------------------------------------------------- resume

def test_resume_problems_fail_before_loading_and_change_nothing(tmp_path, tiny_sd15_path, no_model_loading):
    data = tmp_path / "images"
    make_images(data, size=32)

    def job_with(**change):
        spec = base_spec("sd15", tiny_sd15_path, data, tmp_path / "out")
        spec["save"]["resume"] = change.pop("resume", "latest")
        spec["network"].update(change)
        return parse_job(spec)

    job = job_with()
    other = tmp_path / "elsewhere" / "checkpoints"
    cases = {
        "resume-checkpoint-of-another-job": (
            lambda: write_checkpoint(other, 5, "someone_else", job.network_signature()),
            ["belongs to job 'someone_else'", "resume: none"]),
        "resume-checkpoint-of-another-network-shape": (
            lambda: write_checkpoint(other, 6, "bad", job_with(linear=8).network_signature()),
            ["different model family, network shape", "settings it was made with"]),
        "resume-path-not-a-checkpoint": (lambda: (tmp_path / "elsewhere" / "plain").mkdir(parents=True) or
                                         tmp_path / "elsewhere" / "plain", ["not a complete checkpoint", "latest"]),
        "resume-checkpoint-with-corrupt-file": (
            lambda: _corrupt(write_checkpoint(other, 7, "bad", job.network_signature()), "lr_scheduler.pt"),
            ["lr_scheduler.pt", "unreadable checkpoint file", "delete this checkpoint"]),
    }
    for case, (make, needles) in cases.items():
        path = make()
        resumed = job_with(resume=str(path))
        before = tree_digest(tmp_path)
        with pytest.raises(CheckpointError) as err:
            train(resumed, Quiet())
        for needle in needles:
            assert needle in str(err.value), (case, needle, str(err.value))
        assert tree_digest(tmp_path) == before, case

    # resume: latest in an output_dir whose checkpoints belong to another job -> refused even with resume: none,
    # because this job's saves and pruning would replace and delete them
    write_checkpoint(tmp_path / "shared" / "checkpoints", 10, "first_job", "x")
    for resume in ("latest", "none"):
        spec = base_spec("sd15", tiny_sd15_path, data, tmp_path / "shared")
        spec["save"]["resume"] = resume
        before = tree_digest(tmp_path)
        with pytest.raises(CheckpointError, match="holds checkpoints of job 'first_job'.*its own output_dir"):
            train(parse_job(spec), Quiet())
        assert tree_digest(tmp_path) == before


def _corrupt(bundle: Path, name: str) -> Path:
    (bundle / name).write_bytes(b"PK\x03\x04 not really a zip")
    return bundle


def test_resume_of_a_checkpoint_made_for_another_model_is_a_clear_error(tmp_path, tiny_sd15_path):
    """Same job, same network settings, but LoRA tensors of another model: found once the model is loaded."""
    data = tmp_path / "images"
    make_images(data, size=32)
    spec = base_spec("sd15", tiny_sd15_path, data, tmp_path / "out")
    spec["save"]["resume"] = "latest"
    job = parse_job(spec)
    write_checkpoint(job.checkpoint_dir, 10, job.job, job.network_signature(),
                     lora={"down_blocks_0_attentions_0_proj_in.down.weight": torch.zeros(4, 7)})
    before = tree_digest(tmp_path / "out")
    with pytest.raises(CheckpointError, match="does not fit this model.*resume: none"):
        train(job, Quiet())
    assert tree_digest(tmp_path / "out") == before


def test_a_fresh_run_moves_old_checkpoints_aside_instead_of_pruning_them(tmp_path, tiny_sd15_path):
    data = tmp_path / "images"
    make_images(data, size=32)
    spec = base_spec("sd15", tiny_sd15_path, data, tmp_path / "out")
    spec["train"]["steps"] = 2
    spec["save"]["every"] = 1
    job = parse_job(spec)
    previous_run(job)
    old = tree_digest(job.checkpoint_dir)
    train(job, Quiet())  # resume: none
    assert tree_digest(tmp_path / "out" / "checkpoints.1") == old  # the earlier run's bundles, untouched
    assert json.loads((tmp_path / "out" / "metrics_bad.1.jsonl").read_text())["loss"] == 0.5  # log rotated too
    assert [p.name for p in ckpt.complete_checkpoints(job.checkpoint_dir)] == ["step_00000001", "step_00000002"]


# ------------------------------------------------------------------------------------------- the job itself

SD_SPEC = {"job": "j", "model": {"family": "sd15", "path": "/models/sd15"}, "datasets": [{"folder_path": "/d"}]}
PHASES = "network.alpha_schedule.conv_alpha_phases"


def _with(path: str, value, spec=None):
    """A copy of SD_SPEC (with a conv schedule) whose dotted `path` is set to `value`."""
    spec = json.loads(json.dumps(spec or SD_SPEC))
    spec.setdefault("network", {"linear": 4, "conv": 4, "alpha_schedule": {"conv_alpha_phases": {
        "foundation": {"alpha": 8, "min_steps": 10}, "emphasis": {"alpha": 16}}}})
    *parents, last = re.findall(r"[^.\[\]]+", path)
    node = spec
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    node[int(last) if isinstance(node, list) else last] = value
    return spec


JOB_CASES = {
    # id -> (job mapping, field the error names, words the message must contain)
    "resolution-not-divisible": (_with("datasets[0].resolution", [36]), "datasets[0].resolution",
                                 ["36", "multiple of 8", "try 40"]),
    "resolution-not-divisible-wan": (
        _with("datasets[0].resolution", [40], {**SD_SPEC, "model": {"family": "wan21", "path": "/m"},
                                               "network": {"linear": 4}}),
        "datasets[0].resolution", ["multiple of 16"]),
    "num-frames-not-4k+1": (_with("datasets[0].num_frames", 4, {**SD_SPEC, "model": {"family": "wan21",
                                                                                   "path": "/m"},
                                                                 "network": {"linear": 4}}),
                            "datasets[0].num_frames", ["4k+1"]),
    "unknown-family": (_with("model.family", "sd-15"), "model.family", ["unknown family", "sd15"]),
    "rank-negative": (_with("network.linear", -4), "network.linear", [">= 0"]),
    "ranks-both-zero": (_with("network", {"linear": 0, "conv": 0}), "network.linear", ["nothing would be trained"]),
    "linear-alpha-zero": (_with("network", {"linear": 4, "linear_alpha": 0}), "network.linear_alpha", ["> 0"]),
    "conv-alpha-negative": (_with("network", {"linear": 4, "conv": 4, "conv_alpha": -1}), "network.conv_alpha",
                            ["> 0"]),
    "phase-without-alpha": (_with(f"{PHASES}.foundation", {"min_steps": 10}), f"{PHASES}.foundation.alpha",
                            ["is required"]),
    "phase-alpha-zero": (_with(f"{PHASES}.foundation.alpha", 0), f"{PHASES}.foundation.alpha", ["> 0"]),
    "phase-negative-min-steps": (_with(f"{PHASES}.foundation.min_steps", -5), f"{PHASES}.foundation.min_steps",
                                 [">= 0"]),
    "phase-names-differ-between-lists": (
        _with("network.alpha_schedule.linear_alpha_phases", {"other": {"alpha": 4}, "emphasis": {"alpha": 8}}),
        "network.alpha_schedule.linear_alpha_phases", ["same phase names"]),
    "lora-name-with-slash": (_with("job", "loras/mine"), "job", ["no path separators"]),
    "lora-name-with-backslash": (_with("job", "loras\\mine"), "job", ["no path separators"]),
    "lora-name-dotdot": (_with("job", ".."), "job", ["no '..'"]),
    "lora-name-parent-path": (_with("job", "../../outside"), "job", ["no path separators"]),
    "lora-name-trailing-newline": (_with("job", "mine\n"), "job", ["not a usable name"]),
    "path-with-nul": (_with("datasets[0].folder_path", "/data/a\x00b"), "datasets[0].folder_path", ["NUL"]),
    "path-home-of-unknown-user": (_with("output_dir", "~no_such_user_here/out"), "output_dir",
                                  ["cannot expand '~'", "full path"]),
    "validation-path-home-of-unknown-user": (_with("validation", {"folder_path": "~no_such_user_here/val"}),
                                             "validation.folder_path", ["cannot expand '~'"]),
    "number-too-large": (_with("train.lr", 10 ** 400), "train.lr", ["finite number", "too large"]),
    "number-too-long-to-print": (_with("train.steps", -(10 ** 5000)), "train.steps", [">= 1", "too long to show"]),
}


@pytest.mark.parametrize("case", list(JOB_CASES))
def test_bad_job_settings_name_the_field(case):
    spec, field, needles = JOB_CASES[case]
    with pytest.raises(JobError) as err:
        parse_job(spec)
    assert err.value.field == field
    for needle in needles:
        assert needle in err.value.message, (needle, err.value.message)


DUPLICATE_PHASES = """\
job: dup
model: {family: sd15, path: /models/sd15}
datasets: [{folder_path: /data}]
network:
  linear: 4
  conv: 4
  alpha_schedule:
    conv_alpha_phases:
      foundation: {alpha: 8, min_steps: 100}
      emphasis: {alpha: 16, min_steps: 100}
      foundation: {alpha: 12}
"""


def test_job_files_that_yaml_would_misread_are_errors(tmp_path):
    f = tmp_path / "job.yaml"
    f.write_text(DUPLICATE_PHASES)
    assert yaml.safe_load(DUPLICATE_PHASES)["network"]["alpha_schedule"]["conv_alpha_phases"]["foundation"] == \
        {"alpha": 12}  # plain PyYAML silently keeps the last one
    with pytest.raises(JobError) as err:  # "phase-names-duplicated"
        load_job(f)
    assert err.value.field == f"{PHASES}.foundation" and "lines 9 and 11" in err.value.message
    f.write_text(json.dumps(_with("job", "a")).replace('"job": "a"', '"job": "a", "job": "b"'))
    with pytest.raises(JobError, match="given twice"):  # "duplicate-key-json"
        load_job(f)

    cases = {  # id -> (file content, words of the message)
        "job-file-not-utf8": ("job: caf\xe9\n".encode("latin-1"), ["not UTF-8"]),
        "job-file-not-yaml": (b"job: [unclosed\n", ["not valid YAML/JSON"]),
        "job-file-not-a-mapping": (b"- just\n- a list\n", ["must be a mapping"]),
        "job-file-nested-too-deep": (b"[" * 20000, ["nested too deeply"]),
        "job-file-huge-integer": (b"job: x\ntrain: {steps: " + b"9" * 5000 + b"}\n", ["cannot be read"]),
    }
    for case, (content, needles) in cases.items():
        f.write_bytes(content)
        with pytest.raises(JobError) as err:
            load_job(f)
        for needle in needles:
            assert needle in str(err.value), (case, str(err.value))
    with pytest.raises(JobError, match="does not exist"):  # "job-file-missing"
        load_job(tmp_path / "nope.yaml")
    with pytest.raises(JobError, match="cannot read job file"):  # "job-file-is-a-folder"
        load_job(tmp_path)


def test_the_cli_prints_bad_input_errors_without_a_traceback(tmp_path):
    f = tmp_path / "job.yaml"
    f.write_text(DUPLICATE_PHASES)
    run = subprocess.run([sys.executable, "-m", "trainer", "run", str(f)], env=cli_env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.startswith(f"error: {PHASES}.foundation: is given twice")


# ------------------------------------------------------------------------------------------- disk full

def test_disk_full_while_saving_the_lora_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "mine.safetensors"
    save_file({"w": torch.ones(4)}, str(target))
    before = target.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("trainer.export.save_file", full)
    with pytest.raises(TrainerError) as err:
        atomic_save_safetensors({"w": torch.zeros(4)}, target)
    assert str(target) in str(err.value) and "No space left on device: free some disk space" in str(err.value)
    assert "mine.safetensors is unchanged" in str(err.value)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["mine.safetensors"]


def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_ones(tmp_path, monkeypatch):
    first = write_checkpoint(tmp_path, 10, "j", "s")
    before = tree_digest(tmp_path)

    def full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full)
    with pytest.raises(CheckpointError) as err:
        write_checkpoint(tmp_path, 20, "j", "s")
    assert "step_00000020" in str(err.value) and "free some disk space" in str(err.value)
    assert "Earlier checkpoints are untouched" in str(err.value)
    assert tree_digest(tmp_path) == before and ckpt.find_resume(tmp_path, "latest") == first


REAL_WRITE_FAILURE = """
import json, resource, signal, sys, torch
from trainer import checkpoint as ckpt
from trainer.errors import TrainerError
from trainer.export import atomic_save_safetensors
out = sys.argv[1]
atomic_save_safetensors({"w": torch.ones(8)}, out + "/lora.safetensors")
ckpt.save_checkpoint(out + "/ck", step=1, lora={"w": torch.ones(8)}, optimizer={}, lr_scheduler={}, rng={},
                     state={}, keep_last=5)
# from here on the kernel refuses to grow any file past 64 KiB, as a full disk refuses any write
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
messages = []
for write in (lambda: atomic_save_safetensors({"w": torch.ones(100000)}, out + "/lora.safetensors"),
              lambda: ckpt.save_checkpoint(out + "/ck", step=2, lora={"w": torch.ones(8)},
                                           optimizer={"m": torch.ones(100000)}, lr_scheduler={}, rng={}, state={},
                                           keep_last=5)):
    try:
        write()
        messages.append(None)
    except TrainerError as e:
        messages.append(f"{type(e).__name__}: {e}")
print(json.dumps(messages))
"""


def test_a_real_refused_write_gives_the_same_clear_errors(tmp_path):
    """The kernel refusing the write (RLIMIT_FSIZE in a subprocess), not a patched function: safetensors and
    torch.save wrap the OS error in their own exception types, which must still become a clear error."""
    run = subprocess.run([sys.executable, "-c", REAL_WRITE_FAILURE, str(tmp_path)], env=cli_env(),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lora_msg, ckpt_msg = json.loads(run.stdout.strip().splitlines()[-1])
    assert lora_msg.startswith("TrainerError: cannot write") and "File too large" in lora_msg
    assert "lora.safetensors is unchanged" in lora_msg
    assert ckpt_msg.startswith("CheckpointError: cannot write checkpoint") and "step_00000002" in ckpt_msg
    assert torch.equal(load_file(str(tmp_path / "lora.safetensors"))["w"], torch.ones(8))
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["step_00000001"]
    assert ckpt.load_bundle(tmp_path / "ck" / "step_00000001")["state"]["step"] == 1


def test_disk_full_during_a_run_stops_cleanly_and_the_run_resumes(tmp_path, tiny_sd15_path, monkeypatch):
    data = tmp_path / "images"
    make_images(data, size=32)
    spec = base_spec("sd15", tiny_sd15_path, data, tmp_path / "out")
    spec["train"]["steps"], spec["save"] = 6, {"every": 2, "keep_last": 5, "resume": "latest"}
    job = parse_job(spec)
    family = get_family("sd15").load(str(tiny_sd15_path), dtype=torch.float32)
    targets = family.target_modules(4, 4)
    real_save, calls = ckpt.save_file, [0]

    def full_on_second_bundle(tensors, filename, *a, **k):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", full_on_second_bundle)
    with pytest.raises(CheckpointError, match="step_00000004.*free some disk space"):
        train(job, Quiet(), family=family)
    assert not any("forward" in vars(t.module) for t in targets)  # the model is left without LoRA hooks
    assert [p.name for p in ckpt.complete_checkpoints(job.checkpoint_dir)] == ["step_00000002"]
    assert not list(job.checkpoint_dir.glob(".*"))
    monkeypatch.setattr(ckpt, "save_file", real_save)
    result = train(job, Quiet())  # space freed: the same job resumes from step 2 and finishes
    assert result.step == 6 and result.lora_path.is_file()


# ------------------------------------------------------------------------------------------- the table

def test_every_case_is_in_the_faults_table():
    table = FAULTS_DOC.read_text(encoding="utf-8")
    ids = [*RUN_CASES, *JOB_CASES, "model-folder-of-another-family", "model-folder-missing", "model-folder-empty",
           "model-path-is-a-file", "resume-checkpoint-of-another-job", "resume-checkpoint-of-another-network-shape",
           "resume-path-not-a-checkpoint", "resume-checkpoint-with-corrupt-file", "output-dir-shared-with-another-job",
           "resume-checkpoint-for-another-model", "phase-names-duplicated", "duplicate-key-json", "job-file-not-utf8",
           "job-file-not-yaml", "job-file-not-a-mapping", "job-file-nested-too-deep", "job-file-huge-integer",
           "job-file-missing", "job-file-is-a-folder", "disk-full-lora", "disk-full-checkpoint", "disk-full-during-run",
           "nan-loss", "inf-gradient", "nan-consecutive", "malicious-pickle-checkpoint", "malicious-pickle-model",
           "sigint", "sigterm", "kill-during-checkpoint", "kill-during-lora-write", "fresh-run-over-old-run"]
    missing = [i for i in ids if f"`{i}`" not in table]
    assert not missing, f"docs/faults.md lacks rows for {missing}"
