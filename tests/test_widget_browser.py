"""The metrics plot widget (web/plot.js, web/phase_trainer.js) in real headless Chromium, on plain pages.

Checks pixels read back from the canvas: phase band fills in their x-ranges, transition markers in their
columns, the loss line, the empty state, live appends, hover tooltip, series toggles, devicePixelRatio.
Needs Debian's `chromium` and the `playwright` pip package; skips without them, fails under CI=true.

Regenerate the README image: PT_SCREENSHOT_DIR=docs pytest tests/test_widget_browser.py -k readme
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import math
import os
import random
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parent.parent
PAGE_DIR = REPO / "tests" / "widget_page"
WEB_DIR = REPO / "web"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
CSS_W, CSS_H = 640, 320  # the canvas size on tests/widget_page/index.html

COLUMNS = ["step", "loss", "loss_slope", "loss_r2", "loss_cv", "gradient_stability", "gradient_stability_avg",
           "grad_norm", "lr", "phase_idx", "steps_in_phase", "linear_alpha", "conv_alpha", "expert_idx",
           "event_code", "val_loss"]
PHASES = [
    {"name": "foundation", "start_step": 0, "alpha": {"conv": 8}},
    {"name": "balance", "start_step": 100, "alpha": {"conv": 14}},
    {"name": "emphasis", "start_step": 200, "alpha": {"conv": 20}},
]


def _missing_or_fail(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI installs it: see .ci/run)")
    pytest.skip(reason)


# --- pages ---------------------------------------------------------------------------------------------

# URL prefix -> folder. /extensions/phase_trainer/ is where ComfyUI serves WEB_DIRECTORY; /scripts/ gets the
# test doubles of ComfyUI's app.js and api.js.
ROUTES = {
    "/page/": PAGE_DIR,
    "/web/": WEB_DIR,
    "/extensions/phase_trainer/": WEB_DIR,
    "/scripts/": PAGE_DIR / "fake_comfy" / "scripts",
}


class _Handler(http.server.SimpleHTTPRequestHandler):
    def translate_path(self, path):
        path = path.split("?", 1)[0].split("#", 1)[0]
        for prefix, folder in ROUTES.items():
            if path.startswith(prefix):
                target = (folder / path[len(prefix):]).resolve()
                if target.is_relative_to(folder.resolve()):
                    return str(target)
        return str(PAGE_DIR / "__not_served__")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        _missing_or_fail(f"{CHROMIUM} not found (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing_or_fail("the playwright python package is not installed (pip install playwright)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _open(browser, url, dpr=1):
    context = browser.new_context(viewport={"width": 900, "height": 700}, device_scale_factor=dpr)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(url)
    try:
        page.wait_for_function("window.ptReady === true", timeout=10_000)
    except Exception as exc:  # the module failed to load: say why
        raise AssertionError(f"page did not load: {errors}") from exc
    page.errors = errors
    return page


@pytest.fixture()
def page(browser, server):
    p = _open(browser, f"{server}/page/index.html")
    yield p
    assert not p.errors, p.errors
    p.context.close()


# --- payloads ------------------------------------------------------------------------------------------

def synthetic_payload(n=300, seed=0):
    """3 phases (steps 0-99, 100-199, 200-n), transitions at 100 and 200, decaying noisy loss."""
    rng = random.Random(seed)
    rows = []
    for step in range(n):
        phase = min(2, step // 100)
        loss = 0.08 + 0.3 * math.exp(-step / 120) + rng.uniform(-0.02, 0.02)
        rows.append([step, loss, -1e-4, 0.4 + 0.5 * rng.random(), 0.1 + 0.05 * rng.random(), 0.6 + 0.3 * rng.random(),
                     0.7, 1.0 + rng.random(), 1e-4, phase, step - 100 * phase, 16, [8, 14, 20][phase], None, None,
                     0.2 if step % 50 == 49 else None])
    events = [{"step": 100, "event": "transition", "detail": {"from_phase": 0, "to_phase": 1}},
              {"step": 200, "event": "transition", "detail": {"from_phase": 1, "to_phase": 2}}]
    return {"columns": COLUMNS, "rows": rows, "phases": PHASES, "events": events, "job": "test_job"}


def realistic_payload(n=3000, seed=7):
    """A run that looks like a real one: noisy decay, bumps at alpha increases, windowed statistics."""
    rng = np.random.default_rng(seed)
    starts = [0, 1100, 2150]
    alphas = [8, 14, 20]
    steps = np.arange(n)
    phase = np.searchsorted(starts, steps, side="right") - 1
    base = 0.075 + 0.11 * np.exp(-steps / 700.0)
    bump = np.zeros(n)
    for s in starts[1:]:
        bump += np.where(steps >= s, 0.012 * np.exp(-(steps - s) / 120.0), 0.0)
    loss = base + bump + rng.normal(0, 1, n) * (0.018 + 0.02 * np.exp(-steps / 900.0))
    loss = np.abs(loss)
    window = 200
    slope, r2, cv = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    for i in range(window, n):
        y = loss[i - window:i]
        x = np.arange(window)
        b, a = np.polyfit(x, y, 1)
        fit = a + b * x
        slope[i] = b
        r2[i] = 1 - np.sum((y - fit) ** 2) / np.sum((y - y.mean()) ** 2)
        cv[i] = y[-50:].std() / y[-50:].mean()
    # Sign agreement over a window: a slow rise with a little wander, not per-step noise.
    wander = np.convolve(rng.normal(0, 0.03, n + 99), np.ones(100) / 10, mode="valid")
    stability = np.clip(0.6 + 0.22 * (1 - np.exp(-steps / 600)) + wander, 0, 1)
    lr = 1e-4 * (0.5 + 0.5 * np.cos(np.pi * steps / n))
    rows = []
    for i in range(n):
        def num(v):
            return None if not np.isfinite(v) else float(v)
        rows.append([int(i), float(loss[i]), num(slope[i]), num(r2[i]), num(cv[i]), float(stability[i]),
                     float(stability[max(0, i - 50):i + 1].mean()), float(0.6 + 0.2 * rng.random()), float(lr[i]),
                     int(phase[i]), int(i - starts[phase[i]]), 16, alphas[phase[i]], None, None,
                     float(base[i] + 0.006) if i % 250 == 249 else None])
    phases = [{"name": nm, "start_step": s, "alpha": {"conv": a}}
              for nm, s, a in zip(["foundation", "balance", "emphasis"], starts, alphas)]
    events = [{"step": s, "event": "transition", "detail": {}} for s in starts[1:]]
    return {"columns": COLUMNS, "rows": rows, "phases": phases, "events": events, "job": "wan21_character_lora"}


# --- pixel helpers -------------------------------------------------------------------------------------

def hex_rgb(color: str) -> np.ndarray:
    color = color.lstrip("#")
    return np.array([int(color[i:i + 2], 16) for i in (0, 2, 4)], dtype=float)


def over(bg: str, fg: str, alpha: float) -> np.ndarray:
    return hex_rgb(bg) * (1 - alpha) + hex_rgb(fg) * alpha


def pixels(page, canvas="#plot") -> np.ndarray:
    """The canvas backing store as an (H, W, 3) float array (device pixels), read back losslessly as PNG."""
    from PIL import Image

    url = page.evaluate("(sel) => document.querySelector(sel).toDataURL('image/png')", canvas)
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:
        return np.asarray(im.convert("RGB"), dtype=float)


def near(img: np.ndarray, rgb: np.ndarray, tol: float = 4.0) -> np.ndarray:
    return np.all(np.abs(img - rgb) <= tol, axis=-1)


def ev(page, expr: str, arg):
    """page.evaluate with the argument sent as one JSON string (much faster than Playwright's own encoding
    for payloads of thousands of rows)."""
    return page.evaluate(f"(s) => ({expr})(JSON.parse(s))", json.dumps(arg))


def mode_color(region: np.ndarray) -> np.ndarray:
    flat = region.reshape(-1, 3).astype(int)
    values, counts = np.unique(flat, axis=0, return_counts=True)
    return values[np.argmax(counts)].astype(float)


def theme(page) -> dict:
    return page.evaluate("() => window.PT.THEME")


def draw(page, payload, **opts):
    """drawMetrics on the test canvas; returns the layout with x positions of the steps we ask about."""
    return ev(
        page,
        """([payload, opts]) => {
             const c = document.getElementById('plot');
             const layout = window.PT.drawMetrics(c, payload, opts);
             const xs = {};
             if (!layout.empty) for (const s of [0, 50, 100, 150, 200, 250, 299]) xs[s] = layout.xOf(s);
             return {...layout, xs, canvasWidth: c.width, canvasHeight: c.height};
           }""",
        [payload, opts],
    )


def band_column_color(img, layout, step, dpr=1):
    """Most common colour in a 9 px wide strip around `step`, below the phase labels."""
    plot = layout["plot"]
    x = int(round(layout["xs"][str(step)] * dpr))
    y0, y1 = int((plot["y"] + 20) * dpr), int((plot["y"] + plot["h"] - 2) * dpr)
    return mode_color(img[y0:y1, x - 4:x + 5])


# --- tests: drawMetrics ----------------------------------------------------------------------------------

def test_phase_bands_fill_their_step_ranges(page):
    t = theme(page)
    layout = draw(page, synthetic_payload())
    img = pixels(page)
    assert layout["xRange"] == [0, 299]
    assert [b["name"] for b in layout["bands"]] == ["foundation", "balance", "emphasis"]
    expected = [over(t["background"], t["bands"][i], t["bandAlpha"]) for i in range(3)]
    for step, band in [(50, 0), (150, 1), (250, 2)]:
        got = band_column_color(img, layout, step)
        assert np.abs(got - expected[band]).max() <= 3, (step, got, expected[band])
    # The three fills are really different colours, so a band drawn in the wrong place would show.
    assert min(np.abs(expected[0] - expected[1]).max(), np.abs(expected[1] - expected[2]).max()) > 10
    # Left of the first band and outside the plot: no band colour.
    plot = layout["plot"]
    assert not near(img[:, : int(plot["x"]) - 2], expected[0], 2).any()


def test_transition_markers_at_transition_steps(page):
    t = theme(page)
    layout = draw(page, synthetic_payload())
    img = pixels(page)
    plot = layout["plot"]
    y0, y1 = int(plot["y"]), int(plot["y"] + plot["h"])
    marker = hex_rgb(t["transition"])
    for step in (100, 200):
        x = round(layout["xs"][str(step)])
        strip = near(img[y0:y1, x - 2:x + 2], marker, 6)
        # Dashed (5 on, 4 off), so about half of the plot height in the marker columns.
        assert strip.any(axis=1).sum() >= 0.35 * plot["h"], (step, strip.any(axis=1).sum())
    for step in (50, 150, 250):  # mid-phase: no marker
        x = round(layout["xs"][str(step)])
        assert near(img[y0:y1, x - 2:x + 2], marker, 6).sum() == 0, step


def test_transition_marker_from_phase_idx_alone(page):
    """Without events, the change of phase_idx in the rows still marks the transition."""
    t = theme(page)
    payload = synthetic_payload()
    payload["events"] = []
    layout = draw(page, payload)
    img = pixels(page)
    plot = layout["plot"]
    x = round(layout["xs"]["200"])
    strip = near(img[int(plot["y"]):int(plot["y"] + plot["h"]), x - 2:x + 2], hex_rgb(t["transition"]), 6)
    assert strip.any(axis=1).sum() >= 0.35 * plot["h"]
    assert layout["transitions"] == [100, 200]


def test_loss_line_alpha_line_and_val_points_are_drawn(page):
    t = theme(page)
    layout = draw(page, synthetic_payload())
    img = pixels(page)
    plot = layout["plot"]
    inside = img[int(plot["y"]):int(plot["y"] + plot["h"]), int(plot["x"]):int(plot["x"] + plot["w"])]
    # The smoothed loss is a continuous opaque line: about one pure-colour pixel per column or more.
    loss_cols = near(inside, hex_rgb(t["loss"][0]), 6).any(axis=0).sum()
    assert loss_cols >= 0.8 * plot["w"], loss_cols
    alpha_cols = near(inside, hex_rgb(t["alpha"]), 6).any(axis=0).sum()
    assert alpha_cols >= 0.8 * plot["w"], alpha_cols
    assert layout["drawn"]["val"] == 6
    assert near(inside, hex_rgb(t["val"]), 2).sum() >= 6 * 4
    # The alpha step line sits at 8, 14, 20 on the right axis: its y drops at each phase.
    ys = ev(page, """(p) => { const l = window.PT.drawMetrics(document.getElementById('plot'), p);
                                   return [8, 14, 20].map(a => Math.round(l.yOfAlpha(a))); }""", synthetic_payload())
    for step, y in zip((50, 150, 250), ys):
        x = round(layout["xs"][str(step)])
        column = near(img[y - 2:y + 3, x - 1:x + 2], hex_rgb(t["alpha"]), 6)
        assert column.any(), (step, y)


def test_empty_payload_shows_waiting_text(page):
    t = theme(page)
    layout = draw(page, {"columns": COLUMNS, "rows": [], "phases": PHASES, "events": []})
    img = pixels(page)
    assert layout["empty"] is True
    bg = hex_rgb(t["background"])
    center = img[CSS_H // 2 - 12:CSS_H // 2 + 12, CSS_W // 2 - 100:CSS_W // 2 + 100]
    text_pixels = (np.abs(center - bg).max(axis=-1) > 40).sum()
    assert text_pixels > 80, text_pixels
    # Everything outside the text is plain background: no axes, no bands.
    outside = img.copy()
    outside[CSS_H // 2 - 12:CSS_H // 2 + 12, CSS_W // 2 - 100:CSS_W // 2 + 100] = bg
    assert near(outside, bg, 1).all()
    # A null payload is the same empty state.
    assert draw(page, None)["empty"] is True


def test_nulls_outliers_and_decimation(page):
    t = theme(page)
    payload = synthetic_payload(n=20000)
    for i, row in enumerate(payload["rows"]):
        row[9] = min(2, i // 7000)
        if i % 17 == 0:
            row[1] = None
        if i % 23 == 0:
            row[3] = None
    payload["rows"][5000][1] = 1e6  # one spike must not flatten the curve
    payload["events"] = []
    payload["phases"] = [dict(p, start_step=s) for p, s in zip(PHASES, (0, 7000, 14000))]
    layout = draw(page, payload)
    plot = layout["plot"]
    assert layout["lossRange"][1] < 1.0, layout["lossRange"]
    # Decimated to the canvas width: at most 2 points per pixel column for raw loss, 1 for the EMA.
    assert layout["drawn"]["raw"] <= 2 * (plot["w"] + 2)
    assert layout["drawn"]["ema"] <= plot["w"] + 2
    img = pixels(page)
    inside = img[int(plot["y"]):int(plot["y"] + plot["h"]), int(plot["x"]):int(plot["x"] + plot["w"])]
    assert near(inside, hex_rgb(t["loss"][0]), 6).any(axis=0).sum() >= 0.8 * plot["w"]


def test_two_experts_get_two_loss_colours(page):
    t = theme(page)
    payload = synthetic_payload()
    for row in payload["rows"]:
        row[13] = row[0] % 2
        if row[13] == 1:
            row[1] += 0.15
    layout = draw(page, payload)
    img = pixels(page)
    plot = layout["plot"]
    inside = img[int(plot["y"]):int(plot["y"] + plot["h"]), int(plot["x"]):int(plot["x"] + plot["w"])]
    for color in t["loss"][:2]:
        assert near(inside, hex_rgb(color), 6).any(axis=0).sum() >= 0.8 * plot["w"], color


def test_per_expert_phases_draw_two_lanes(page):
    t = theme(page)
    payload = synthetic_payload()
    payload["phases"] = [
        {"name": "hn_a", "start_step": 0, "alpha": {"conv": 8}, "expert": "high_noise"},
        {"name": "hn_b", "start_step": 150, "alpha": {"conv": 14}, "expert": "high_noise"},
        {"name": "ln_a", "start_step": 0, "alpha": {"conv": 8}, "expert": "low_noise"},
    ]
    payload["events"] = []
    for row in payload["rows"]:
        row[13] = row[0] % 2
        row[9] = (1 if row[0] >= 150 else 0) if row[13] == 0 else 2
    layout = draw(page, payload)
    img = pixels(page)
    plot = layout["plot"]
    lanes = {b["name"]: b["lane"] for b in layout["bands"]}
    assert lanes == {"high_noise: hn_a": 0, "hn_b": 0, "low_noise: ln_a": 1}
    x = round(layout["xs"]["250"])
    top = mode_color(img[int(plot["y"] + 20):int(plot["y"] + plot["h"] / 2 - 2), x - 4:x + 5])
    bottom = mode_color(img[int(plot["y"] + plot["h"] / 2 + 20):int(plot["y"] + plot["h"] - 2), x - 4:x + 5])
    assert np.abs(top - over(t["background"], t["bands"][1], t["bandAlpha"])).max() <= 3
    assert np.abs(bottom - over(t["background"], t["bands"][2], t["bandAlpha"])).max() <= 3


def test_device_pixel_ratio_two(browser, server):
    p = _open(browser, f"{server}/page/index.html", dpr=2)
    try:
        t = theme(p)
        layout = draw(p, synthetic_payload())
        assert (layout["canvasWidth"], layout["canvasHeight"]) == (2 * CSS_W, 2 * CSS_H)
        img = pixels(p)
        expected = over(t["background"], t["bands"][1], t["bandAlpha"])
        assert np.abs(band_column_color(img, layout, 150, dpr=2) - expected).max() <= 3
        plot = layout["plot"]
        x = round(layout["xs"]["100"] * 2)
        strip = near(img[int(plot["y"] * 2):int((plot["y"] + plot["h"]) * 2), x - 3:x + 3], hex_rgb(t["transition"]), 6)
        assert strip.any(axis=1).sum() >= 0.35 * plot["h"] * 2
        assert not p.errors, p.errors
    finally:
        p.context.close()


# --- tests: MetricsPlot (live) ----------------------------------------------------------------------------

NEW_PLOT = """(opts) => { const c = document.getElementById('plot');
                          window.plot = new window.PT.MetricsPlot(c, opts || {});
                          window.plot.resize(640, 320); }"""
NEXT_FRAME = "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"


def test_live_append_redraws_on_next_frame(page):
    t = theme(page)
    payload = synthetic_payload()
    first = dict(payload, rows=payload["rows"][:150], events=payload["events"][:1])
    page.evaluate(NEW_PLOT)
    ev(page, "(p) => window.plot.setPayload(p)", first)
    page.evaluate(NEXT_FRAME)
    before = pixels(page)
    band2 = over(t["background"], t["bands"][2], t["bandAlpha"])
    assert not near(before, band2, 2).any()
    assert page.evaluate("() => window.plot.layout.xRange") == [0, 149]

    ev(page, "(rows) => window.plot.appendRows(rows)", payload["rows"][150:])
    ev(page, "(ev) => window.plot.update({events: ev})", payload["events"])
    page.evaluate(NEXT_FRAME)
    after = pixels(page)
    layout = page.evaluate("() => ({...window.plot.layout, xs: {250: window.plot.layout.xOf(250)}})")
    assert layout["xRange"] == [0, 299]
    assert np.abs(before - after).max(axis=-1).astype(bool).sum() > 1000
    x = round(layout["xs"]["250"])
    plot = layout["plot"]
    got = mode_color(after[int(plot["y"] + 20):int(plot["y"] + plot["h"] - 2), x - 4:x + 5])
    assert np.abs(got - band2).max() <= 3
    assert page.evaluate("() => window.plot.length") == 300


def test_live_messages_reset_and_columns_by_name(page):
    payload = synthetic_payload()
    page.evaluate(NEW_PLOT)
    # Columns in another order plus an unknown new column: values are looked up by name.
    order = list(reversed(COLUMNS)) + ["future_metric"]
    rows = [[dict(zip(COLUMNS, r)).get(c, 1.0) for c in order] for r in payload["rows"][:50]]
    ev(page, "(d) => window.plot.update(d)", {"node": "7", "reset": True, "columns": order, "rows": rows,
                                                   "phases": PHASES, "events": []})
    page.evaluate(NEXT_FRAME)
    got = page.evaluate("() => [window.plot.data.column('step').slice(0, 3), window.plot.data.column('loss')[10]]")
    assert got == [[0, 1, 2], pytest.approx(payload["rows"][10][1])]
    ev(page, "(d) => window.plot.update(d)", {"node": "7", "reset": True, "columns": COLUMNS,
                                                   "rows": payload["rows"][:5], "phases": PHASES})
    assert page.evaluate("() => window.plot.length") == 5
    page.evaluate("() => window.plot.update({reset: true, rows: []})")
    page.evaluate(NEXT_FRAME)
    assert page.evaluate("() => window.plot.layout.empty") is True


def test_hover_shows_tooltip_with_step_values(page):
    t = theme(page)
    payload = synthetic_payload()
    page.evaluate(NEW_PLOT)
    ev(page, "(p) => window.plot.setPayload(p)", payload)
    page.evaluate(NEXT_FRAME)
    box = page.locator("#plot").bounding_box()
    x = page.evaluate("() => window.plot.layout.xOf(150)")
    page.mouse.move(box["x"] + x + 0.4, box["y"] + 200)
    page.evaluate(NEXT_FRAME)
    layout = page.evaluate("() => window.plot.layout")
    lines = page.evaluate("() => window.plot.tooltipLines()")
    assert layout["hoverStep"] == 150
    assert lines[0] == "step 150 · balance"
    assert any(line.startswith("loss ") for line in lines)
    assert "α conv 14  linear 16" in lines
    tip = layout["tooltip"]
    img = pixels(page)
    region = img[int(tip["y"]) + 2:int(tip["y"] + tip["h"]) - 2, int(tip["x"]) + 2:int(tip["x"] + tip["w"]) - 2]
    assert near(region, hex_rgb(t["tooltipBg"]), 2).mean() > 0.5
    assert (np.abs(region - hex_rgb(t["tooltipBg"])).max(axis=-1) > 60).sum() > 50  # the text
    page.mouse.move(box["x"] + box["width"] + 50, box["y"] + 10)
    page.evaluate(NEXT_FRAME)
    assert page.evaluate("() => window.plot.tooltipLines()") == []
    assert not near(pixels(page), hex_rgb(t["tooltipBg"]), 1).any()


def test_legend_click_toggles_a_statistic(page):
    t = theme(page)
    page.evaluate("() => { window.toggled = []; }")
    page.evaluate("""() => { const c = document.getElementById('plot');
                             window.plot = new window.PT.MetricsPlot(c, {onToggle: (s) => window.toggled.push(s)});
                             window.plot.resize(640, 320); }""")
    ev(page, "(p) => window.plot.setPayload(p)", synthetic_payload())
    page.evaluate(NEXT_FRAME)
    r2 = hex_rgb(t["stats"]["loss_r2"])
    legend = page.evaluate("() => window.plot.layout.legend")
    plot = page.evaluate("() => window.plot.layout.plot")

    def r2_pixels():
        img = pixels(page)
        return near(img[int(plot["y"]):int(plot["y"] + plot["h"]), int(plot["x"]):int(plot["x"] + plot["w"])], r2, 6).sum()

    assert r2_pixels() == 0
    button = next(b for b in legend if b["key"] == "loss_r2")
    box = page.locator("#plot").bounding_box()
    page.mouse.click(box["x"] + button["x"] + button["w"] / 2, box["y"] + button["y"] + button["h"] / 2)
    page.evaluate(NEXT_FRAME)
    assert r2_pixels() > 200
    assert page.evaluate("() => window.toggled") == [{"loss_r2": True}]
    page.mouse.click(box["x"] + button["x"] + button["w"] / 2, box["y"] + button["y"] + button["h"] / 2)
    page.evaluate(NEXT_FRAME)
    assert r2_pixels() == 0


def test_decimate_payload_bounds_rows_and_keeps_transitions(page):
    payload = synthetic_payload(n=9000)
    for i, row in enumerate(payload["rows"]):
        row[9] = 0 if i < 3001 else 1 if i < 6007 else 2
    out = ev(page, "(p) => window.PT.decimatePayload(p, 2000)", payload)
    assert len(out["rows"]) <= 2000
    steps = [r[0] for r in out["rows"]]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == 8999
    assert {3001, 6007} <= set(steps)  # the first row of each phase survives
    val_steps = {r[0] for r in payload["rows"] if r[15] is not None}
    assert val_steps <= set(steps)


# --- the extension (web/phase_trainer.js) with ComfyUI test doubles ---------------------------------------

@pytest.fixture()
def ext_page(browser, server):
    p = _open(browser, f"{server}/page/extension.html")
    yield p
    assert not p.errors, p.errors
    p.context.close()


def test_extension_registers_for_our_nodes_only(ext_page):
    info = ext_page.evaluate("""() => {
        const h = window.harness;
        const a = h.create('PhaseTrainerTrain', 3), b = h.create('PhaseTrainerPlotMetrics', 4), k = h.create('KSampler', 5);
        return {name: h.extension.name, widgets: [a, b, k].map(n => n.widgets.map(w => [w.name, w.type])),
                serialize: a.widgets[0].options.serialize, minH: a.widgets[0].options.getMinHeight(), size: a.size};
    }""")
    assert info["name"] == "PhaseTrainer.MetricsPlot"
    assert info["widgets"] == [[["metrics_plot", "PT_PLOT"]], [["metrics_plot", "PT_PLOT"]], []]
    assert info["serialize"] is False
    assert info["size"][0] >= 420 and info["size"][1] >= info["minH"]


def test_extension_routes_live_messages_by_node_id_and_stores_bounded(ext_page):
    payload = synthetic_payload(n=5000)
    for i, row in enumerate(payload["rows"]):
        row[9] = min(2, i // 1700)
    ext_page.evaluate("() => { window.a = harness.create('PhaseTrainerTrain', 3); "
                      "window.b = harness.create('PhaseTrainerTrain', 4); }")
    msg = {"node": "3", "reset": True, "columns": COLUMNS, "rows": payload["rows"][:2500], "phases": PHASES,
           "events": [], "done": False}
    ev(ext_page, "(m) => harness.send(m)", msg)
    counts = ext_page.evaluate("() => [a.phaseTrainerPlot.plot.length, b.phaseTrainerPlot.plot.length]")
    assert counts == [2500, 0]
    ev(ext_page, "(m) => harness.send(m)", dict(msg, reset=False, rows=payload["rows"][2500:], done=True))
    stored = ext_page.evaluate("() => [a.phaseTrainerPlot.plot.length, a.properties.phase_trainer_last_metrics]")
    assert stored[0] == 5000
    assert 1000 < len(stored[1]["rows"]) <= 2000
    assert stored[1]["columns"] == COLUMNS
    # A reset for node 3 clears it and leaves node 4 alone.
    ev(ext_page, "(m) => harness.send(m)", dict(msg, node="4", rows=payload["rows"][:10]))
    ev(ext_page, "(m) => harness.send(m)", dict(msg, rows=[]))
    assert ext_page.evaluate("() => [a.phaseTrainerPlot.plot.length, b.phaseTrainerPlot.plot.length]") == [0, 10]


def test_extension_routes_live_messages_into_subgraphs_by_execution_id(ext_page):
    # Node 3 inside the subgraph of node 5 is "5:3" on the wire; a root-level node 3 must not get its rows.
    rows = synthetic_payload(n=20)["rows"]
    ext_page.evaluate("""() => {
        window.inner = harness.create('PhaseTrainerTrain', 3);
        window.root3 = harness.create('PhaseTrainerTrain', 3);
        const byId = (nodes) => ({getNodeById: (id) => nodes[String(id)] ?? null});
        const sub = {id: 5, subgraph: byId({3: inner})};
        harness.app.rootGraph = byId({3: root3, 5: sub});
    }""")
    msg = {"node": "5:3", "reset": True, "columns": COLUMNS, "rows": rows, "phases": PHASES, "events": [],
           "done": False}
    ev(ext_page, "(m) => harness.send(m)", msg)
    assert ext_page.evaluate("() => [inner.phaseTrainerPlot.plot.length, root3.phaseTrainerPlot.plot.length]") == [20, 0]
    ev(ext_page, "(m) => harness.send(m)", dict(msg, node="3", rows=rows[:7]))
    assert ext_page.evaluate("() => [inner.phaseTrainerPlot.plot.length, root3.phaseTrainerPlot.plot.length]") == [20, 7]
    ev(ext_page, "(m) => harness.send(m)", dict(msg, node="9:3", rows=rows[:4]))  # no such path: nobody
    assert ext_page.evaluate("() => [inner.phaseTrainerPlot.plot.length, root3.phaseTrainerPlot.plot.length]") == [20, 7]


def test_extension_restores_after_reload_and_resizes(ext_page):
    t = theme_from_ext(ext_page)
    payload = synthetic_payload()
    ev(ext_page, "(p) => { window.a = harness.create('PhaseTrainerTrain', 3);"
                      " a.onExecuted({phase_trainer_metrics: [p]}); }", payload)
    saved = ext_page.evaluate("() => JSON.parse(JSON.stringify({properties: a.properties}))")
    assert len(saved["properties"]["phase_trainer_last_metrics"]["rows"]) == 300
    # "Reload": a fresh node configured from the saved workflow shows the plot without any message.
    ev(ext_page, "(info) => { window.r = harness.create('PhaseTrainerTrain', 3); harness.configure(r, info); }",
                      saved)
    ext_page.evaluate(NEXT_FRAME)
    canvas = ".node-widget:nth-of-type(2) canvas"
    assert ext_page.evaluate("() => r.phaseTrainerPlot.plot.length") == 300
    img = pixels(ext_page, canvas)
    layout = ext_page.evaluate("() => { const l = r.phaseTrainerPlot.plot.layout; return {...l, xs: {150: l.xOf(150)}}; }")
    assert img.shape[:2] == (260, 480)  # follows the widget's box (ResizeObserver)
    assert np.abs(band_column_color(img, layout, 150) - over(t["background"], t["bands"][1], t["bandAlpha"])).max() <= 3
    # The node grows: the canvas follows.
    ext_page.evaluate("() => { document.querySelectorAll('.node-widget')[1].style.width = '600px'; }")
    ext_page.evaluate(NEXT_FRAME)
    ext_page.wait_for_function(f"document.querySelector('{canvas}').width === 600", timeout=5000)
    # Removing the node stops live updates reaching it.
    ext_page.evaluate("() => r.onRemoved()")
    ev(ext_page, "(m) => harness.send(m)", {"node": "3", "reset": True, "columns": COLUMNS, "rows": []})
    assert ext_page.evaluate("() => [a.phaseTrainerPlot.plot.length, r.phaseTrainerPlot]") == [0, None]


def theme_from_ext(page):
    return page.evaluate("async () => (await import('/web/plot.js')).THEME")


# --- screenshot for the README ---------------------------------------------------------------------------

def test_readme_screenshot(browser, server, tmp_path):
    """A realistic run drawn at 2x, with the stability toggle on and a hover tooltip, saved as PNG."""
    p = _open(browser, f"{server}/page/index.html", dpr=2)
    try:
        p.evaluate("() => { const c = document.getElementById('plot'); c.style.width = '760px'; c.style.height = '360px';"
                   " window.plot = new window.PT.MetricsPlot(c, {toggles: {gradient_stability: true}});"
                   " window.plot.resize(760, 360); }")
        ev(p, "(payload) => window.plot.setPayload(payload)", realistic_payload())
        p.evaluate(NEXT_FRAME)
        box = p.locator("#plot").bounding_box()
        x = p.evaluate("() => window.plot.layout.xOf(1650)")
        p.mouse.move(box["x"] + x, box["y"] + 150)
        p.evaluate(NEXT_FRAME)
        assert p.evaluate("() => window.plot.layout.hoverStep") == 1650
        out = tmp_path / "plot.png"
        p.locator("#plot").screenshot(path=str(out))
        from PIL import Image

        with Image.open(out) as im:
            assert im.size == (1520, 720)
            colors = len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0))
        assert colors > 500  # a real drawing, not a blank canvas
        target = os.environ.get("PT_SCREENSHOT_DIR")
        if target:
            Path(target).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out, Path(target) / "plot.png")
        assert not p.errors, p.errors
    finally:
        p.context.close()


def test_narrow_widget_wraps_the_legend_inside_the_canvas(page):
    page.evaluate("""() => { const c = document.getElementById('plot'); c.style.width = '300px'; c.style.height = '240px';
                             window.plot = new window.PT.MetricsPlot(c); window.plot.resize(300, 240); }""")
    ev(page, "(p) => window.plot.setPayload(p)", synthetic_payload())
    page.evaluate(NEXT_FRAME)
    layout = page.evaluate("() => window.plot.layout")
    assert {b["key"] for b in layout["legend"]} == {"loss_slope", "loss_r2", "loss_cv", "gradient_stability"}
    assert all(0 <= b["x"] and b["x"] + b["w"] <= 300 for b in layout["legend"]), layout["legend"]
    assert max(b["y"] + b["h"] for b in layout["legend"]) < layout["plot"]["y"]  # rows end above the plot
    assert layout["plot"]["x"] + layout["plot"]["w"] <= 300


def test_zoomed_widget_draws_at_the_zoomed_resolution_and_maps_the_mouse(page):
    """Inside ComfyUI the widget sits under the graph's CSS zoom: stay sharp and hover the right step."""
    page.evaluate("""() => { const c = document.getElementById('plot');
                             c.style.transformOrigin = '0 0'; c.style.transform = 'scale(2)';
                             window.plot = new window.PT.MetricsPlot(c); window.plot.resize(640, 320); }""")
    ev(page, "(p) => window.plot.setPayload(p)", synthetic_payload())
    page.evaluate(NEXT_FRAME)
    assert page.evaluate("() => [plot.canvas.width, plot.canvas.height, plot.layout.dpr]") == [1280, 640, 2]
    box = page.locator("#plot").bounding_box()  # the transformed (on-screen) box
    x = page.evaluate("() => window.plot.layout.xOf(200)")
    page.mouse.move(box["x"] + 2 * x + 0.8, box["y"] + 2 * 150)
    page.evaluate(NEXT_FRAME)
    assert page.evaluate("() => window.plot.layout.hoverStep") == 200


