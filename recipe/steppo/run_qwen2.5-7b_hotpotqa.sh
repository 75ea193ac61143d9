#!/usr/bin/env bash
# StepPO on HotpotQA with Qwen2.5-7B-Instruct (hermes tool calls), one 8-GPU node by default.
#   bash recipe/steppo/run_qwen2.5-7b_hotpotqa.sh [hydra overrides]
#   DRY_RUN=1 bash recipe/steppo/run_qwen2.5-7b_hotpotqa.sh     # print the command only
# Environment variables: see common.sh. Baselines: run_qwen2.5-7b_hotpotqa_{grpo,ppo,gigpo}.sh.
# The step ratio's clip stays at 0.2 here, as in the StepPO paper's HotpotQA runs (its code clips at
# 3e-4/4e-4 on the other tasks, the default of steppo_trainer.yaml).
source "$(dirname "$0")/common.sh"

launch \
  algorithm.adv_estimator=steppo \
  actor_rollout_ref.actor.policy_loss.loss_mode=steppo \
  actor_rollout_ref.actor.clip_ratio_low=0.2 \
  actor_rollout_ref.actor.clip_ratio_high=0.2 \
  critic.enable=true \
  actor_rollout_ref.rollout.n=1 \
  data.train_batch_size=256 \
  actor_rollout_ref.actor.ppo_mini_batch_size=256 \
  critic.ppo_mini_batch_size=256 \
  -- "$@"
