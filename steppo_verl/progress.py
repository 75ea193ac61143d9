"""A training run's console a person can read: ``python -m steppo_verl.progress [options] -- CMD ...``.

Runs ``CMD`` (a ``python -m steppo_verl.main ... hydra.run.dir=DIR`` command; the CPU recipes use it) and

- writes every line of its output to the full log (``--log``): nothing is dropped;
- shows on the console either one line per training step (``compact``: step i/N with a bar, the reward,
  steps per trajectory, the critic's explained variance at step starts, seconds per step) or the whole
  output (``full``); ``auto`` (the default) is compact on a terminal and full otherwise, so tests and
  benchmarks that parse verl's metric lines from a recipe's output keep reading them;
- ends with a summary: the per-step table, where the full log, the checkpoints and the per-step dumps
  are, the HTML report (built from this run's dumps, ``--report``) and the command that opens it, and
  with ``--curve`` the learning curve (success per step) as a PNG when matplotlib is installed.

Metric lines are read with :func:`steppo_verl.dev.runs.step_metrics`; paths and settings come from the
configuration hydra composed for this run (``DIR/.hydra/config.yaml``), so overrides are honoured.
Exits with the command's exit status.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from omegaconf import OmegaConf

from steppo_verl.dev.runs import step_metrics
from steppo_verl.inspect.records import RECORDS_DIR
from steppo_verl.inspect.report import build_report

__all__ = ["KEY_FIGURES", "Outcome", "RunConfig", "progress_line", "read_run_config", "run_with_progress",
           "step_table", "steps_without_policy_gradient", "summary", "write_learning_curve"]

CONSOLE_MODES = ("auto", "compact", "full")
# What a step's rollouts earned: the StepPO trainer's episode reward (outcome score plus environment rewards) where
# the estimator is one of ours; verl's outcome score otherwise (its own estimators). They agree where a task has no
# environment rewards; the environment loop's tasks score 0 and reward through the environment.
REWARD = ("steppo/episode_reward/mean", "critic/score/mean")
BAR_WIDTH = 20
POLICY_LOSS = "actor/pg_loss"  # verl's policy-gradient loss of the step (the KL term apart)
FAILED_TAIL_LINES = 30


@dataclass(frozen=True)
class Figure:
    """One key figure of a training step: its column title, the metric (the first of ``metrics`` the step
    reports) and its format."""

    title: str
    metrics: tuple[str, ...]
    fmt: str

    def value(self, step: dict[str, float]) -> float | None:
        return next((step[name] for name in self.metrics if name in step), None)


# The numbers to watch while a run trains; "-" where a run does not report one (no critic: no EV;
# verl's own estimators: no step count).
REWARD_FIGURE = Figure("reward", REWARD, "{:.3f}")  # also the learning curve's
KEY_FIGURES = (
    REWARD_FIGURE,
    Figure("steps/traj", ("steppo/num_steps/mean",), "{:.2f}"),
    Figure("value EV at step starts", ("steppo/value_explained_var",), "{:+.2f}"),
    Figure("s/step", ("timing_s/step",), "{:.1f}"),
)


def _format(metrics: dict[str, float], figure: Figure) -> str:
    value = figure.value(metrics)
    if value is None:
        return "-"
    return "NaN" if math.isnan(value) else figure.fmt.format(value)  # NaN: e.g. EV of returns that are all equal


def progress_line(step: int, total: int | None, metrics: dict[str, float]) -> str:
    """``step  3/10 [######--------------]  reward 0.172 | steps/traj 2.78 | ...`` for one training step."""
    if total:
        done = min(BAR_WIDTH, round(BAR_WIDTH * step / total))
        head = f"step {step:>{len(str(total))}}/{total} [{'#' * done}{'-' * (BAR_WIDTH - done)}]"
    else:
        head = f"step {step}"
    return head + "  " + " | ".join(f"{figure.title} {_format(metrics, figure)}" for figure in KEY_FIGURES)


def step_table(steps: dict[int, dict[str, float]]) -> str:
    """The key figures of every training step as a markdown table (steps in order)."""
    lines = ["| step | " + " | ".join(figure.title for figure in KEY_FIGURES) + " |",
             "|---:|" + "---:|" * len(KEY_FIGURES)]
    for step in sorted(steps):
        lines.append(f"| {step} | " + " | ".join(_format(steps[step], figure) for figure in KEY_FIGURES) + " |")
    return "\n".join(lines)


def steps_without_policy_gradient(steps: dict[int, dict[str, float]]) -> list[int]:
    """The training steps whose policy loss was exactly 0: every advantage was 0 (a batch, or every group, of equal
    returns), so the policy learned nothing from its rollouts. A loss that is merely small is never exactly 0."""
    return [step for step in sorted(steps) if steps[step].get(POLICY_LOSS) == 0.0]


def _step_ranges(steps: list[int]) -> str:
    """``[3, 4, 5, 8]`` as ``3-5, 8``."""
    runs: list[list[int]] = []
    for step in steps:
        if runs and step == runs[-1][-1] + 1:
            runs[-1].append(step)
        else:
            runs.append([step])
    return ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)


