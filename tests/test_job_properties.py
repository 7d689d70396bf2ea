"""Property tests of job validation: generated job mappings -- valid ones, and valid ones broken at random
places -- give a validated Job or a JobError naming a field with a message, never any other exception. A job
that validates must also be usable: it round-trips through job_to_dict and its alpha schedule constructs.
"""

from __future__ import annotations

import os
import string

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer.errors import JobError
from trainer.job import Job, job_to_dict, parse_job, read_job_text
from trainer.schedule.scheduler import AlphaScheduler

# PT_HYPOTHESIS_EXAMPLES=5000 for a longer hunt; 150 keeps the suite fast
SETTINGS = settings(max_examples=int(os.environ.get("PT_HYPOTHESIS_EXAMPLES", "150")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
FACTOR = {"sd15": 8, "wan21": 16}

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_\-.]{0,15}", fullmatch=True).filter(lambda s: ".." not in s)
positive = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False, allow_infinity=False)
unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False, allow_infinity=False)


@st.composite
def exit_criteria(draw):
    keys = {
        "loss_improvement_rate_below": st.floats(0.0, 1.0),
        "min_gradient_stability": unit,
        "min_loss_r2": unit,
        "max_loss_cv": st.floats(1e-3, 10.0),
        "r2_gate": st.booleans(),
    }
    chosen = draw(st.lists(st.sampled_from(sorted(keys)), unique=True, max_size=len(keys)))
    return {k: draw(keys[k]) for k in chosen}


@st.composite
def phases(draw):
    phase_names = draw(st.lists(names, min_size=1, max_size=4, unique=True))
    out = {}
    for name in phase_names:
        spec = {"alpha": draw(positive)}
        if draw(st.booleans()):
            spec["min_steps"] = draw(st.integers(0, 5000))
        if draw(st.booleans()):
            spec["exit_criteria"] = draw(exit_criteria())
        out[name] = spec
    return out


@st.composite
def valid_jobs(draw) -> dict:
    family = draw(st.sampled_from(sorted(FACTOR)))
    factor = FACTOR[family]
    datasets = []
    for _ in range(draw(st.integers(1, 3))):
        ds = {"folder_path": draw(st.sampled_from(["/data/a", "data/b", "./c", "~/d"])) + draw(names)}
        optional = {
            "caption_ext": st.sampled_from(["txt", ".caption", "md"]),
            "trigger_word": st.one_of(st.none(), st.text(min_size=1, max_size=10)),
            "caption_dropout_rate": unit,
            "resolution": st.one_of(st.integers(1, 128).map(lambda k: k * factor),
                                    st.lists(st.integers(1, 128).map(lambda k: k * factor), min_size=1, max_size=3)),
            "num_frames": st.just(1) if family == "sd15" else st.integers(0, 20).map(lambda k: 4 * k + 1),
            "num_repeats": st.integers(1, 10),
            "default_caption": st.text(max_size=20),
            "cache_latents_to_disk": st.booleans(),
            "on_bad_file": st.sampled_from(["error", "skip", "SKIP"]),
            "frame_sampling": st.sampled_from(["auto", "decode", "seek"]),
        }
        for key in draw(st.lists(st.sampled_from(sorted(optional)), unique=True)):
            ds[key] = draw(optional[key])
        datasets.append(ds)

    linear = draw(st.integers(0, 64))
    conv = draw(st.integers(0 if linear else 1, 64))
    network = {"linear": linear, "conv": conv}
    if linear and draw(st.booleans()):
        network["linear_alpha"] = draw(positive)
    if conv and draw(st.booleans()):
        network["conv_alpha"] = draw(positive)
    if draw(st.booleans()):
        network["only_if_contains"] = draw(st.lists(st.text(min_size=1, max_size=8), max_size=3))
    if draw(st.booleans()):
        network["dropout"] = draw(st.floats(0.0, 0.9))
    if draw(st.booleans()):
        group = draw(st.sampled_from([g for g, r in (("conv", conv), ("linear", linear)) if r]))
        schedule = {f"{group}_alpha_phases": draw(phases())}
        if draw(st.booleans()):
            schedule["window"] = draw(st.integers(20, 500))
        if draw(st.booleans()):
            schedule["ramp_steps"] = draw(st.integers(0, 100))
        if draw(st.booleans()):
            schedule["preset"] = draw(st.sampled_from(["video", "image"]))
        network["alpha_schedule"] = schedule

    steps = draw(st.integers(1, 10**6))
    train = {"steps": steps, "batch_size": draw(st.integers(1, 16)),
             "gradient_accumulation": draw(st.integers(1, 8)),
             "lr": draw(st.one_of(st.floats(1e-7, 1.0), st.sampled_from(["1e-4", "3e-5"]))),
             "lr_scheduler": draw(st.sampled_from(["constant", "cosine", "linear", "constant_with_warmup"])),
             "warmup_steps": draw(st.integers(0, steps - 1)), "max_grad_norm": draw(st.floats(0.0, 10.0)),
             "seed": draw(st.integers(0, 2**32)), "mixed_precision": draw(st.sampled_from(["auto", "no", "bf16"])),
             "max_bad_steps": draw(st.integers(1, 50))}
    save = {"every": draw(st.integers(1, 10**4)), "keep_last": draw(st.integers(1, 10)),
            "resume": draw(st.sampled_from(["latest", "none", None, False, "/runs/x/checkpoints/step_00000010"]))}
    return {"job": draw(names), "output_dir": draw(st.sampled_from(["out", "/tmp/runs/x", "~/runs"])),
            "model": {"family": family, "path": draw(st.sampled_from(["/models/m", "org/model", "./m"])),
                      "dtype": draw(st.sampled_from(["fp32", "bf16", "fp16"]))},
            "datasets": datasets, "network": network, "train": train, "save": save}


