"""LR schedules against hand-computed values (peak 1e-3, floor 1e-4, W=10, S=20, D=10)."""
import pytest
import torch

from plm.errors import PLMError
from plm.train.schedule import ScheduleConfig, lr_at, make_scheduler, plot_schedule


def wsdc(shape: str, **kw) -> ScheduleConfig:
    args = dict(kind="wsdc", peak_lr=1e-3, floor_lr=1e-4, warmup_steps=10, stable_steps=20,
                decay_steps=10, decay_shape=shape)
    args.update(kw)
    return ScheduleConfig(**args)


# Shape-independent points: warmup, stable, start of decay, constant tail.
COMMON = {0: 0.0, 5: 5e-4, 9: 9e-4, 10: 1e-3, 20: 1e-3, 29: 1e-3, 30: 1e-3, 40: 1e-4, 41: 1e-4, 100: 1e-4}
# Decay at p = 0.5 (t=35) and p = 0.8 (t=38), computed by hand:
#   linear  1e-4 + 9e-4*(1-p)                0.5 -> 5.5e-4         0.8 -> 2.8e-4
#   cosine  1e-4 + 9e-4*0.5*(1+cos(pi p))    0.5 -> 5.5e-4         0.8 -> 1e-4+9e-4*0.0954915 = 1.8594235e-4
#   1-sqrt  1e-4 + 9e-4*(1-sqrt(p))          0.5 -> 1e-4+9e-4*0.29289322 = 3.6360390e-4
#                                            0.8 -> 1e-4+9e-4*0.10557281 = 1.9501553e-4
#   exp     1e-3 * 0.1**p                    0.5 -> 3.1622777e-4       0.8 -> 1.5848932e-4
DECAY = {
    "linear": {35: 5.5e-4, 38: 2.8e-4},
    "cosine": {35: 5.5e-4, 38: 1.8594235e-4},
    "1-sqrt": {35: 3.6360390e-4, 38: 1.9501553e-4},
    "exp": {35: 3.1622777e-4, 38: 1.5848932e-4},
}


@pytest.mark.parametrize("shape", sorted(DECAY))
def test_wsdc_values(shape):
    cfg = wsdc(shape)
    for t, want in {**COMMON, **DECAY[shape]}.items():
        assert lr_at(cfg, t) == pytest.approx(want, rel=1e-6, abs=1e-12), (shape, t)


@pytest.mark.parametrize("shape", sorted(DECAY))
def test_wsd_is_wsdc_ending_at_total(shape):
    cfg = ScheduleConfig(kind="wsd", peak_lr=1e-3, floor_lr=1e-4, warmup_steps=10, decay_steps=10,
                         decay_shape=shape, total_steps=40)
    assert cfg.phases() == (10, 20, 10, shape)
    for t, want in {**COMMON, **DECAY[shape]}.items():
        assert lr_at(cfg, t) == pytest.approx(want, rel=1e-6, abs=1e-12), (shape, t)


def test_cosine_kind():
    # W=10, total 110 -> cosine over 100 steps from 1e-3 to 0.
    cfg = ScheduleConfig(kind="cosine", peak_lr=1e-3, floor_lr=0.0, warmup_steps=10, total_steps=110)
    expected = {0: 0.0, 5: 5e-4, 10: 1e-3, 35: 8.5355339e-4, 60: 5e-4, 110: 0.0, 500: 0.0}
    for t, want in expected.items():
        assert lr_at(cfg, t) == pytest.approx(want, rel=1e-6, abs=1e-12), t


def test_no_warmup_starts_at_peak():
    cfg = wsdc("linear", warmup_steps=0)
    assert lr_at(cfg, 0) == 1e-3


def test_lambdalr_follows_lr_at():
    cfg = wsdc("cosine")
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([param], lr=123.0)  # overwritten with peak by make_scheduler
    sched = make_scheduler(opt, cfg)
    seen = []
    for _ in range(45):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(cfg, t) for t in range(45)], rel=1e-9, abs=1e-15)

    # Resume: a fresh scheduler loaded from the state dict continues on the same curve.
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    sched2 = make_scheduler(opt2, cfg)
    sched2.load_state_dict(sched.state_dict())
    opt2.param_groups[0]["lr"] = sched2.get_last_lr()[0]
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr_at(cfg, 45))


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(stable_steps=-5), "stable_steps"),
        (dict(decay_steps=-1), "decay_steps"),
        (dict(floor_lr=2e-3), "floor_lr"),
        (dict(floor_lr=-1e-5), "floor_lr"),
        (dict(peak_lr=0.0, floor_lr=0.0), "peak_lr"),
        (dict(decay_shape="square"), "decay_shape"),
        (dict(decay_shape="exp", floor_lr=0.0), "exp"),
        (dict(kind="onecycle"), "kind"),
    ],
)
def test_validation(kw, words):
    with pytest.raises(PLMError, match=words):
        wsdc("linear", **kw)


def test_validation_derived_lengths():
    with pytest.raises(PLMError, match="total_steps"):
        ScheduleConfig(kind="wsd", warmup_steps=10, decay_steps=10)
    with pytest.raises(PLMError, match="exceed total_steps"):
        ScheduleConfig(kind="wsd", warmup_steps=10, decay_steps=40, total_steps=40)
    with pytest.raises(PLMError, match="stable_steps"):
        ScheduleConfig(kind="wsd", warmup_steps=10, stable_steps=5, decay_steps=10, total_steps=40)
    with pytest.raises(PLMError, match="warmup_steps"):
        ScheduleConfig(kind="cosine", warmup_steps=20, total_steps=10)
    with pytest.raises(PLMError, match="step"):
        lr_at(wsdc("linear"), -1)


def test_plot_writes_png(tmp_path):
    out = plot_schedule(wsdc("1-sqrt"), tmp_path / "sub" / "lr.png")
    data = out.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    out2 = plot_schedule(ScheduleConfig(kind="cosine", warmup_steps=5, total_steps=50), tmp_path / "c.png", steps=80)
    assert out2.stat().st_size > 1000


def test_lr_plot_shows_every_step_of_a_short_warmup():
    """The trainer logs each phase's schedule, so the plotted LR has every step even when losses
    are logged every 5 steps: a 3-step warmup is visible."""
    from plm.train.plots import lr_series
    cfg = ScheduleConfig(kind="wsdc", peak_lr=1e-3, floor_lr=1e-4, warmup_steps=3, stable_steps=4, decay_steps=3)
    metrics = [{"phase": "a", "step": 0, "phase_steps": 12, "schedule": cfg.to_dict()}]
    metrics += [{"phase": "a", "step": s, "loss": 1.0, "lr": lr_at(cfg, s - 1)} for s in (5, 10, 12)]
    xs, ys = lr_series(metrics)
    assert xs == list(range(1, 13)) and ys[:4] == pytest.approx([0.0, 1e-3 / 3, 2e-3 / 3, 1e-3])
    assert lr_series(metrics[1:]) == ([5, 10, 12], [m["lr"] for m in metrics[1:]])  # older logs: as logged
