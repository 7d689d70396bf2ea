"""Windowed statistics against NumPy and an exact rational reference; gradient sign agreement."""

import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from trainer.schedule.gradient_stability import GradientSignAgreement
from trainer.schedule.stats import EMA, RollingCV, WindowedRegression, bench_update_cost

RTOL = 1e-9


def close(a, b, rtol=RTOL, atol=0.0):
    return abs(a - b) <= rtol * abs(b) + atol


def numpy_fit(xs, ys):
    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    r2 = np.corrcoef(xs, ys)[0, 1] ** 2
    return slope, intercept, r2


def exact_fit(xs, ys):
    """OLS in exact rational arithmetic: the ground truth NumPy itself only approximates."""
    fx = [Fraction(x) for x in xs]
    fy = [Fraction(y) for y in ys]
    n = len(fx)
    mx, my = sum(fx) / n, sum(fy) / n
    cxx = sum((x - mx) ** 2 for x in fx)
    cyy = sum((y - my) ** 2 for y in fy)
    cxy = sum((x - mx) * (y - my) for x, y in zip(fx, fy))
    slope = cxy / cxx
    r2 = cxy * cxy / (cxx * cyy) if cyy else Fraction(0)
    return float(slope), float(my - slope * mx), float(r2), float(cxx), float(cyy)


def check_against_numpy(reg, xs, ys, window):
    wx, wy = xs[-window:], ys[-window:]
    slope, intercept, r2 = numpy_fit(wx, wy)
    assert close(reg.slope, slope), (reg.slope, slope)
    # The intercept at x ~ 1e5 is a difference of two large numbers in any implementation.
    assert close(reg.intercept, intercept, atol=1e-12 * abs(slope * np.mean(wx)) + 1e-15)
    assert close(reg.r2, r2), (reg.r2, r2)


def check_against_exact(reg, xs, ys, window):
    slope, intercept, r2, _, _ = exact_fit(xs[-window:], ys[-window:])
    assert close(reg.slope, slope) and close(reg.r2, r2), (reg.slope, slope, reg.r2, r2)
    assert close(reg.intercept, intercept, atol=1e-12 * abs(slope * xs[-1]))


@pytest.mark.parametrize("offset", [0, 100_000, 10_000_000])
def test_regression_matches_numpy_every_step_random_series(offset):
    # At step 1e7 np.polyfit itself is only ~3e-9 accurate (its Vandermonde matrix is ill-conditioned),
    # so there the reference is exact rational arithmetic (checked every 10th step: Fractions are slow).
    rng = np.random.default_rng(1)
    window = 200
    reg = WindowedRegression(window)
    xs, ys = [], []
    for i in range(900):  # > 4 windows: slides, exact recomputes and their drift all exercised
        x, y = offset + i, 0.1 + 0.02 * rng.standard_normal() - 2e-5 * i
        reg.add(x, y)
        xs.append(x)
        ys.append(y)
        if len(xs) < 20:
            assert reg.slope is None and reg.r2 is None and reg.intercept is None
        elif offset < 10_000_000:
            check_against_numpy(reg, xs, ys, window)
        elif i % 10 == 0:
            check_against_exact(reg, xs, ys, window)
    assert reg.n == window


def test_regression_needs_twenty_samples():
    reg = WindowedRegression(200)
    for i in range(19):
        reg.add(i, float(i % 3))
    assert (reg.slope, reg.r2, reg.intercept) == (None, None, None)
    reg.add(19, 0.5)
    assert reg.slope is not None and reg.r2 is not None


def test_constant_window_has_zero_slope_and_r2_not_nan():
    reg = WindowedRegression(50)
    for i in range(300):
        reg.add(100_000 + i, 0.123456789)
        if i >= 19:
            assert reg.slope == 0.0
            assert reg.r2 == 0.0
            assert reg.intercept == 0.123456789