# --- stop advice, validation loss, two experts -------------------------------------------------------------

VAL_AT = {49: 0.25, 99: 0.21, 149: 0.18, 199: 0.17, 249: 0.175, 299: 0.18}


def advice_payload(detail="combined"):
    """synthetic_payload with a validation curve (best at step 199) and the stop advice firing at step 249.
    detail: "combined" (suggest_stop and a checkpoint at one step share one detail, as the loop logs them),
    "own" (the advice's detail alone) or None (a payload rebuilt from the metrics tensor: no details)."""
    payload = synthetic_payload()
    for row in payload["rows"]:
        row[15] = VAL_AT.get(row[0])
    advice = {"step": 249, "best_step": 199, "best_val_loss": 0.17, "val_loss": 0.175,
              "evaluations_without_improvement": 1, "trend": "plateau"}
    detail_value = {"combined": {"suggest_stop": advice, "checkpoint": {"path": "x"}}, "own": advice, None: None}[detail]
    payload["events"] = payload["events"] + [{"step": 249, "event": "suggest_stop", "detail": detail_value}]
    return payload


def draw_at(page, payload, steps, values=(), **opts):
    """drawMetrics; returns the layout with xs[step] and ys[value] (loss axis) for the steps and values asked."""
    return ev(page, """([payload, steps, values, opts]) => {
        const l = window.PT.drawMetrics(document.getElementById('plot'), payload, opts);
        const xs = {}, ys = {};
        for (const s of steps) xs[s] = l.xOf(s);
        for (const v of values) ys[v] = l.yOfLoss(v);
        return {...l, xs, ys};
      }""", [payload, list(steps), list(values), opts])


