#!/usr/bin/env bash
# Baseline: token-level PPO (verl's per-token GAE with a critic, token-level ratios) on the same
# task and batch as StepPO. Environment: see common.sh.
source "$(dirname "$0")/common.sh"

launch \
  algorithm.adv_estimator=gae \
  "${TOKEN_LOSS[@]}" \
  critic.enable=true \
  actor_rollout_ref.rollout.n=1 \
  data.train_batch_size=256 \
  actor_rollout_ref.actor.ppo_mini_batch_size=256 \
  critic.ppo_mini_batch_size=256 \
  -- "$@"
