#!/usr/bin/env bash
# Baseline: HGPO (step groups over shared histories of 1..K+1 states, weights (k+1)^alpha, no critic, no
# episode term) in its paper's setting (arXiv 2602.22817: 8 rollouts per prompt, gamma 0.95), with the same
# 0.001 low-variance KL loss as the GiGPO baseline; histories come from the agent loop's step keys.
# Environment: see common.sh.
source "$(dirname "$0")/common.sh"

launch \
  algorithm.adv_estimator=hgpo \
  algorithm.gamma=0.95 \
  algorithm.hgpo.history_length=4 \
  algorithm.hgpo.alpha=1.0 \
  "${TOKEN_LOSS[@]}" \
  critic.enable=false \
  actor_rollout_ref.rollout.n=8 \
  data.train_batch_size=32 \
  actor_rollout_ref.actor.ppo_mini_batch_size=32 \
  actor_rollout_ref.actor.use_kl_loss=true \
  actor_rollout_ref.actor.kl_loss_coef=0.001 \
  actor_rollout_ref.actor.kl_loss_type=low_var_kl \
  -- "$@"