def plot_rows(layout):
    plot = layout["plot"]
    return int(plot["y"]), int(plot["y"] + plot["h"])


@pytest.mark.parametrize("detail", ["combined", "own", None])
def test_stop_advice_draws_a_dashed_line_a_star_and_a_label(page, detail):
    t = theme(page)
    stop = hex_rgb(t["stop"])
    layout = draw_at(page, advice_payload(detail), [50, 150, 199, 249], [0.17])
    img = pixels(page)
    y0, y1 = plot_rows(layout)
    # The line: dashed (7 on, 3 off) over the plot height in the advice's column, in its own colour.
    x = round(layout["xs"]["249"])
    rows = near(img[y0:y1, x - 2:x + 3], stop, 6).any(axis=1).sum()
    assert rows >= 0.55 * layout["plot"]["h"], rows
    for step in (50, 150):  # nowhere else
        xs = round(layout["xs"][str(step)])
        assert near(img[y0:y1, xs - 3:xs + 4], stop, 6).sum() == 0, step
    # The star on the best validation loss (step 199, 0.17): a filled blob, not a line.
    (mark,) = layout["stops"]
    assert (mark["step"], mark["bestStep"], mark["bestVal"]) == (249, 199, pytest.approx(0.17))
    sx, sy = round(layout["xs"]["199"]), round(layout["ys"]["0.17"])
    assert (mark["star"]["x"], mark["star"]["y"]) == (pytest.approx(layout["xs"]["199"]), pytest.approx(layout["ys"]["0.17"]))
    blob = near(img[sy - 8:sy + 9, sx - 8:sx + 9], stop, 6)
    assert blob.sum() >= 40 and blob.any(axis=0).sum() >= 9 and blob.any(axis=1).sum() >= 9, blob.sum()
    # "stop?" on a plate beside the line, and the advice in the legend.
    lab = mark["label"]
    label = img[int(lab["y"]):int(lab["y"] + lab["h"]), int(lab["x"]):int(lab["x"] + lab["w"])]
    assert near(label, stop, 40).sum() >= 15
    assert "stop? 249 · best 199" in layout["legendLabels"]