# ----------------------------------------------------------------------------- the run's configuration


@dataclass(frozen=True)
class RunConfig:
    """What the summary needs from the configuration hydra composed for the run."""

    total_steps: int | None
    checkpoint_dir: Path | None  # trainer.default_local_dir
    save_freq: int
    dump_dir: Path | None  # trainer.steppo_dump.run_dir, else the checkpoint dir
    dump_every_n_steps: int


def hydra_run_dir(cmd: list[str]) -> Path:
    """The ``hydra.run.dir=DIR`` of a training command (the last one wins, as in hydra)."""
    dirs = [arg.split("=", 1)[1] for arg in cmd if arg.startswith("hydra.run.dir=")]
    if not dirs:
        raise ValueError("the training command sets no hydra.run.dir=DIR: the summary reads the run's composed "
                         "configuration from DIR/.hydra/config.yaml; add hydra.run.dir=DIR to the command")
    return Path(dirs[-1])


def read_run_config(hydra_dir: Path, since: float) -> RunConfig | None:
    """The run's configuration from ``hydra_dir/.hydra/config.yaml``; None if this run (started at the
    ``since`` timestamp) did not write one (it failed before hydra composed it)."""
    path = hydra_dir / ".hydra" / "config.yaml"
    if not path.is_file() or path.stat().st_mtime < since:
        return None
    config = OmegaConf.load(path)

    def select(key: str, default=None):
        value = OmegaConf.select(config, key, default=default, throw_on_resolution_failure=False)
        return default if value is None else value

    checkpoint_dir = select("trainer.default_local_dir")
    dump_dir = select("trainer.steppo_dump.run_dir", checkpoint_dir)
    return RunConfig(
        total_steps=select("trainer.total_training_steps"),
        checkpoint_dir=Path(checkpoint_dir).absolute() if checkpoint_dir else None,
        save_freq=int(select("trainer.save_freq", -1)),
        dump_dir=Path(dump_dir).absolute() if dump_dir else None,
        dump_every_n_steps=int(select("trainer.steppo_dump.every_n_steps", 0)),
    )


# ----------------------------------------------------------------------------- the run's outputs


def _written_since(paths: Iterable[Path], since: float) -> list[Path]:
    # A directory reused by an earlier run holds its files too: only this run's count.
    return sorted(path for path in paths if path.stat().st_mtime >= since)


def checkpoints_line(config: RunConfig, since: float) -> str:
    saved = _written_since(config.checkpoint_dir.glob("global_step_*"), since) if config.checkpoint_dir else []
    if saved:
        return f"checkpoints:     {config.checkpoint_dir} ({', '.join(path.name for path in saved)})"
    return f"checkpoints:     none saved (trainer.save_freq={config.save_freq}; set trainer.save_freq=N to save)"


def dumped_records(config: RunConfig, since: float) -> list[Path]:
    """This run's per-step record files (``DUMP_DIR/steppo_steps/step_NNNNNN.parquet``)."""
    if config.dump_dir is None:
        return []
    return _written_since((config.dump_dir / RECORDS_DIR).glob("step_*.parquet"), since)


def dumps_line(config: RunConfig, records: list[Path]) -> str:
    if records:
        return f"per-step dumps:  {config.dump_dir / RECORDS_DIR} ({len(records)} files)"
    return (f"per-step dumps:  none (trainer.steppo_dump.every_n_steps={config.dump_every_n_steps}; "
            "set it to N to dump every N-th step)")


def report_lines(config: RunConfig, records: list[Path], report: Path) -> list[str]:
    """Build the HTML report from this run's dumps; where it is and how to open it."""
    if not records:
        return ["HTML report:     not made (no per-step dumps)"]
    try:
        path = build_report(config.dump_dir, report).absolute()
    except (OSError, ValueError) as error:  # an unreadable or malformed record file
        return [f"HTML report:     failed: {error} (python -m steppo_verl.inspect {config.dump_dir} --out {report})"]
    return [f"HTML report:     {path}", f"open it with:    python3 -m webbrowser -t {path.as_uri()}"]


