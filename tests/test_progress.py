"""The CPU recipes' console (steppo_verl/progress.py): a line per step, the full log, the end-of-run summary.

Metric lines are verl's console logger lines as a Ray actor prints them through the driver (colour codes and
the actor prefix included). The runs here are small Python commands that print such lines and write the
composed configuration where hydra would; the real recipe is run in tests/test_cpu_e2e.py.
"""

from __future__ import annotations

import io
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_inspect import embedded_data, write_demo_run

from steppo_verl.dev.runs import step_metrics
from steppo_verl.progress import (
    Outcome,
    main,
    progress_line,
    read_run_config,
    run_with_progress,
    step_table,
    steps_without_policy_gradient,
    summary,
    write_learning_curve,
)

pytestmark = pytest.mark.timeout(300)


def metric_line(step: int, reward: float, num_steps: float | None, ev: float | None, seconds: float) -> str:
    pairs = [("actor/pg_loss", -0.01), ("critic/score/mean", reward), ("critic/score/max", 1.0)]
    pairs += [("steppo/num_steps/mean", num_steps)] if num_steps is not None else []
    pairs += [("steppo/value_explained_var", ev)] if ev is not None else []
    pairs += [("timing_s/step", seconds)]
    body = " - ".join(f"{key}:{value}" for key, value in pairs)
    return f"\x1b[36m(TaskRunnerV1 pid=15060)\x1b[0m step:{step} - {body} - num_turns/mean:np.float64(5.5)"


STEPS = {1: metric_line(1, 0.171875, 2.78125, 0.010997, 53.6998), 2: metric_line(2, 0.5, 3.0, -0.25, 41.04)}
NOISE = "\x1b[36m(SimpleStorageUnit pid=1)\x1b[0m WARNING - target_num_threads 8 should not exceed total physical CPU"


def parsed(step: int) -> dict[str, float]:
    return step_metrics(STEPS[step])[step]