def test_without_stop_advice_nothing_is_drawn_in_its_colour(page):
    t = theme(page)
    payload = advice_payload()
    payload["events"] = [e for e in payload["events"] if e["event"] != "suggest_stop"]
    layout = draw_at(page, payload, [249])
    assert layout["stops"] == []
    assert near(pixels(page), hex_rgb(t["stop"]), 6).sum() == 0


def test_validation_loss_is_a_line_through_its_evaluations(page):
    t = theme(page)
    steps = [124, 174]  # midway between evaluations: only the connecting line can be there
    mids = [(VAL_AT[99] + VAL_AT[149]) / 2, (VAL_AT[149] + VAL_AT[199]) / 2]
    layout = draw_at(page, advice_payload(), steps, mids)
    img = pixels(page)
    assert layout["drawn"]["val"] == 6
    for step, v in zip(steps, mids):
        x, y = round(layout["xs"][str(step)]), round(layout["ys"][str(v)])
        assert near(img[y - 2:y + 3, x - 1:x + 2], hex_rgb(t["val"]), 8).any(), (step, v)


def test_stop_advice_tooltip_names_the_best_step(page):
    page.evaluate(NEW_PLOT)
    ev(page, "(p) => window.plot.setPayload(p)", advice_payload())
    page.evaluate(NEXT_FRAME)
    box = page.locator("#plot").bounding_box()
    x = page.evaluate("() => window.plot.layout.xOf(249)")
    page.mouse.move(box["x"] + x + 0.4, box["y"] + 200)
    page.evaluate(NEXT_FRAME)
    lines = page.evaluate("() => window.plot.tooltipLines()")
    assert "stop? best step 199 (val loss 0.17), plateau" in lines
    assert "val loss 0.175" in lines and any("suggest_stop" in line for line in lines)


