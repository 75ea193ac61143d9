"""The tabular credit model (benchmarks/bench_credit.py): this package's estimators on a tabular vault.

Success per step is exact there (no sampling noise), and runs differ only in their rollouts, so a handful of
seeds separates the arms: a regression in step GAE (lambda, the values it reads, whitening) shows up as StepPO
losing its lead over GRPO."""

from __future__ import annotations

import statistics

import pytest
import torch
from bench_modules import load_benchmark

bench = load_benchmark("bench_credit")


def test_rollouts_stop_at_the_first_wrong_door_and_win_only_past_the_last_room():
    logits = torch.tensor([[0.0, 0.0]] * 3, dtype=torch.float64)
    doors, calls = bench.rollouts(logits, 2000, torch.Generator().manual_seed(0))
    wrong = doors != 0
    for row, count in zip(wrong.tolist(), calls.tolist()):
        first_wrong = row.index(True) if True in row else 3
        assert count == min(first_wrong + 1, 3)
    won = (calls == 3) & ~wrong[:, -1]
    assert abs(won.double().mean().item() - 1 / 8) < 0.03  # the random-door rate


def test_oracle_values_are_the_success_probability_from_each_room():
    logits = torch.log(torch.tensor([[0.5, 0.5], [0.8, 0.2], [0.9, 0.1]], dtype=torch.float64))
    assert bench.oracle_values(logits).tolist() == pytest.approx([0.36, 0.72, 0.9])
    assert bench.success_rate(logits) == pytest.approx(0.36)


def median_steps(arm, depth=3, seeds=8, steps=20):
    return statistics.median(bench.steps_to(bench.train(bench.ARMS[arm], depth, seed, steps, lr=0.8, critic_lr=0.5),
                                            0.5) for seed in range(seeds))


def test_step_credit_beats_trajectory_credit_on_the_tabular_vault():
    grpo = median_steps("grpo")
    assert grpo <= 20, "GRPO learns the tabular vault"
    assert median_steps("steppo+oracle+lam0") < median_steps("steppo+oracle") < grpo
    assert median_steps("steppo+critic+lam0.5") < grpo
