#!/usr/bin/env bash
# Baseline: GiGPO (episode groups + anchor-state step groups, no critic) with a 0.001 low-variance
# KL loss [paper's baseline setting]; anchor states come from the agent loop's step keys.
# Environment: see common.sh.
source "$(dirname "$0")/common.sh"

launch \
  algorithm.adv_estimator=gigpo \
  algorithm.gigpo.step_weight=1.0 \
  "${TOKEN_LOSS[@]}" \
  critic.enable=false \
  actor_rollout_ref.rollout.n=8 \
  data.train_batch_size=32 \
  actor_rollout_ref.actor.ppo_mini_batch_size=32 \
  actor_rollout_ref.actor.use_kl_loss=true \
  actor_rollout_ref.actor.kl_loss_coef=0.001 \
  actor_rollout_ref.actor.kl_loss_type=low_var_kl \
  -- "$@"
