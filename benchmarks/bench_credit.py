"""How much step credit can win on the vault, with a tabular policy: our estimators, hundreds of seeds, seconds.

    python benchmarks/bench_credit.py                                  # depths 3 and 5, 300 seeds, every arm
    python benchmarks/bench_credit.py --depths 5 --seeds 100 --arms grpo steppo+oracle

The vault as a table: ``depth`` rooms in a row, two doors each; the right door leads on (from the last room it
opens the vault, reward 1), the wrong one to a dead end (reward 0, the episode ends). The policy is a softmax over
the two doors per room, starting at the random-door rate (``1 / 2**depth`` success). A training step samples
8 prompts x 8 rollouts, as the CPU vault runs do, turns them into verl's ``[B, L]`` tensors (one token per door
call, ``step_ids``, the prompt ``uid``), computes advantages with this package's estimators
(:func:`~steppo_verl.advantage.compute_steppo_advantage`, :func:`~steppo_verl.advantage.compute_step_grpo_advantage`)
and takes one policy-gradient step on the token-mean loss (the on-policy gradient of verl's and our losses).
Success after each step is exact (the product of the right-door probabilities), so a run's curve has no sampling
noise; runs differ in their rollouts.

StepPO's V(s_k) comes from ``oracle`` (the true value of room k under the current policy: the upper bound of
step credit), ``critic`` (a value table fitted to the estimator's returns, one step of rate ``--critic-lr`` per
training step, starting at 0) or ``state_returns`` (``algorithm.steppo.values=state_returns``: the batch's
leave-one-out mean return from the room, :func:`~steppo_verl.metrics.state_mean_returns`; the critic where the
room was visited once). What the neural runs add (a policy that must read the room, a critic that must tell
rooms apart, format collapses) is absent: this measures the estimators alone.

Reports per arm and depth: steps to 50% success (median over seeds, 95% bootstrap interval of the median) and
mean success over the steps; writes ``benchmarks/results/credit.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from bench_learning import bootstrap_interval, steps_to

from steppo_verl.advantage import compute_step_grpo_advantage, compute_steppo_advantage
from steppo_verl.metrics import state_mean_returns

RESULTS = Path(__file__).parent / "results"


class Arm(NamedTuple):
    estimator: str  # grpo or steppo
    values: str | None = None  # steppo: oracle, critic, or state_returns (the batch's, critic where unknown)
    lam: float = 1.0
    skip_equal_returns: bool = True
    center: bool = True  # algorithm.steppo.center
    advantage_clip: float | None = None  # algorithm.steppo.advantage_clip


ARMS = {
    "grpo": Arm("grpo"),
    "steppo+oracle": Arm("steppo", "oracle"),
    "steppo+oracle+lam0": Arm("steppo", "oracle", 0.0),
    "steppo+critic": Arm("steppo", "critic"),
    "steppo+critic+lam0.5": Arm("steppo", "critic", 0.5),
    "steppo+critic+lam0": Arm("steppo", "critic", 0.0),
    "steppo+critic+no_skip": Arm("steppo", "critic", skip_equal_returns=False),
    "steppo+state_values": Arm("steppo", "state_returns"),
    "steppo+state_values+lam0": Arm("steppo", "state_returns", 0.0),
    "steppo+critic+uncentred": Arm("steppo", "critic", center=False),
    "steppo+state_values+lam0+uncentred": Arm("steppo", "state_returns", 0.0, center=False),
    "steppo+critic+adv_clip2.5": Arm("steppo", "critic", advantage_clip=2.5),
    "steppo+state_values+lam0+adv_clip2.5": Arm("steppo", "state_returns", 0.0, advantage_clip=2.5),
}


def rollouts(logits: torch.Tensor, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` episodes of the tabular vault: ``[count, D]`` doors taken (0 = right; entries after the episode
    ended are meaningless) and ``[count]`` number of door calls."""
    probs = logits.softmax(-1)  # [D, 2]
    doors = torch.multinomial(probs, count, replacement=True, generator=generator).T  # [count, D]
    wrong = doors != 0
    first_wrong = torch.where(wrong.any(-1), wrong.int().argmax(-1), torch.full_like(doors[:, 0], doors.shape[1]))
    return doors, (first_wrong + 1).clamp(max=doors.shape[1])


