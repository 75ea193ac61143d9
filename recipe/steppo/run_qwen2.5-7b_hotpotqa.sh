#!/usr/bin/env bash
# StepPO on HotpotQA with Qwen2.5-7B-Instruct (hermes tool calls), one 8-GPU node by default.
#   bash recipe/steppo/run_qwen2.5-7b_hotpotqa.sh [hydra overrides]
#   DRY_RUN=1 bash recipe/steppo/run_qwen2.5-7b_hotpotqa.sh     # print the command only
# Environment variables: see common.sh. Baselines: run_qwen2.5-7b_hotpotqa_{grpo,ppo,gigpo}.sh.
source "$(dirname "$0")/common.sh"

launch \
  algorithm.adv_estimator=steppo \
  actor_rollout_ref.actor.policy_loss.loss_mode=steppo \
  critic.enable=true \
  actor_rollout_ref.rollout.n=1 \
  data.train_batch_size=256 \
  actor_rollout_ref.actor.ppo_mini_batch_size=256 \
  critic.ppo_mini_batch_size=256 \
  -- "$@"
