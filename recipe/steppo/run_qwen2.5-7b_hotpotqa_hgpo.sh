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
  "${GROUP_BASELINE[@]}" \
  "${LOW_VAR_KL[@]}" \
  -- "$@"
