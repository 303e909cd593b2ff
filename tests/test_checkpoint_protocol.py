"""No lost training work: a crash injected at every step of the save-and-prune sequence, a
re-save of an existing step, damaged newest checkpoints, a fresh start over a longer finished run,
a torn metrics log. After each, a loadable checkpoint exists and a rerun reproduces the
uninterrupted run's losses exactly."""
import json
import shutil

import pytest

from plm.train import checkpointing as ck
from test_train import data, losses, recipe, reference, run  # noqa: F401  (shared fixtures)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("point", ck.CRASH_POINTS)
def test_a_kill_anywhere_in_a_save_loses_nothing(data, reference, tmp_path, point):  # noqa: F811
    run_dir = tmp_path / "run"
    rec = recipe(data, run_dir, ckpt_every=2)  # keep_last=2: saving step 6 prunes step 2
    r = run(["pretrain", rec], env={"PLM_TEST_KILL_IN_SAVE": f"6:{point}"})
    assert r.returncode == -9, r.stderr[-2000:]
    st = ck.load_latest(run_dir)  # repairs, then loads the newest whole checkpoint
    assert st is not None and ck.step_of(st["path"]) == (4 if point in ("model", "state") else 6)
    left = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert not any(n.startswith((".tmp-", ".old-")) for n in left), left
    r = run(["pretrain", rec])
    assert r.returncode == 0, r.stderr[-2000:]
    assert losses(run_dir) == losses(reference)


def _fake_checkpoint(path, payload: str, marker: bool = True):
    path.mkdir(parents=True)
    (path / "model.safetensors").write_text(payload)
    if marker:
        (path / ck.MARKER).write_text(path.name)


def test_resaving_a_step_keeps_a_whole_copy_at_every_moment(tmp_path):
    """The states a kill can leave while step-N is re-saved (rerunning a finished run), repaired."""
    root = tmp_path / "checkpoints"
    # killed after moving the old step-N aside, before the new one was renamed in
    _fake_checkpoint(root / ".old-step-0000004", "old")
    _fake_checkpoint(root / ".tmp-step-0000004", "new")
    ck.repair(tmp_path)
    assert (root / "step-0000004" / "model.safetensors").read_text() in ("old", "new")
    assert sorted(p.name for p in root.iterdir()) == ["step-0000004"]
    # killed after the new one was renamed in, before the old copy was removed
    _fake_checkpoint(root / ".old-step-0000004", "old")
    ck.repair(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step-0000004"]
    # killed while writing: an incomplete folder is dropped, a complete one published
    _fake_checkpoint(root / ".tmp-step-0000006", "half", marker=False)
    _fake_checkpoint(root / ".tmp-step-0000008", "whole")
    ck.repair(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step-0000004", "step-0000008"]


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(data, reference, tmp_path, capsys):  # noqa: F811
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    dirs = ck.checkpoint_dirs(run_dir)
    assert [d.name for d in dirs] == ["step-0000009", "step-0000011"]
    (dirs[-1] / "model.safetensors").write_bytes((dirs[-1] / "model.safetensors").read_bytes()[:1000])
    st = ck.load_latest(run_dir)
    assert st["path"] == dirs[0] and "is damaged" in capsys.readouterr().err
    (dirs[0] / ck.STATE_FILE).write_bytes(b"")
    with pytest.raises(Exception, match="no checkpoint can be read"):
        ck.load_latest(run_dir)


def test_no_resume_over_a_longer_finished_run_keeps_the_new_work(data, reference, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)  # 11 steps, checkpoints up to step 11
    rec = recipe(data, run_dir)
    r = run(["pretrain", rec, "--no-resume", "--set", "phases.1.tokens=256", "--set", "phases.1.schedule.stable=0",
             "--set", "phases.1.schedule.decay=1"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "removed 2 earlier checkpoint(s)" in r.stdout
    steps = [ck.step_of(d) for d in ck.checkpoint_dirs(run_dir)]
    assert max(steps) == 8  # 6 + 2 steps; nothing of the longer run is left to be mistaken for ours
    from plm.utils import sha256_file
    assert sha256_file(run_dir / "final/model.safetensors") == sha256_file(run_dir / "checkpoints/step-0000008/model.safetensors")
    assert [s for _, s, _ in losses(run_dir)] == list(range(1, 9))  # the log starts over too


def test_a_torn_metrics_line_and_a_restart_without_checkpoints(data, reference, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"phase": "p2", "step": 12, "lo')  # killed mid-line
    from plm.train.trainer import read_metrics
    assert read_metrics(run_dir)[-1]["step"] == 11
    shutil.rmtree(run_dir / "checkpoints")
    r = run(["pretrain", recipe(data, run_dir)])  # no checkpoint: starts over
    assert r.returncode == 0, r.stderr[-2000:]
    steps = [json.loads(x).get("step") for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == list(range(1, 12))  # each step once
    assert losses(run_dir) == losses(reference)

