#!/usr/bin/env bash
# The vault learning task on CPU (steppo_verl/tasks/vault/prepare.py): a tiny policy, warm-started on the call
# format with random doors, learns which door is right in each room through the real trainer.
#   PYTHON=.venv/bin/python bash recipe/steppo/run_cpu_vault.sh [hydra overrides]
# Environment: ESTIMATOR (steppo | grpo | gae | gigpo | hgpo; the same budget for each), SEED (the run's
# sampling and data order, 0), WORLD (the vault's layout: which door is right in each room, 0), STEPS
# (training steps, 10), WORK_DIR (task data and warm-started model per world, shared by runs; default
# $TMPDIR/steppo_vault), RUN_DIR (this run's outputs, WORK_DIR/runs/ESTIMATOR-SEED), PYTHON,
# CONSOLE (compact | full | auto; common.sh), LOG_FILE (verl's whole output, RUN_DIR/run.log),
# VAULT_OPTIONS (extra options of steppo_verl.tasks.vault.prepare, e.g. "--room-tokens --practice-rooms 8"),
# WARM_START_STEPS (500), DRY_RUN=1 (print what would run). The task and the warm-started model are
# built once per WORLD under WORK_DIR: use another WORK_DIR for other VAULT_OPTIONS or WARM_START_STEPS.
# It ends with a summary (steppo_verl/progress.py): the per-step table, where the log, checkpoints and
# per-step dumps are, and RUN_DIR/learning_curve.png (success per step; needs matplotlib). With per-step
# dumps on (trainer.steppo_dump.every_n_steps=N) it also builds RUN_DIR/report.html.
source "$(dirname "$0")/common.sh"
: "${WORK_DIR:=${TMPDIR:-/tmp}/steppo_vault}"
: "${ESTIMATOR:=steppo}"
: "${SEED:=0}"
: "${STEPS:=10}"
: "${WORLD:=0}"
export HF_HUB_OFFLINE=1

cpu_estimator_overrides

check_python
quiet_logs
mkdir -p "$WORK_DIR"
WORK_DIR=$(cd "$WORK_DIR" && pwd)
: "${RUN_DIR:=$WORK_DIR/runs/$ESTIMATOR-$SEED}"
TASK_DIR=$WORK_DIR/task-world$WORLD
MODEL_PATH=$WORK_DIR/model-world$WORLD

read -r -a vault_options <<< "${VAULT_OPTIONS:-}"
[ -f "$TASK_DIR/train.parquet" ] || step "$PYTHON" -m steppo_verl.tasks.vault.prepare --out "$TASK_DIR" --seed "$WORLD" \
  "${vault_options[@]}"
[ -f "$MODEL_PATH/config.json" ] || step "$PYTHON" -m steppo_verl.dev.tiny_model --out "$MODEL_PATH" \
  --warm-start "$TASK_DIR/demos.jsonl" --added-tokens "$TASK_DIR/added_tokens.json" \
  --warm-start-steps "${WARM_START_STEPS:-500}"

cpu_run_overrides
run_cpu_learning "$PYTHON" -m steppo_verl.main +platform=cpu +task=vault "${ESTIMATOR_OVERRIDES[@]}" \
  "data.train_files=$TASK_DIR/train.parquet" "data.val_files=$TASK_DIR/val.parquet" \
  "actor_rollout_ref.rollout.multi_turn.tool_config_path=$(package_file tasks vault vault_tool.yaml)" \
  "actor_rollout_ref.rollout.agent.agent_loop_config_path=$(package_file tasks vault vault_agent_loop.yaml)" \
  "${RUN_OVERRIDES[@]}" "$@"
