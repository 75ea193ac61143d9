#!/usr/bin/env bash
# Baseline: GiGPO (episode groups + anchor-state step groups, no critic) with a 0.001 low-variance
# KL loss [paper's baseline setting]; anchor states come from the agent loop's step keys.
# Environment: see common.sh.
source "$(dirname "$0")/common.sh"

launch \
  algorithm.adv_estimator=gigpo \
  algorithm.gigpo.step_weight=1.0 \
  "${GROUP_BASELINE[@]}" \
  "${LOW_VAR_KL[@]}" \
  -- "$@"
