"""Learning on the vault task: StepPO vs GRPO vs token-level PPO (``gae``) vs GiGPO, several seeds, one budget.

    python benchmarks/bench_learning.py                                  # 4 estimators x 3 seeds
    python benchmarks/bench_learning.py --estimators steppo grpo --seeds 0 --steps 6

Every run is ``recipe/steppo/run_cpu_vault.sh`` with ``ESTIMATOR`` and ``SEED``: the same task and the same
warm-started tiny policy (built once in ``--work-dir``), 8 prompts x 8 rollouts per step, the same number
of steps. Success at a step is verl's ``critic/score/mean`` for that step's rollouts (sampled at temperature
1, before the step's update): the fraction that opened the vault and answered ``open``. Step 1's rollouts
come from the untrained policy, so its success is the baseline every run starts from.

Writes ``benchmarks/results/learning.json`` (every run's curve), ``learning.md`` (the table) and
``learning.png`` (mean curve per estimator, with the seeds' range).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from steppo_verl.cpu.runs import run_in_session

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipe" / "steppo" / "run_cpu_vault.sh"
RESULTS = Path(__file__).parent / "results"
SUCCESS = "critic/score/mean"


def run_one(estimator: str, seed: int, steps: int, work_dir: Path, timeout_s: float) -> list[float]:
    """One training run; returns the success of each step, in order."""
    run_dir = work_dir / "runs" / f"{estimator}-{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHON": sys.executable, "WORK_DIR": str(work_dir), "RUN_DIR": str(run_dir),
           "ESTIMATOR": estimator, "SEED": str(seed), "STEPS": str(steps), "RAY_DEDUP_LOGS": "0"}
    result = run_in_session(["bash", str(RECIPE)], run_dir / "train.log", timeout_s, cwd=run_dir, env=env)
    metrics = result.metrics
    if result.returncode != 0 or sorted(metrics) != list(range(1, steps + 1)):
        raise RuntimeError(f"{estimator} seed {seed} failed (exit {result.returncode}); see {run_dir / 'train.log'}")
    print(f"{estimator} seed {seed}: {result.wall_s:.0f} s, success "
          + " ".join(f"{metrics[s][SUCCESS]:.2f}" for s in sorted(metrics)), flush=True)
    return [metrics[s][SUCCESS] for s in sorted(metrics)]


def steps_to(curve: list[float], threshold: float) -> int | None:
    """The first step (1-based) whose success reaches ``threshold``; None if none does."""
    return next((step for step, success in enumerate(curve, start=1) if success >= threshold), None)


def summarise(curves: dict[str, dict[int, list[float]]], threshold: float, last: int) -> list[dict]:
    """Per estimator: baseline (step 1), final success (mean of the last ``last`` steps), steps to threshold."""
    rows = []
    for estimator, runs in curves.items():
        finals = [statistics.mean(curve[-last:]) for curve in runs.values()]
        reached = [steps_to(curve, threshold) for curve in runs.values()]
        rows.append({
            "estimator": estimator,
            "seeds": len(runs),
            "baseline": statistics.mean(curve[0] for curve in runs.values()),
            "final_mean": statistics.mean(finals),
            "final_min": min(finals),
            "final_max": max(finals),
            "steps_to_threshold": reached,
        })
    return rows


def table(rows: list[dict], threshold: float, last: int) -> str:
    lines = [f"| estimator | seeds | success at step 1 (untrained) | final success (mean of last {last} steps) "
             f"[min, max] | steps to {threshold:.0%} per seed |", "|---|---:|---:|---:|---|"]
    for row in rows:
        reached = ", ".join("-" if step is None else str(step) for step in row["steps_to_threshold"])
        lines.append(f"| `{row['estimator']}` | {row['seeds']} | {row['baseline']:.2f} | {row['final_mean']:.2f} "
                     f"[{row['final_min']:.2f}, {row['final_max']:.2f}] | {reached} |")
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, dict[int, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for estimator, runs in curves.items():
        steps = range(1, len(next(iter(runs.values()))) + 1)
        per_step = list(zip(*runs.values()))
        ax.plot(steps, [statistics.mean(v) for v in per_step], label=f"{estimator} ({len(runs)} seeds)")
        ax.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], alpha=0.15)
    ax.set_xlabel("training step (8 prompts x 8 rollouts)")
    ax.set_ylabel("success of the step's rollouts")
    ax.set_title("Vault task on CPU: tiny warm-started policy, real verl trainer")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--estimators", nargs="+", default=["steppo", "grpo", "gae", "gigpo"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=10, help="training steps per run (the budget)")
    parser.add_argument("--threshold", type=float, default=0.3, help="success level for 'steps to threshold'")
    parser.add_argument("--last", type=int, default=3, help="final success = mean over this many last steps")
    parser.add_argument("--work-dir", type=Path, default=RESULTS / "learning_runs")
    parser.add_argument("--timeout-s", type=float, default=3600, help="per run")
    parser.add_argument("--out", type=Path, default=RESULTS / "learning.json")
    args = parser.parse_args()

    curves: dict[str, dict[int, list[float]]] = {}
    for estimator in args.estimators:
        for seed in args.seeds:
            curves.setdefault(estimator, {})[seed] = run_one(estimator, seed, args.steps, args.work_dir, args.timeout_s)
    rows = summarise(curves, args.threshold, args.last)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": args.steps, "threshold": args.threshold, "curves": curves,
                                    "summary": rows}, indent=1))
    args.out.with_suffix(".md").write_text(table(rows, args.threshold, args.last))
    plot(curves, args.out.with_suffix(".png"))
    print(table(rows, args.threshold, args.last))
    print(f"wrote {args.out}, {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