def test_window_turning_constant_after_noise_is_exactly_flat():
    rng = np.random.default_rng(2)
    reg = WindowedRegression(40)
    for i in range(57):  # not a multiple of the window: the sums still carry add/remove rounding
        reg.add(i, float(rng.random()))
    for i in range(57, 97):
        reg.add(i, 0.7)
    assert reg.slope == 0.0 and reg.r2 == 0.0


def test_exact_line():
    reg = WindowedRegression(200)
    xs = [250_000 + i for i in range(450)]
    ys = [3.0 - 0.001 * (x - 250_000) for x in xs]
    for x, y in zip(xs, ys):
        reg.add(x, y)
    assert close(reg.slope, -0.001)
    assert close(reg.r2, 1.0)
    check_against_numpy(reg, xs, ys, 200)


def test_spike_leaving_the_window_does_not_leave_cancellation_error():
    # A loss spike 1e6 followed by a plateau with noise of 1e-7: naive running sums keep ~1e12 rounding
    # noise in the sum of squares after the spike leaves, wiping out the true variance (~1e-14 per sample).
    rng = np.random.default_rng(3)
    window = 50
    reg = WindowedRegression(window)
    xs, ys = [], []
    for i in range(60):
        y = 1.0e6 if i == 5 else 0.5 + 1e-7 * rng.standard_normal() - 1e-9 * i
        reg.add(100_000 + i, y)
        xs.append(100_000 + i)
        ys.append(y)
    slope, _, r2, _, _ = exact_fit(xs[-window:], ys[-window:])
    assert close(reg.slope, slope) and close(reg.r2, r2)
    check_against_numpy(reg, xs, ys, window)


def test_nonfinite_input_is_refused():
    reg = WindowedRegression(10)
    with pytest.raises(ValueError):
        reg.add(1, float("nan"))


@settings(max_examples=150, deadline=None)
@given(
    window=st.integers(20, 60),
    offset=st.sampled_from([0, 1_000, 100_000, 5_000_000]),
    # subnormal losses (5e-324) square to 0 in float64: no loss is ever that small, so they are out of scope
    ys=st.lists(st.floats(0.0, 10.0, allow_nan=False, allow_infinity=False, allow_subnormal=False),
                min_size=20, max_size=150),
    gaps=st.lists(st.integers(1, 3), min_size=150, max_size=150),
)
def test_regression_property_against_exact_arithmetic(window, offset, ys, gaps):
    xs = list(np.cumsum(gaps[: len(ys)]) + offset)  # steps with gaps: NaN losses are skipped by the scheduler
    xs = [int(x) for x in xs]
    reg = WindowedRegression(window)
    for x, y in zip(xs, ys):
        reg.add(x, y)
    wx, wy = xs[-window:], ys[-window:]
    slope, intercept, r2, cxx, cyy = exact_fit(wx, wy)
    # 1e-9 relative, with an absolute floor at float64 resolution of the quantities involved (an exactly
    # zero correlation has no relative error to speak of).
    slope_floor = 1e-12 * math.sqrt(cyy / cxx) if cyy else 0.0
    assert close(reg.slope, slope, atol=slope_floor), (reg.slope, slope)
    assert close(reg.r2, r2, atol=1e-12), (reg.r2, r2)
    assert close(reg.intercept, intercept, atol=1e-12 * (abs(slope) * max(wx) + max(wy)) + slope_floor * max(wx))


def test_regression_state_round_trip_is_bit_exact():
    rng = np.random.default_rng(4)
    a = WindowedRegression(200)
    for i in range(333):
        a.add(10_000 + i, float(rng.random()))
    b = WindowedRegression(200)
    b.load_state_dict(json.loads(json.dumps(a.state_dict(), allow_nan=False)))
    for i in range(333, 700):
        y = float(rng.random())
        a.add(10_000 + i, y)
        b.add(10_000 + i, y)
        assert (a.slope, a.r2, a.intercept) == (b.slope, b.r2, b.intercept)


