#!/usr/bin/env bash
# Baseline: GRPO (trajectory-level group baseline, no critic) on the same task [paper's setting:
# 8 rollouts per prompt, 32 prompts per batch]. Environment: see common.sh.
source "$(dirname "$0")/common.sh"

launch \
  algorithm.adv_estimator=grpo \
  "${TOKEN_LOSS[@]}" \
  critic.enable=false \
  actor_rollout_ref.rollout.n=8 \
  data.train_batch_size=32 \
  actor_rollout_ref.actor.ppo_mini_batch_size=32 \
  -- "$@"
