#!/usr/bin/env bash
# Baseline: GRPO (trajectory-level group baseline, no critic) on the same task [paper's setting:
# 8 rollouts per prompt, 32 prompts per batch]. Environment: see common.sh.
source "$(dirname "$0")/common.sh"

launch \
  algorithm.adv_estimator=grpo \
  "${GROUP_BASELINE[@]}" \
  -- "$@"