def test_regression_state_into_other_window_keeps_newest_points():
    rng = np.random.default_rng(5)
    xs = list(range(150))
    ys = [float(v) for v in rng.random(150)]
    a = WindowedRegression(200)
    for x, y in zip(xs, ys):
        a.add(x, y)
    b = WindowedRegression(50)
    b.load_state_dict(a.state_dict())
    assert b.n == 50
    check_against_numpy(b, xs, ys, 50)


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_rolling_cv_matches_numpy(offset):
    rng = np.random.default_rng(6)
    cv = RollingCV(50)
    vals = []
    for i in range(400):
        v = offset + 0.1 + abs(rng.standard_normal()) * 0.05
        cv.add(v)
        vals.append(v)
        if len(vals) < 10:
            assert cv.value is None
        else:
            w = np.asarray(vals[-50:])
            assert close(cv.value, np.std(w) / np.mean(w)), (cv.value, np.std(w) / np.mean(w))


def test_rolling_cv_constant_and_zero_mean():
    cv = RollingCV(50)
    for _ in range(30):
        cv.add(0.25)
    assert cv.value == 0.0
    zero = RollingCV(50)
    for _ in range(30):
        zero.add(0.0)
    assert zero.value is None  # undefined: mean 0


def test_rolling_cv_state_round_trip():
    rng = np.random.default_rng(7)
    a = RollingCV(50)
    for v in rng.random(77):
        a.add(float(v))
    b = RollingCV(50)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for v in rng.random(80):
        a.add(float(v))
        b.add(float(v))
        assert a.value == b.value


def test_ema_matches_closed_form():
    rng = np.random.default_rng(8)
    ys = rng.random(300)
    ema = EMA(50)
    assert ema.value is None
    for y in ys:
        ema.add(float(y))
    a = 2 / 51
    n = len(ys)
    weights = np.array([a * (1 - a) ** (n - 1 - k) for k in range(n)])
    weights[0] = (1 - a) ** (n - 1)  # the first sample seeds the EMA
    assert close(ema.value, float(np.dot(weights, ys)))
    assert ema.n == 300


def test_ema_seeded_with_first_sample_and_round_trip():
    ema = EMA(10)
    ema.add(0.8)
    assert ema.value == 0.8
    ema.add(0.2)
    assert close(ema.value, 0.8 + (2 / 11) * (0.2 - 0.8))
    other = EMA(10)
    other.load_state_dict(json.loads(json.dumps(ema.state_dict())))
    ema.add(0.5)
    other.add(0.5)
    assert ema.value == other.value


def test_bench_update_cost_reports_both_sides():
    out = bench_update_cost(n=300)
    assert set(out) >= {"ours_us_per_update", "seed_us_per_update", "speedup"}
    assert out["ours_us_per_update"] > 0 and out["seed_us_per_update"] > 0


# -- gradient sign agreement ------------------------------------------------------------------------------

def _params(*shapes):
    return [torch.nn.Parameter(torch.zeros(s)) for s in shapes]


def test_sign_agreement_is_element_weighted_and_none_first():
    big, small = _params((10, 10), (1,))
    gsa = GradientSignAgreement()
    big.grad = torch.ones(10, 10)
    small.grad = torch.ones(1)
    assert gsa.update([big, small]) is None
    # 30 of 100 big elements flip; the single small one flips too: (70 + 0) / 101, not mean(0.7, 0.0)
    g = torch.ones(10, 10)
    g.view(-1)[:30] = -1
    big.grad = g
    small.grad = -torch.ones(1)
    out = gsa.update([big, small])
    assert isinstance(out, torch.Tensor) and out.dim() == 0 and out.dtype == torch.float32
    assert out.item() == pytest.approx(70 / 101, rel=1e-7)


def test_sign_agreement_zero_counts_as_not_positive():
    (p,) = _params((4,))
    gsa = GradientSignAgreement()
    p.grad = torch.tensor([1.0, -1.0, 0.0, 2.0])
    gsa.update([p])
    p.grad = torch.tensor([0.0, -3.0, -1.0, 1.0])  # 1>0 vs 0: differ; others agree
    assert gsa.update([p]).item() == pytest.approx(0.75)


