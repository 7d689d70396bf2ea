"""Render the metrics chart to a PNG (the same picture the node's live widget draws, server-side).

Top panel: loss raw and smoothed, alpha as a step line on the right axis, phase bands with their names,
transition markers, validation loss when present, and the stop advice (a red dotted line at the step the advice
fired, a star on the best validation loss it named). Bottom panel: slope, R², CV and gradient stability.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from .metrics import COLUMNS

BAND_COLORS = ("#4c78a8", "#f58518", "#54a24b", "#b279a2", "#e45756", "#72b7b2")


def _col(data: np.ndarray, name: str) -> np.ndarray:
    return data[:, COLUMNS.index(name)] if data.size else np.zeros(0)


def _ema(y: np.ndarray, span: int = 20) -> np.ndarray:
    out = np.full_like(y, np.nan)
    a, m = 2.0 / (span + 1), math.nan
    for i, v in enumerate(y):
        if math.isfinite(v):
            m = v if math.isnan(m) else a * v + (1 - a) * m
        out[i] = m
    return out


def render_png(data, phases: list | None = None, title: str = "", width: int = 1000, height: int = 600,
               events: list | None = None) -> bytes:
    """data: float array [steps, len(COLUMNS)] (NaN = undefined). phases: [{'name', 'start_step'}] (optional:
    derived from phase_idx when absent). events: metrics_payload's [{'step', 'event', 'detail'}] (optional:
    without them stop advice is read from the event_code column, and its best step is the lowest val_loss
    up to it). Returns PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = np.asarray(data, dtype=np.float64)
    if data.ndim != 2:
        data = np.zeros((0, len(COLUMNS)))
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(width / 100, height / 100), dpi=100, sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1.3]})
    steps = _col(data, "step")
    loss = _col(data, "loss")
    if steps.size == 0:
        ax.text(0.5, 0.5, "no metrics yet", ha="center", va="center", transform=ax.transAxes)
    else:
        end = steps.max()
        spans = _phase_spans(data, phases, end)
        for i, (name, start, stop) in enumerate(spans):
            color = BAND_COLORS[i % len(BAND_COLORS)]
            for a in (ax, ax2):
                a.axvspan(start, stop, color=color, alpha=0.10, lw=0)
            ax.text((start + stop) / 2, 1.01, name, transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                    fontsize=9, color=color)
            if i > 0:
                for a in (ax, ax2):
                    a.axvline(start, color="#333333", ls="--", lw=1)
        ax.plot(steps, loss, color="#9ecae1", lw=0.7, label="loss")
        ax.plot(steps, _ema(loss), color="#08519c", lw=2, label="loss (EMA 20)")
        val = _col(data, "val_loss")
        if np.isfinite(val).any():
            ok = np.isfinite(val)
            ax.plot(steps[ok], val[ok], "o-", color="#d62728", ms=3, lw=1, label="val_loss")
        _draw_stop_advice(ax, data, events)
        finite = loss[np.isfinite(loss)]
        if finite.size:
            lo, hi = np.percentile(finite, [1, 99])
            pad = (hi - lo) * 0.1 or 0.01
            ax.set_ylim(lo - pad, hi + pad)
        axr = ax.twinx()
        for name, color in (("conv_alpha", "#ff7f0e"), ("linear_alpha", "#2ca02c")):
            a = _col(data, name)
            if np.isfinite(a).any():
                axr.step(steps, a, where="post", color=color, lw=1.5, label=name)
        axr.set_ylabel("alpha")
        lines = ax.get_legend_handles_labels()
        rlines = axr.get_legend_handles_labels()
        ax.legend(lines[0] + rlines[0], lines[1] + rlines[1], loc="upper right", fontsize=8)
        for name, color in (("loss_r2", "#9467bd"), ("loss_cv", "#8c564b"), ("gradient_stability_avg", "#17becf")):
            ax2.plot(steps, _col(data, name), color=color, lw=1.2, label=name)
        ax2.set_ylim(-0.05, 1.05)
        ax2s = ax2.twinx()
        ax2s.plot(steps, _col(data, "loss_slope"), color="#7f7f7f", lw=1, label="loss_slope")
        ax2s.axhline(0, color="#7f7f7f", lw=0.5)
        ax2s.set_ylabel("slope (loss/step)", fontsize=8)
        h1, l1 = ax2.get_legend_handles_labels()
        h2, l2 = ax2s.get_legend_handles_labels()
        ax2.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=7, ncol=4)
    ax.set_ylabel("loss")
    ax2.set_xlabel("step")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _stop_advice(data: np.ndarray, events: list | None) -> list:
    """[(advice step, best step or None, best val_loss or None)] from event details, else from the columns."""
    if events is not None:
        out = []
        for e in events:
            if e.get("event") == "suggest_stop":
                d = e.get("detail") or {}
                d = d.get("suggest_stop", d)  # several events on one step: details keyed by event
                out.append((float(e["step"]), d.get("best_step"), d.get("best_val_loss")))
        return out
    from .metrics import EVENT_CODES

    steps, codes, val = _col(data, "step"), _col(data, "event_code"), _col(data, "val_loss")
    out = []
    for s in steps[codes == EVENT_CODES["suggest_stop"]]:
        ok = np.isfinite(val) & (steps <= s)
        if ok.any():
            i = np.flatnonzero(ok)[np.argmin(val[ok])]
            out.append((float(s), float(steps[i]), float(val[i])))
        else:
            out.append((float(s), None, None))
    return out


def _draw_stop_advice(ax, data: np.ndarray, events: list | None) -> None:
    for i, (step, best_step, best_val) in enumerate(_stop_advice(data, events)):
        first = i == 0
        ax.axvline(step, color="#d62728", ls=":", lw=1.5, label="suggest stop" if first else None)
        if best_step is not None and best_val is not None:
            ax.plot([best_step], [best_val], marker="*", color="#d62728", ms=12, ls="none",
                    label="best val_loss" if first else None)


def _phase_spans(data: np.ndarray, phases: list | None, end: float) -> list:
    if phases:
        starts = [(p["name"], float(p.get("start_step", 0))) for p in phases]
    else:
        starts, prev = [], None
        for step, idx in zip(_col(data, "step"), _col(data, "phase_idx")):
            if math.isfinite(idx) and idx != prev:
                starts.append((f"phase {int(idx)}", float(step)))
                prev = idx
    return [(name, start, starts[i + 1][1] if i + 1 < len(starts) else end) for i, (name, start) in enumerate(starts)]


def save_png(path: Path, data, phases=None, title: str = "", events: list | None = None) -> Path:
    from .export import atomic_write_bytes

    return atomic_write_bytes(Path(path), render_png(data, phases, title, events=events))