def moe_payload(n=300, block=20):
    """A Wan 2.2 A14B run as the loop logs it: the experts take turns in blocks of `block` steps (high noise
    first), each with its own phases; high noise moves to 'balance' at step 140 (the last step of its block: a
    transition record already names the new phase), low noise never does."""
    rng = random.Random(3)
    rows = []
    for step in range(1, n + 1):
        expert = ((step - 1) // block) % 2
        phase = 1 if (expert == 0 and step >= 140) else 0
        loss = (0.35 if expert == 0 else 0.12) + 0.05 * math.exp(-step / 100) + rng.uniform(-0.01, 0.01)
        rows.append([step, loss, None, None, None, 0.7, 0.7, 1.0, 1e-4, phase, 0, [8, 14][phase], None, expert, None,
                     None])
    phases = [
        {"name": "foundation", "phase_idx": 0, "start_step": 1, "alpha": {"linear": 8}, "expert": "high_noise"},
        {"name": "foundation", "phase_idx": 0, "start_step": 21, "alpha": {"linear": 8}, "expert": "low_noise"},
        {"name": "balance", "phase_idx": 1, "start_step": 140, "alpha": {"linear": 14}, "expert": "high_noise"},
    ]
    events = [{"step": 140, "event": "transition",
               "detail": {"from_phase": "foundation", "to_phase": "balance", "expert": "high_noise"}}]
    return {"columns": COLUMNS, "rows": rows, "phases": phases, "events": events, "job": "moe"}


def test_two_experts_lanes_colours_and_a_transition_in_its_own_lane(page):
    t = theme(page)
    layout = draw_at(page, moe_payload(), [60, 140, 250])
    img = pixels(page)
    plot = layout["plot"]
    y0, y1 = plot_rows(layout)
    mid = int(plot["y"] + plot["h"] / 2)
    inside = img[y0:y1, int(plot["x"]):int(plot["x"] + plot["w"])]
    # two loss colours, each along most of the width (each expert has rows in every 40-step stretch)
    for color in t["loss"][:2]:
        assert near(inside, hex_rgb(color), 6).any(axis=0).sum() >= 0.6 * plot["w"], color
    assert [(b["name"], b["lane"]) for b in layout["bands"]] == [
        ("high_noise: foundation", 0), ("low_noise: foundation", 1), ("balance", 0)]
    # top lane: high noise, foundation then balance; bottom lane: low noise, foundation throughout
    x60, x250 = round(layout["xs"]["60"]), round(layout["xs"]["250"])
    band = [over(t["background"], t["bands"][i], t["bandAlpha"]) for i in (0, 1)]

    def lane_color(x, lane):
        top = int(plot["y"] + lane * plot["h"] / 2 + 20)
        return mode_color(img[top:top + int(plot["h"] / 2) - 24, x - 4:x + 5])

    assert np.abs(lane_color(x60, 0) - band[0]).max() <= 3
    assert np.abs(lane_color(x250, 0) - band[1]).max() <= 3
    assert np.abs(lane_color(x60, 1) - band[0]).max() <= 3  # the same first phase looks the same in both
    assert np.abs(lane_color(x250, 1) - band[0]).max() <= 3
    # the high-noise transition is marked in the high-noise lane only
    x = round(layout["xs"]["140"])
    marker = hex_rgb(t["transition"])
    assert near(img[y0:mid - 1, x - 2:x + 3], marker, 6).any(axis=1).sum() >= 0.35 * (mid - y0)
    assert near(img[mid + 1:y1, x - 2:x + 3], marker, 6).sum() == 0
    assert [(m["step"], m["lane"]) for m in layout["transitionMarks"]] == [(140, 0)]


def test_two_experts_tooltip_names_each_experts_phase(page):
    page.evaluate(NEW_PLOT)
    ev(page, "(p) => window.plot.setPayload(p)", moe_payload())
    page.evaluate(NEXT_FRAME)
    box = page.locator("#plot").bounding_box()
    for step, want in ((170, "high_noise · balance: loss "), (150, "low_noise · foundation: loss ")):
        x = page.evaluate(f"() => window.plot.layout.xOf({step})")
        page.mouse.move(box["x"] + x + 0.4, box["y"] + 200)
        page.evaluate(NEXT_FRAME)
        lines = page.evaluate("() => window.plot.tooltipLines()")
        assert lines[0] == f"step {step}" and any(line.startswith(want) for line in lines), lines


def test_extension_shows_the_runs_summary_under_the_plot_and_keeps_it(ext_page):
    payload = advice_payload()
    payload["summary"] = ["suggest stop at step 249: validation loss plateau for 1 evaluations; best step 199 "
                          "(val_loss 0.17)", "best LoRA (lowest validation loss): test_job_00001_best.safetensors"]
    ev(ext_page, "(p) => { window.a = harness.create('PhaseTrainerTrain', 3);"
                 " a.onExecuted({phase_trainer_metrics: [p]}); }", payload)
    ext_page.evaluate(NEXT_FRAME)
    caption = ext_page.evaluate("""() => { const c = a.phaseTrainerPlot.caption, r = c.getBoundingClientRect();
        return {text: c.innerText, visible: getComputedStyle(c).display !== 'none', h: r.height,
                canvasH: a.phaseTrainerPlot.canvas.getBoundingClientRect().height}; }""")
    assert caption["visible"] and caption["text"].splitlines() == payload["summary"]
    assert caption["h"] > 20 and abs(caption["canvasH"] + caption["h"] - 260) <= 1  # the plot makes room
    # stored with the workflow: a reload shows it again
    saved = ext_page.evaluate("() => JSON.parse(JSON.stringify({properties: a.properties}))")
    assert saved["properties"]["phase_trainer_last_metrics"]["summary"] == payload["summary"]
    ev(ext_page, "(info) => { window.r = harness.create('PhaseTrainerTrain', 3); harness.configure(r, info); }", saved)
    assert ext_page.evaluate("() => r.phaseTrainerPlot.caption.innerText").splitlines() == payload["summary"]
    # a new run (reset) clears it
    ev(ext_page, "(m) => harness.send(m)", {"node": "3", "reset": True, "columns": COLUMNS,
                                            "rows": payload["rows"][:5], "phases": PHASES, "events": []})
    assert ext_page.evaluate("() => getComputedStyle(a.phaseTrainerPlot.caption).display") == "none"