def test_sign_agreement_skips_params_without_grad_and_keeps_their_sign():
    a, b = _params((3,), (5,))
    gsa = GradientSignAgreement()
    a.grad, b.grad = torch.ones(3), torch.ones(5)
    gsa.update([a, b])
    a.grad, b.grad = -torch.ones(3), None  # b's expert inactive this step
    assert gsa.update([a, b]).item() == pytest.approx(0.0)
    a.grad, b.grad = -torch.ones(3), torch.ones(5)  # b compared with its own last update: agrees
    assert gsa.update([a, b]).item() == pytest.approx(1.0)


def test_sign_agreement_near_half_for_independent_noise_and_one_for_fixed_direction():
    gen = torch.Generator().manual_seed(0)
    (p,) = _params((200, 500))
    gsa = GradientSignAgreement()
    p.grad = torch.randn(200, 500, generator=gen)
    gsa.update([p])
    p.grad = torch.randn(200, 500, generator=gen)
    assert abs(gsa.update([p]).item() - 0.5) < 0.01
    # A real optimizer run on a quadratic far from its minimum: the gradient keeps its direction.
    q = torch.nn.Parameter(torch.full((64,), 100.0))
    opt = torch.optim.SGD([q], lr=1e-3)
    gsa2 = GradientSignAgreement()
    values = []
    for _ in range(5):
        opt.zero_grad()
        (q ** 2).sum().backward()
        v = gsa2.update([q])
        opt.step()
        values.append(None if v is None else v.item())
    assert values[0] is None and values[1:] == [1.0] * 4


def test_sign_agreement_state_round_trip_through_safetensors(tmp_path):
    gen = torch.Generator().manual_seed(1)
    a, b = _params((8, 4), (16,))
    gsa = GradientSignAgreement()
    a.grad, b.grad = torch.randn(8, 4, generator=gen), torch.randn(16, generator=gen)
    gsa.update([a, b])
    save_file(gsa.state_dict(), tmp_path / "gsa.safetensors")
    resumed = GradientSignAgreement()
    resumed.load_state_dict(load_file(tmp_path / "gsa.safetensors"))
    a.grad, b.grad = torch.randn(8, 4, generator=gen), torch.randn(16, generator=gen)
    assert resumed.update([a, b]).item() == gsa.update([a, b]).item()


def test_sign_agreement_rejects_changed_parameter_list():
    gsa = GradientSignAgreement()
    (p,) = _params((3,))
    p.grad = torch.ones(3)
    gsa.update([p])
    (q,) = _params((4,))
    q.grad = torch.ones(4)
    with pytest.raises(ValueError, match="same parameters"):
        gsa.update([q])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to observe host syncs")
def test_sign_agreement_does_not_sync_with_host_on_cuda():
    a, b = (torch.nn.Parameter(torch.zeros(64, 64, device="cuda")) for _ in range(2))
    gsa = GradientSignAgreement()
    for step in range(3):
        a.grad = torch.randn(64, 64, device="cuda")
        b.grad = torch.randn(64, 64, device="cuda")
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = gsa.update([a, b])
        finally:
            torch.cuda.set_sync_debug_mode("default")
        if step:
            assert out.device.type == "cuda" and out.dim() == 0


def test_gradient_sign_agreement_undo_forgets_a_skipped_step():
    import torch

    from trainer.schedule.gradient_stability import GradientSignAgreement

    p = torch.nn.Parameter(torch.zeros(6))
    g = GradientSignAgreement()
    p.grad = torch.tensor([1.0, -1, 1, -1, 1, -1])
    g.update([p])
    p.grad = torch.full((6,), float("nan"))  # a bad step: NaN > 0 is False everywhere
    g.update([p])
    g.undo()
    p.grad = torch.tensor([1.0, -1, 1, -1, 1, -1])
    assert g.update([p]).item() == 1.0  # compared with the last good step, not the NaN one