# Anything a YAML/JSON job file can hold, with the awkward values users (and fuzzers) produce.
awkward_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from([0, -1, 10**400, -(10**4000), 2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["", " ", "..", "../x", "a/b", "~nobody_here/x", "x\x00y", "a" * 300, "nan", "inf", "1e999",
                     "latest", "none", "sd15", "wan21"]),
)
json_values = st.recursive(awkward_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=10), st.integers()), inner, max_size=4)),
    max_leaves=12)


@st.composite
def broken_jobs(draw) -> dict:
    """A valid job with 1-3 random edits: a value replaced, a key removed, or an unknown key added."""
    job = draw(valid_jobs())
    for _ in range(draw(st.integers(1, 3))):
        node, parent, key = job, None, None
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            parent, key = node, draw(st.sampled_from(list(node) if isinstance(node, dict) else range(len(node))))
            node = node[key]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if parent is None or (action == "add" and isinstance(node, dict)):
            if isinstance(node, dict):
                node[draw(st.text(string.ascii_letters + "_", min_size=1, max_size=12))] = draw(json_values)
            continue
        if action == "delete":
            del parent[key]
        else:
            parent[key] = draw(json_values)
    return job


def assert_usable(job: Job) -> None:
    """What a validated job promises the loop."""
    again = parse_job(job_to_dict(job))
    assert job_to_dict(again) == job_to_dict(job)
    assert again.network_signature() == job.network_signature()
    sched = job.network.alpha_schedule
    if sched is not None:
        AlphaScheduler(sched, job.network.base_alphas())
    assert job.train.warmup_steps < job.train.steps or job.train.warmup_steps == 0
    for ds in job.datasets:
        assert all(r > 0 for r in ds.resolution) and ds.num_frames >= 1


def parse_or_job_error(data):
    try:
        return parse_job(data)
    except JobError as e:
        assert isinstance(e.message, str) and e.message.strip(), "a JobError without a message"
        if isinstance(data, dict):
            assert isinstance(e.field, str) and e.field.strip(), f"a JobError without a field: {e}"
        assert str(e).strip()
        return None


@SETTINGS
@given(valid_jobs())
def test_valid_jobs_validate_and_keep_their_values(spec):
    job = parse_job(spec)
    assert job.job == spec["job"] and job.model.family == spec["model"]["family"]
    assert job.train.steps == spec["train"]["steps"] and len(job.datasets) == len(spec["datasets"])
    sched = spec["network"].get("alpha_schedule")
    if sched is not None:
        given_phases = next(v for k, v in sched.items() if k.endswith("_alpha_phases"))
        assert [p.name for p in job.network.alpha_schedule.phases] == list(given_phases)
        assert [next(iter(p.alphas.values())) for p in job.network.alpha_schedule.phases] == \
               [float(p["alpha"]) for p in given_phases.values()]
    assert_usable(job)


@SETTINGS
@given(broken_jobs())
def test_broken_jobs_give_a_job_or_a_job_error_naming_a_field(spec):
    job = parse_or_job_error(spec)
    if job is not None:
        assert_usable(job)


@SETTINGS
@given(json_values)
def test_any_value_at_all_gives_a_job_error(value):
    assert parse_or_job_error(value) is None


@SETTINGS
@given(broken_jobs(), st.integers(0, 10**6),
       st.sampled_from(["", "\n", ":", "- ", "[", "{", "&a ", "*a", "!!python/object ", "\t", "'", "\"", "#", "\xe9"]))
def test_job_file_text_gives_a_job_or_a_job_error(spec, position, insert):
    text = yaml.safe_dump(spec, allow_unicode=True, sort_keys=False)
    cut = position % (len(text) + 1)
    text = text[:cut] + insert + text[cut:]
    try:
        data = read_job_text(text)
    except JobError as e:
        assert e.message.strip()
        return
    job = parse_or_job_error(data)
    if job is not None:
        assert_usable(job)


def test_small_windows_still_let_phases_end():
    """Found by these properties: window < 100 validated, then AlphaScheduler refused it (its min_losses is
    100) after the model had loaded. A window now also caps the losses a phase needs."""
    spec = {"job": "w", "model": {"family": "sd15", "path": "/m"}, "datasets": [{"folder_path": "/d"}],
            "network": {"linear": 4, "alpha_schedule": {"window": 20, "linear_alpha_phases": {
                "a": {"alpha": 4, "min_steps": 0}, "b": {"alpha": 8}}}}}
    job = parse_job(spec)
    sched = AlphaScheduler(job.network.alpha_schedule, job.network.base_alphas())
    transition = None
    for step in range(1, 21):
        transition = transition or sched.update(step, 1.0, 1.0)
    assert transition is not None and transition["step"] == 20
