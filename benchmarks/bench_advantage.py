"""Advantage estimators on a large multi-turn batch: ours vs verl's stock ones, same batch, same run.

    python benchmarks/bench_advantage.py                        # 1,024 x 8 steps x 4,096 tokens
    python benchmarks/bench_advantage.py --batch 256 --length 1024 --repeats 3

Prints the median time of each estimator and its ratio to the baseline measured in this run (``verl gae`` for the critic-based estimators, ``verl grpo`` for the group
ones), and writes the figures to ``benchmarks/results/advantage.json``. Also timed: a
re-implementation of the reference StepPO code's step GAE, which works on one row per step and
walks each trajectory's rows in Python (given the per-step rewards and values already extracted;
building those rows is the layout cost measured by ``bench_layout.py``).

    python benchmarks/bench_advantage.py --batch 4096 --steps 16 --length 8192 --repeats 1   # the largest
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from verl.trainer.ppo.core_algos import compute_gae_advantage_return, compute_grpo_outcome_advantage

from steppo_verl.advantage import compute_gigpo_advantage, compute_step_grpo_advantage, compute_steppo_advantage
from steppo_verl.protocol import gather_at_step_starts, locate_steps, step_rewards


def multi_turn_batch(batch: int, steps: int, length: int, group: int, seed: int = 0) -> dict:
    """Rows of ``steps`` segments, each an action followed by an observation of random lengths."""
    gen = torch.Generator().manual_seed(seed)
    segment = length // steps
    action_len = torch.randint(1, max(2, segment // 2), (batch, steps), generator=gen)
    position = torch.arange(length)
    seg_index = (position // segment).clamp(max=steps - 1)
    in_segment = position - seg_index * segment
    response_mask = (in_segment[None, :] < action_len[:, seg_index]).long()
    step_ids = torch.where(response_mask.bool(), seg_index.expand(batch, -1), torch.tensor(-1))
    rewards = torch.zeros(batch, length)
    rewards[:, -1] = torch.randint(0, 2, (batch,), generator=gen).float()
    return {
        "token_level_rewards": rewards,
        "values": torch.randn(batch, length, generator=gen),
        "response_mask": response_mask,
        "step_ids": step_ids,
        "index": np.array([f"p{i // group}" for i in range(batch)], dtype=object),
    }


def per_step_row_gae(step_rewards: list, step_values: list, gamma: float = 1.0, lam: float = 1.0) -> list:
    """The reference code's algorithm: one row per step, each trajectory's rows walked backwards."""
    advantages = []
    for rewards, values in zip(step_rewards, step_values):
        running, next_value, trajectory = 0.0, 0.0, [0.0] * len(rewards)
        for k in reversed(range(len(rewards))):
            delta = rewards[k] + gamma * next_value - values[k]
            running = delta + gamma * lam * running
            trajectory[k], next_value = running, values[k]
        advantages.append(trajectory)
    flat = torch.tensor([a for trajectory in advantages for a in trajectory])
    return ((flat - flat.mean()) / (flat.std() + 1e-8)).tolist()


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1024, help="trajectories per batch")
    parser.add_argument("--steps", type=int, default=8, help="agent steps per trajectory")
    parser.add_argument("--length", type=int, default=4096, help="response tokens per row")
    parser.add_argument("--group", type=int, default=8, help="rollouts per prompt (group estimators)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (median is reported)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "advantage.json")
    args = parser.parse_args()

    data = multi_turn_batch(args.batch, args.steps, args.length, args.group)
    r, v, m, ids, uid = (data[k] for k in ("token_level_rewards", "values", "response_mask", "step_ids", "index"))
    input_bytes = sum(t.numel() * t.element_size() for t in (r, v, m, ids))
    steps = locate_steps(m, ids)
    row_rewards = [row[mask].tolist() for row, mask in zip(step_rewards(r, steps), steps.step_mask)]
    row_values = [row[mask].tolist() for row, mask in zip(gather_at_step_starts(v, steps), steps.step_mask)]
    cases = {
        "verl gae (token loop)": lambda: compute_gae_advantage_return(r, v, m, gamma=1.0, lam=1.0),
        "steppo (explicit step_ids)": lambda: compute_steppo_advantage(r, v, m, step_ids=ids),
        "steppo (steps from mask)": lambda: compute_steppo_advantage(r, v, m),
        "reference per-step rows (Python)": lambda: per_step_row_gae(row_rewards, row_values),
        "verl grpo": lambda: compute_grpo_outcome_advantage(r.clone(), m, uid),
        "step_grpo": lambda: compute_step_grpo_advantage(r, m, uid, step_ids=ids),
        "gigpo (step-index anchors)": lambda: compute_gigpo_advantage(r, m, uid, step_ids=ids),
    }
    baselines = {"verl gae (token loop)": ["steppo (explicit step_ids)", "steppo (steps from mask)",
                                           "reference per-step rows (Python)"],
                 "verl grpo": ["step_grpo", "gigpo (step-index anchors)"]}

    seconds = {name: median_seconds(fn, args.repeats) for name, fn in cases.items()}
    print(f"batch {args.batch} x {args.steps} steps x {args.length} tokens, torch threads {torch.get_num_threads()}, "
          f"inputs {input_bytes / 2**20:,.0f} MiB")
    print(f"{'estimator':34s} {'median s':>10s} {'speed-up vs baseline':>21s}")
    results = []
    for base, ours in baselines.items():
        for name in [base, *ours]:
            speedup = seconds[base] / seconds[name]
            label = "(baseline)" if name == base else f"{speedup:.1f}x"
            print(f"{name:34s} {seconds[name]:10.4f} {label:>21s}")
            results.append({"estimator": name, "seconds": seconds[name], "baseline": None if name == base else base,
                            "speedup": speedup})

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "batch": args.batch, "steps": args.steps, "length": args.length, "group": args.group,
        "input_bytes": input_bytes,
        "repeats": args.repeats, "torch": torch.__version__, "machine": platform.machine(),
        "threads": torch.get_num_threads(), "results": results,
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