def write_learning_curve(steps: dict[int, dict[str, float]], path: Path) -> str:
    """Success (mean reward of the step's rollouts) per training step as a PNG; returns the summary line."""
    values = {step: REWARD_FIGURE.value(metrics) for step, metrics in steps.items()}
    points = sorted((step, value) for step, value in values.items() if value is not None)
    if not points:
        return f"learning curve:  not drawn (no step reported {' or '.join(REWARD)})"
    try:
        import matplotlib
    except ImportError:
        return "learning curve:  not drawn (matplotlib is not installed: pip install matplotlib)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot([step for step, _ in points], [value for _, value in points], marker="o")
    ax.set_xlabel("training step")
    ax.set_ylabel("success (mean reward of the step's rollouts)")
    ax.set_title(f"Learning curve: {path.parent.name}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"learning curve:  {path.absolute()}"


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def _log_tail(log: Path, lines: int) -> str:
    return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


@dataclass(frozen=True)
class Outcome:
    """How the training command ended."""

    returncode: int
    wall_s: float
    interrupted: bool = False


def summary(steps: dict[int, dict[str, float]], config: RunConfig | None, outcome: Outcome, log: Path,
            since: float, report: Path | None = None, curve: Path | None = None) -> str:
    """The end-of-run summary: the per-step table and where everything is (building the report and curve)."""
    trained = {step: metrics for step, metrics in steps.items() if step >= 1}
    total = config.total_steps if config else None
    state = "interrupted" if outcome.interrupted else "finished" if outcome.returncode == 0 else "FAILED"
    lines = [f"StepPO run {state} (exit {outcome.returncode}): {len(trained)}"
             + (f" of {total}" if total else "") + f" training steps in {_duration(outcome.wall_s)}", ""]
    lines += [step_table(trained), ""] if trained else ["no training step finished", ""]
    silent = steps_without_policy_gradient(trained)
    if silent:
        lines += [f"no policy gradient at step{'s' if len(silent) > 1 else ''} {_step_ranges(silent)}: every "
                  "advantage was 0 (every rollout earned the same return, e.g. all failed), so only the KL term "
                  "moved the policy. A run that stays there is stuck: see benchmarks/README.md, \"World 1 over "
                  "eight seeds\".", ""]
    lines.append(f"full log:        {log.absolute()}")
    if config is None:
        lines.append("outputs:         unknown: the run stopped before hydra composed its configuration")
    else:
        records = dumped_records(config, since)
        lines += [checkpoints_line(config, since), dumps_line(config, records)]
        if report is not None:
            lines += report_lines(config, records, report)
    if curve is not None:
        lines.append(write_learning_curve(trained, curve))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- running


def console_mode(requested: str, stream: IO) -> str:
    """``compact`` or ``full``: ``auto`` is compact on a terminal only."""
    if requested not in CONSOLE_MODES:
        raise ValueError(f"console mode must be one of {CONSOLE_MODES}, got {requested!r}")
    if requested == "auto":
        return "compact" if stream.isatty() else "full"
    return requested


def follow(output: IO[bytes], log: IO[bytes], console: IO[str], full: bool, hydra_dir: Path, since: float,
           steps: dict[int, dict[str, float]]) -> None:
    """Copy the command's ``output`` to ``log`` (and in full mode to ``console``) line by line, collecting
    verl's metric lines into ``steps`` (``{step: metrics}``) and printing a progress line for each."""
    config = None
    for raw in output:
        log.write(raw)
        line = raw.decode("utf-8", errors="replace")
        if full:
            console.write(line)
        for step, metrics in step_metrics(line).items():
            steps.setdefault(step, {}).update(metrics)
            if step >= 1 and not full:  # step 0: the validation before training
                config = config or read_run_config(hydra_dir, since)
                print(progress_line(step, config.total_steps if config else None, steps[step]), file=console)
        console.flush()


def run_with_progress(cmd: list[str], log_path: Path, console: IO[str], mode: str = "auto",
                      report: Path | None = None, curve: Path | None = None) -> int:
    """Run ``cmd`` with the console described in the module docstring; returns its exit status."""
    hydra_dir = hydra_run_dir(cmd)
    full = console_mode(mode, console) == "full"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    since = int(started) - 1  # file systems may keep modification times to the second
    if not full:
        print(f"training; verl's whole output goes to {log_path.absolute()} (tail -f it to follow)", file=console,
              flush=True)
    interrupted, steps = False, {}
    with open(log_path, "wb") as log:
        # Unbuffered: the command writes into a pipe, and each step's line should show when it is logged.
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        try:
            follow(proc.stdout, log, console, full, hydra_dir, since, steps)
        except KeyboardInterrupt:  # the terminal's Ctrl-C reached the command too: keep its last words
            interrupted = True
            shutil.copyfileobj(proc.stdout, log)
        returncode = proc.wait()
    outcome = Outcome(returncode, time.time() - started, interrupted)
    if returncode != 0 and not full:
        print(f"--- the last {FAILED_TAIL_LINES} lines of the log ---\n{_log_tail(log_path, FAILED_TAIL_LINES)}\n---",
              file=console)
    print("\n" + summary(steps, read_run_config(hydra_dir, since), outcome, log_path, since, report, curve),
          file=console, flush=True)
    return returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m steppo_verl.progress",
        description="Run a StepPO training command with one line per step and a summary at the end.",
    )
    parser.add_argument("--log", type=Path, required=True, help="file that receives the command's whole output")
    parser.add_argument("--console", default="auto", choices=CONSOLE_MODES,
                        help="compact: a line per step; full: the whole output; auto: compact on a terminal")
    parser.add_argument("--report", type=Path, help="build the HTML report of this run's per-step dumps here")
    parser.add_argument("--curve", type=Path, help="draw the learning curve (success per step) into this PNG")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the training command")
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("no training command: put it after --")
    try:
        return run_with_progress(cmd, args.log, sys.stdout, args.console, args.report, args.curve)
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    sys.exit(main())