def success_rate(logits: torch.Tensor) -> float:
    return float(logits.softmax(-1)[:, 0].prod())


def oracle_values(logits: torch.Tensor) -> torch.Tensor:
    """``[D]`` the success probability from room k on under the current policy."""
    right = logits.softmax(-1)[:, 0]
    return right.flip(0).cumprod(0).flip(0)


def train(arm: Arm, depth: int, seed: int, steps: int, lr: float, critic_lr: float, prompts: int = 8,
          rollouts_per_prompt: int = 8) -> list[float]:
    """One run; returns the success before each training step (step 1: the untrained policy)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.zeros(depth, 2, dtype=torch.float64)
    critic = torch.zeros(depth, dtype=torch.float64)
    batch = prompts * rollouts_per_prompt
    index = np.array([str(i // rollouts_per_prompt) for i in range(batch)], dtype=object)
    positions = torch.arange(depth)
    curve = []
    for _ in range(steps):
        curve.append(success_rate(logits))
        doors, calls = rollouts(logits, batch, generator)
        taken = positions[None, :] < calls[:, None]  # [B, D]: door call k happened (one token each)
        won = taken[:, -1] & (doors[:, -1] == 0)
        rewards = torch.zeros(batch, depth, dtype=torch.float32)
        rewards[torch.arange(batch), calls - 1] = won.float()
        mask = taken.long()
        step_ids = torch.where(taken, positions[None, :], torch.full_like(mask, -1))
        if arm.estimator == "grpo":
            advantages, _ = compute_step_grpo_advantage(rewards, mask, index, step_ids)
        else:
            table = oracle_values(logits) if arm.values == "oracle" else critic
            values = table[None, :].expand(batch, depth).double() * taken
            if arm.values == "state_returns":  # algorithm.steppo.values=state_returns: tokens are steps here
                batch_values, known = state_mean_returns(won[:, None].double() * taken, positions.expand(batch, -1),
                                                         taken)
                values = torch.where(known, batch_values, values)
            values = values.float()
            advantages, returns = compute_steppo_advantage(
                rewards, values, mask, step_ids, lam=arm.lam, skip_equal_returns=arm.skip_equal_returns,
                center=arm.center, batch_values=arm.values == "state_returns", advantage_clip=arm.advantage_clip)
            if arm.values != "oracle":  # one step towards each room's mean return, as a critic's update would
                visits = taken.sum(0).clamp(min=1)
                target = (returns.double() * taken).sum(0) / visits
                critic = torch.where(taken.any(0), critic + critic_lr * (target - critic), critic)
        # Token-mean policy gradient: grad log softmax = onehot(door) - probs, for each call taken.
        probs = logits.softmax(-1)
        onehot = torch.nn.functional.one_hot(doors, 2).double()
        weight = (advantages.double() * taken)[..., None]  # [B, D, 1]
        gradient = (weight * (onehot - probs[None])).sum(0) / taken.sum()
        logits = logits + lr * gradient
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--depths", nargs="+", type=int, default=[3, 5])
    parser.add_argument("--seeds", type=int, default=300)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=0.8,
                        help="policy step size on the logits (0.8: GRPO needs ~12 steps at depth 3, as in issue 16)")
    parser.add_argument("--critic-lr", type=float, default=0.5)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=RESULTS / "credit.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(0)
    rows = []
    print(f"| depth | arm | steps to {args.threshold:.0%}: median [95% CI] | not reached | mean success over "
          f"{args.steps} steps |\n|---:|---|---:|---:|---:|")
    for depth in args.depths:
        for name in args.arms:
            curves = [train(ARMS[name], depth, seed, args.steps, args.lr, args.critic_lr) for seed in range(args.seeds)]
            reached = [steps_to(curve, args.threshold) for curve in curves]
            low, high = bootstrap_interval(reached, rng, statistic=statistics.median)
            row = {"depth": depth, "arm": name, "median_steps": statistics.median(reached), "interval": [low, high],
                   "not_reached": sum(r > args.steps for r in reached) / len(reached),
                   "auc": statistics.fmean(statistics.fmean(curve) for curve in curves), "steps_to": reached}
            rows.append(row)
            print(f"| {depth} | `{name}` | {row['median_steps']:g} [{low:g}, {high:g}] | {row['not_reached']:.0%} | "
                  f"{row['auc']:.3f} |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
