"""python -m trainer run|replay|demo|bench"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import InterruptedTraining, TrainerError


def cmd_run(args) -> int:
    from .job import load_job
    from .loop import train

    job = load_job(args.job)
    if args.steps is not None:
        job.train.steps = args.steps
    if args.no_resume:
        job.save.resume = None
    try:
        result = train(job)
    except InterruptedTraining as e:
        print(f"stopped at step {e.step}; resume with the same command (save.resume: latest). "
              f"checkpoint: {e.checkpoint_path}  partial LoRA: {e.lora_path}", file=sys.stderr)
        return 130
    print(f"LoRA:        {result.lora_path}")
    print(f"metrics:     {result.metrics_path}")
    print(f"checkpoints: {job.checkpoint_dir}")
    return 0


def cmd_replay(args) -> int:
    from .job import load_job
    from .metrics import read_records
    from .schedule.replay import replay

    job = load_job(args.job)
    sched = job.network.alpha_schedule
    if sched is None:
        raise TrainerError(f"{args.job}: network.alpha_schedule is missing or disabled; nothing to replay")
    records = read_records(args.metrics)
    if not records:
        raise TrainerError(f"{args.metrics}: no metrics records")
    for line in replay(sched, job.network.base_alphas(), records):
        print(json.dumps(line, allow_nan=False, default=str))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out) if args.out else None, steps=args.steps)
    return 0


def cmd_bench(args) -> int:
    from .bench import run_bench

    run_bench(quick=args.quick)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer", description="Phase Trainer: LoRA training with alpha phases")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train a job file (YAML or JSON)")
    r.add_argument("job")
    r.add_argument("--steps", type=int, help="override train.steps")
    r.add_argument("--no-resume", action="store_true", help="start fresh even if checkpoints exist")
    r.set_defaults(fn=cmd_run)
    rp = sub.add_parser("replay", help="run a job's alpha schedule over a recorded metrics log")
    rp.add_argument("job")
    rp.add_argument("metrics")
    rp.set_defaults(fn=cmd_replay)
    d = sub.add_parser("demo", help="train a tiny random SD 1.5-shaped model on synthetic images (no downloads)")
    d.add_argument("--out", help="output folder (default: a new temporary folder)")
    d.add_argument("--steps", type=int, default=300)
    d.set_defaults(fn=cmd_demo)
    b = sub.add_parser("bench", help="benchmarks against baselines, printed as ratios")
    b.add_argument("--quick", action="store_true")
    b.set_defaults(fn=cmd_bench)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except TrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl+C before the loop's own handler is in place (loading, encoding)
        print("interrupted before training started; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