def write_config(hydra_dir: Path, run_dir: Path, dump_every: int = 1, save_freq: int = -1) -> None:
    """The part of hydra's composed configuration (``.hydra/config.yaml``) the summary reads."""
    (hydra_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    (hydra_dir / ".hydra" / "config.yaml").write_text(textwrap.dedent(f"""\
        trainer:
          project_name: steppo
          total_training_steps: 2
          save_freq: {save_freq}
          default_local_dir: {run_dir}/checkpoints
          steppo_dump: {{every_n_steps: {dump_every}, run_dir: null}}
        """))


# ----------------------------------------------------------------------------- progress line and table


def test_progress_line_shows_the_key_figures_of_a_verl_metric_line():
    line = progress_line(1, 2, parsed(1))
    assert line.startswith("step 1/2 [##########----------]")
    assert "reward 0.172" in line and "steps/traj 2.78" in line and "s/step 53.7" in line
    assert "value EV at step starts +0.01" in line
    assert progress_line(10, 10, parsed(1)).startswith("step 10/10 [####################]")
    assert progress_line(3, None, parsed(1)).startswith("step 3  reward")


def test_figures_a_run_does_not_report_show_as_a_dash():
    grpo = step_metrics(metric_line(1, 0.25, None, None, 12.0))[1]  # no critic, verl's own estimator
    line = progress_line(1, 2, grpo)
    assert "steps/traj - " in line and "value EV at step starts - " in line and "reward 0.250" in line


def test_the_reward_is_what_trajectories_earned_environment_rewards_included():
    # The environment loop's tasks score 0 and reward through the environment: the StepPO trainer's episode
    # reward is the figure; verl's outcome score where a run does not report one (verl's own estimators).
    env_task = {**parsed(1), "critic/score/mean": 0.0, "steppo/episode_reward/mean": 0.375}
    assert "reward 0.375" in progress_line(1, 2, env_task)
    assert step_table({1: env_task}).splitlines()[2].startswith("| 1 | 0.375 |")
    assert "reward 0.172" in progress_line(1, 2, parsed(1)), "no episode reward: verl's outcome score"


def test_nan_explained_variance_of_equal_returns_shows_as_NaN():
    flat = step_metrics(metric_line(1, 0.0, 1.0, float("nan"), 3.3))[1]  # every return 0: EV undefined
    assert "value EV at step starts NaN |" in progress_line(1, 2, flat)
    assert step_table({1: flat}).splitlines()[2] == "| 1 | 0.000 | 1.00 | NaN | 3.3 |"


def test_step_table_has_a_row_per_step_in_order():
    table = step_table({2: parsed(2), 1: parsed(1)}).splitlines()
    assert table[0] == "| step | reward | steps/traj | value EV at step starts | s/step |"
    assert table[2] == "| 1 | 0.172 | 2.78 | +0.01 | 53.7 |"
    assert table[3] == "| 2 | 0.500 | 3.00 | -0.25 | 41.0 |"
    assert len(table) == 4


# ----------------------------------------------------------------------------- summary


def test_summary_has_the_table_the_paths_and_a_report_that_renders(tmp_path):
    since = time.time() - 1
    write_config(tmp_path / "hydra", tmp_path)
    write_demo_run(tmp_path / "checkpoints")  # three dumps of real agent-loop episodes
    (tmp_path / "run.log").write_text("whole output\n")
    report = tmp_path / "report.html"
    text = summary({1: parsed(1), 2: parsed(2)}, read_run_config(tmp_path / "hydra", since), Outcome(0, 185.0),
                   tmp_path / "run.log", since, report=report)

    assert text.startswith("StepPO run finished (exit 0): 2 of 2 training steps in 3 min 05 s")
    assert step_table({1: parsed(1), 2: parsed(2)}) in text
    assert f"full log:        {tmp_path / 'run.log'}" in text
    assert "checkpoints:     none saved (trainer.save_freq=-1; set trainer.save_freq=N to save)" in text
    assert f"per-step dumps:  {tmp_path / 'checkpoints' / 'steppo_steps'} (3 files)" in text
    assert f"HTML report:     {report}" in text
    assert f"open it with:    python3 -m webbrowser -t {report.as_uri()}" in text
    data = embedded_data(report.read_text(encoding="utf-8"))
    assert {t["training_step"] for t in data["trajectories"]} == {10, 20, 30}


def stuck_step(step: int) -> dict[str, float]:
    """A step whose rollouts all earned 0: verl's policy loss is exactly 0 (every advantage 0)."""
    return {**parsed(1), "actor/pg_loss": 0.0, "critic/score/mean": 0.0}


def test_summary_names_the_steps_without_a_policy_gradient(tmp_path):
    (tmp_path / "run.log").write_text("whole output\n")
    steps = {1: parsed(1), 2: parsed(2), 3: stuck_step(3), 4: stuck_step(4), 5: stuck_step(5),
             6: {**parsed(2), "actor/pg_loss": -1e-12}, 7: stuck_step(7)}
    assert steps_without_policy_gradient(steps) == [3, 4, 5, 7]
    text = summary(steps, None, Outcome(0, 60.0), tmp_path / "run.log", time.time())
    assert "no policy gradient at steps 3-5, 7: every advantage was 0" in text
    assert "World 1 over eight seeds" in text  # where the README explains the trap
    once = summary({1: parsed(1), 2: stuck_step(2)}, None, Outcome(0, 60.0), tmp_path / "run.log", time.time())
    assert "no policy gradient at step 2:" in once


def test_a_run_that_learned_every_step_has_no_such_line(tmp_path):
    (tmp_path / "run.log").write_text("whole output\n")
    text = summary({1: parsed(1), 2: parsed(2)}, None, Outcome(0, 60.0), tmp_path / "run.log", time.time())
    assert "no policy gradient" not in text


def test_outputs_of_an_earlier_run_in_the_same_directories_are_not_reported(tmp_path):
    write_config(tmp_path / "hydra", tmp_path, dump_every=0, save_freq=5)
    write_demo_run(tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "global_step_5").mkdir()
    old = time.time() - 3600
    for path in [*(tmp_path / "checkpoints").rglob("*"), tmp_path / "checkpoints"]:
        os.utime(path, (old, old))
    since = time.time() - 1
    (tmp_path / "hydra" / ".hydra" / "config.yaml").touch()  # this run's configuration
    text = summary({1: parsed(1)}, read_run_config(tmp_path / "hydra", since), Outcome(0, 20.0),
                   tmp_path / "run.log", since, report=tmp_path / "report.html")
    assert "checkpoints:     none saved (trainer.save_freq=5" in text
    assert "per-step dumps:  none (trainer.steppo_dump.every_n_steps=0" in text
    assert "HTML report:     not made (no per-step dumps)" in text and not (tmp_path / "report.html").exists()


def test_saved_checkpoints_are_listed(tmp_path):
    since = time.time() - 1
    write_config(tmp_path / "hydra", tmp_path, save_freq=1)
    for step in (1, 2):
        (tmp_path / "checkpoints" / f"global_step_{step}").mkdir(parents=True)
    text = summary({}, read_run_config(tmp_path / "hydra", since), Outcome(0, 5.0), tmp_path / "run.log", since)
    assert f"checkpoints:     {tmp_path / 'checkpoints'} (global_step_1, global_step_2)" in text
    assert "no training step finished" in text


def test_a_stale_configuration_is_not_taken_for_this_runs(tmp_path):
    write_config(tmp_path / "hydra", tmp_path)
    assert read_run_config(tmp_path / "hydra", since=time.time() + 60) is None
    text = summary({}, None, Outcome(1, 5.0), tmp_path / "run.log", time.time())
    assert "StepPO run FAILED (exit 1)" in text
    assert "outputs:         unknown: the run stopped before hydra composed its configuration" in text


def test_learning_curve_png_is_written_next_to_the_report(tmp_path):
    pytest.importorskip("matplotlib")
    since = time.time() - 1
    write_config(tmp_path / "hydra", tmp_path, dump_every=0)
    curve = tmp_path / "learning_curve.png"
    text = summary({1: parsed(1), 2: parsed(2)}, read_run_config(tmp_path / "hydra", since), Outcome(0, 60.0),
                   tmp_path / "run.log", since, report=tmp_path / "report.html", curve=curve)
    assert text.endswith(f"learning curve:  {curve}")
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_learning_curve_is_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    line = write_learning_curve({1: parsed(1)}, tmp_path / "learning_curve.png")
    assert "not drawn (matplotlib is not installed" in line and not (tmp_path / "learning_curve.png").exists()
    nothing = write_learning_curve({1: {}}, tmp_path / "c.png")
    assert "no step reported steppo/episode_reward/mean or critic/score/mean" in nothing


# ----------------------------------------------------------------------------- running a command

# Prints what a training run prints (noise, then a metric line per step) and writes its composed
# configuration into hydra.run.dir, as hydra does; fails with a traceback when asked to.
FAKE_RUN = """
import sys, pathlib
hydra_dir = pathlib.Path(sys.argv[1].split("=", 1)[1])
(hydra_dir / ".hydra").mkdir(parents=True, exist_ok=True)
(hydra_dir / ".hydra" / "config.yaml").write_text(sys.argv[2])
for line in sys.argv[3:]:
    print(line, flush=True)
if sys.argv[-1].startswith("ValueError"):
    sys.exit(3)
"""


def fake_run(tmp_path: Path, *lines: str) -> list[str]:
    config = f"trainer: {{total_training_steps: 2, save_freq: -1, default_local_dir: {tmp_path}/checkpoints}}"
    return [sys.executable, "-c", FAKE_RUN, f"hydra.run.dir={tmp_path / 'hydra'}", config, *lines]


def test_compact_console_shows_a_line_per_step_and_the_log_keeps_everything(tmp_path):
    console = io.StringIO()
    cmd = fake_run(tmp_path, NOISE, STEPS[1], NOISE, STEPS[2])
    assert run_with_progress(cmd, tmp_path / "logs" / "run.log", console, mode="compact") == 0
    shown = console.getvalue()
    assert NOISE not in shown and "step:1 -" not in shown
    assert [line for line in shown.splitlines() if line.startswith("step ")] == [
        progress_line(1, 2, parsed(1)), progress_line(2, 2, parsed(2))]
    assert "StepPO run finished (exit 0): 2 of 2 training steps" in shown
    assert step_table({1: parsed(1), 2: parsed(2)}) in shown
    assert f"full log:        {tmp_path / 'logs' / 'run.log'}" in shown
    assert (tmp_path / "logs" / "run.log").read_text().splitlines() == [NOISE, STEPS[1], NOISE, STEPS[2]]


def test_full_console_keeps_verls_metric_lines_for_parsers(tmp_path):
    console = io.StringIO()
    assert run_with_progress(fake_run(tmp_path, NOISE, STEPS[1], STEPS[2]), tmp_path / "run.log", console,
                             mode="full") == 0
    assert step_metrics(console.getvalue()) == {1: parsed(1), 2: parsed(2)}, "benchmarks parse the console"
    assert NOISE in console.getvalue() and "StepPO run finished" in console.getvalue()


def test_a_failed_command_shows_its_last_log_lines_and_keeps_its_exit_status(tmp_path):
    console = io.StringIO()
    cmd = fake_run(tmp_path, STEPS[1], "Traceback (most recent call last):", "ValueError: bad override")
    assert run_with_progress(cmd, tmp_path / "run.log", console, mode="compact") == 3
    shown = console.getvalue()
    assert "ValueError: bad override" in shown and "StepPO run FAILED (exit 3): 1 of 2 training steps" in shown


def test_a_command_without_hydra_run_dir_is_refused_with_what_to_add(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--log", str(tmp_path / "run.log"), "--", sys.executable, "-c", "pass"])
    assert "sets no hydra.run.dir=DIR" in capsys.readouterr().err
    assert not (tmp_path / "run.log").exists(), "nothing ran"
    with pytest.raises(SystemExit):
        main(["--log", str(tmp_path / "run.log")])
    assert "no training command" in capsys.readouterr().err
