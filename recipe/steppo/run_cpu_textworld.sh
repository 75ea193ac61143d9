#!/usr/bin/env bash
# TextWorld coin collector on CPU (steppo_verl/tasks/textworld): games generated on the spot by TextWorld, a tiny
# policy warm-started on random admissible commands, trained through the real trainer and the environment loop.
#   PYTHON=.venv/bin/python bash recipe/steppo/run_cpu_textworld.sh [hydra overrides]
# Needs the textworld extra (pip install -e ".[textworld]"). Environment: ESTIMATOR (steppo | grpo | gigpo | hgpo;
# the same budget for each; grpo is step_grpo: the game rewards through env_rewards), SEED (the run's sampling and
# data order, 0), WORLD (which games: the training games are seeds WORLD*1000 .. +GAMES-1, validation the next 8; 0),
# LEVEL (coin collector's level, 2: the coin one room away), GAMES (training games, 8), STEPS (training steps, 10),
# WARM_START_STEPS (300), DEMOS (random-command demonstrations, 512), WORK_DIR (games and warm-started model per
# WORLD and LEVEL, shared by runs; default $TMPDIR/steppo_textworld), RUN_DIR (this run's outputs,
# WORK_DIR/runs/ESTIMATOR-SEED), PYTHON, CONSOLE (common.sh), LOG_FILE (verl's whole output, RUN_DIR/run.log),
# DRY_RUN=1 (print what would run). Use another WORK_DIR for other GAMES, DEMOS or WARM_START_STEPS. Ends with the
# run's summary and learning curve, as run_cpu_vault.sh does.
source "$(dirname "$0")/common.sh"
: "${WORK_DIR:=${TMPDIR:-/tmp}/steppo_textworld}"
: "${ESTIMATOR:=steppo}"
: "${SEED:=0}"
: "${STEPS:=10}"
: "${WORLD:=0}"
: "${LEVEL:=2}"
: "${GAMES:=8}"
: "${DEMOS:=512}"
: "${WARM_START_STEPS:=300}"
export HF_HUB_OFFLINE=1

cpu_estimator_overrides env
check_python
quiet_logs
mkdir -p "$WORK_DIR"
WORK_DIR=$(cd "$WORK_DIR" && pwd)
: "${RUN_DIR:=$WORK_DIR/runs/$ESTIMATOR-$SEED}"
TASK_DIR=$WORK_DIR/games-world$WORLD-level$LEVEL
MODEL_PATH=$WORK_DIR/model-world$WORLD-level$LEVEL
first=$((WORLD * 1000))

[ -f "$TASK_DIR/demos.jsonl" ] || step "$PYTHON" -m steppo_verl.tasks.textworld.prepare --out "$TASK_DIR" \
  --challenge tw-coin_collector --levels "$LEVEL" --train-seeds "$first:$((first + GAMES))" \
  --val-seeds "$((first + GAMES)):$((first + GAMES + 8))" --test-seeds 0 --first-seed "$first" --demos "$DEMOS"
[ -f "$MODEL_PATH/config.json" ] || step "$PYTHON" -m steppo_verl.dev.tiny_model --out "$MODEL_PATH" \
  --warm-start "$TASK_DIR/demos.jsonl" --warm-start-steps "$WARM_START_STEPS"

cpu_run_overrides
run_cpu_learning "$PYTHON" -m steppo_verl.main +platform=cpu +task=textworld_cpu "${ESTIMATOR_OVERRIDES[@]}" \
  "data.train_files=$TASK_DIR/train.parquet" "data.val_files=$TASK_DIR/validation.parquet" \
  "actor_rollout_ref.rollout.agent.agent_loop_config_path=$(package_file config env_agent_loop.yaml)" \
  "${RUN_OVERRIDES[@]}" "$@"
