#!/usr/bin/env bash
# Shared by the recipe scripts: locate or prepare the data, set up the retriever, assemble the
# command and launch `python -m steppo_verl.main`. Configuration only; the method lives in
# steppo_verl and its hydra config (steppo_verl/config/steppo_trainer.yaml).
#
# Environment (defaults in brackets):
#   MODEL_PATH           actor model, local path or hub name [Qwen/Qwen2.5-7B-Instruct]
#   CRITIC_MODEL_PATH    critic model [MODEL_PATH]
#   DATA_DIR             prepared data: train.parquet, validation.parquet, corpus.jsonl [~/data/steppo/hotpotqa]
#   HOTPOTQA_TRAIN_JSON, HOTPOTQA_DEV_JSON
#                        official HotpotQA files, used to prepare DATA_DIR when it is empty
#   RETRIEVER_URL        a Search-R1-compatible retrieval server; unset = embedded BM25 index
#   INDEX_DIR            embedded BM25 index, built from DATA_DIR/corpus.jsonl if absent [DATA_DIR/bm25_index]
#   N_GPUS, NNODES       GPUs per node, nodes [8, 1]
#   PROJECT_NAME, EXPERIMENT_NAME, LOGGER   tracking [steppo, <script name>, [console]]
#   PYTHON               interpreter [python3]
#   CONSOLE              CPU recipes: compact (a line per training step), full (verl's whole output) or
#                        auto (compact on a terminal) [auto]; the whole output always goes to LOG_FILE
#   DRY_RUN=1            print the final command (and the preparation it would do) without running
# Extra arguments are passed to hydra as overrides, after the script's own.
set -euo pipefail

: "${MODEL_PATH:=Qwen/Qwen2.5-7B-Instruct}"
: "${CRITIC_MODEL_PATH:=$MODEL_PATH}"
: "${DATA_DIR:=$HOME/data/steppo/hotpotqa}"
: "${HOTPOTQA_TRAIN_JSON:=}"
: "${HOTPOTQA_DEV_JSON:=}"
: "${RETRIEVER_URL:=}"
: "${INDEX_DIR:=$DATA_DIR/bm25_index}"
: "${N_GPUS:=8}"
: "${NNODES:=1}"
: "${PROJECT_NAME:=steppo}"
: "${EXPERIMENT_NAME:=$(basename "$0" .sh)}"
: "${LOGGER:=[console]}"
: "${PYTHON:=python3}"
: "${CONSOLE:=auto}"
: "${DRY_RUN:=0}"

die() { echo "error: $*" >&2; exit 1; }

# The baselines' token-level loss with its own clip range: steppo_trainer.yaml's GSPO-scale bounds are
# for the step loss's geometric-mean ratio and would freeze a token ratio.
TOKEN_LOSS=(actor_rollout_ref.actor.policy_loss.loss_mode=vanilla
  actor_rollout_ref.actor.clip_ratio_low=0.2 actor_rollout_ref.actor.clip_ratio_high=0.2)

# The CPU learning recipes' estimators (run_cpu_vault.sh, run_cpu_textworld.sh): sets ESTIMATOR_OVERRIDES, the
# hydra overrides of ESTIMATOR, every one at the same budget (the task's 8 prompts x 8 rollouts). With the argument
# `env` (tasks that reward through the environment loop's env_rewards, which verl's own estimators never read)
# grpo is this plugin's step_grpo (at gamma 1 with one reward per episode: GRPO's advantages) and gae is refused.
cpu_estimator_overrides() {
  local grpo=grpo
  if [ "${1:-}" = env ]; then
    grpo=step_grpo
    [ "$ESTIMATOR" = gae ] && die "ESTIMATOR=gae (verl's) reads only the outcome score, and this task rewards \
through the environment; use steppo, grpo, gigpo or hgpo"
  fi
  case "$ESTIMATOR" in
    steppo) ESTIMATOR_OVERRIDES=() ;;  # steppo_trainer.yaml: step GAE with a critic, one clipped ratio per step
    grpo) ESTIMATOR_OVERRIDES=("algorithm.adv_estimator=$grpo" critic.enable=false "${TOKEN_LOSS[@]}") ;;
    gae) ESTIMATOR_OVERRIDES=(algorithm.adv_estimator=gae "${TOKEN_LOSS[@]}") ;;
    gigpo) ESTIMATOR_OVERRIDES=(algorithm.adv_estimator=gigpo critic.enable=false "${TOKEN_LOSS[@]}") ;;
    hgpo) ESTIMATOR_OVERRIDES=(algorithm.adv_estimator=hgpo critic.enable=false "${TOKEN_LOSS[@]}") ;;
    *) die "ESTIMATOR must be one of steppo, grpo, gae, gigpo, hgpo; got '$ESTIMATOR'" ;;
  esac
}

# The CPU learning recipes' overrides for the run itself (MODEL_PATH, SEED, STEPS, RUN_DIR): sets RUN_OVERRIDES.
cpu_run_overrides() {
  RUN_OVERRIDES=("actor_rollout_ref.model.path=$MODEL_PATH" "critic.model.path=$MODEL_PATH"
    "data.seed=$SEED" "actor_rollout_ref.rollout.seed=$SEED"
    "trainer.total_training_steps=$STEPS" "trainer.default_local_dir=$RUN_DIR/checkpoints"
    "hydra.run.dir=$RUN_DIR/hydra")
}

# The CPU learning recipes' last step: print the training command in a dry run, else run it with the readable
# console, the summary and the learning curve (steppo_verl/progress.py), its outputs in RUN_DIR.
run_cpu_learning() {
  if [ "$DRY_RUN" = 1 ]; then printf "%q " "$@"; echo; exit 0; fi
  : "${LOG_FILE:=$RUN_DIR/run.log}"
  exec "$PYTHON" -m steppo_verl.progress --log "$LOG_FILE" --console "$CONSOLE" --report "$RUN_DIR/report.html" \
    --curve "$RUN_DIR/learning_curve.png" -- "$@"
}

# The group-baseline setting of the baselines without a critic: the token loss, 8 rollouts per prompt
# (the group), 32 prompts per batch [paper's GRPO/GiGPO setting].
GROUP_BASELINE=("${TOKEN_LOSS[@]}" critic.enable=false actor_rollout_ref.rollout.n=8
  data.train_batch_size=32 actor_rollout_ref.actor.ppo_mini_batch_size=32)

# The 0.001 low-variance KL loss of the paper's GiGPO baseline.
LOW_VAR_KL=(actor_rollout_ref.actor.use_kl_loss=true actor_rollout_ref.actor.kl_loss_coef=0.001
  actor_rollout_ref.actor.kl_loss_type=low_var_kl)

# How the policy runs: its prompt and response budgets and the per-GPU layout of its passes. Training and
# evaluation (eval_qwen2.5-7b_paper.sh) share them, so that a policy is evaluated as it was trained.
POLICY_RUN=(
  data.max_prompt_length=3072                      # instructions + question + the forced first search [paper]
  data.truncation=error
  actor_rollout_ref.rollout.response_length=8192   # all steps and observations: ~11k context [paper: 10k]
  actor_rollout_ref.rollout.multi_turn.max_tool_response_length=4096
  actor_rollout_ref.rollout.tensor_model_parallel_size=2
  actor_rollout_ref.rollout.gpu_memory_utilization=0.6
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2
  actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4
)

# Run a preparation command, or only show it in a dry run.
step() {
  if [ "$DRY_RUN" = 1 ]; then printf '[dry run] would run:'; printf ' %q' "$@"; echo; else "$@"; fi
}

# Checks that PYTHON has the package and sets STEPPO_PACKAGE_DIR. find_spec locates the package without running
# it: importing it imports verl, ~6 s per interpreter on 2 cores (the recipe's own steps import it anyway).
check_python() {
  local locate="import importlib.util as u; print(u.find_spec('steppo_verl').submodule_search_locations[0])"
  STEPPO_PACKAGE_DIR=$("$PYTHON" -c "$locate" 2>/dev/null) \
    || die "$PYTHON cannot import steppo_verl: install it into your verl environment (pip install -e .)"
}

# Keep verl's per-process noise out of the output (~2,800 of the 4,000 lines of a 10-step CPU vault run).
# Exported: Ray workers inherit this environment.
quiet_logs() {
  # verl's engine registry warns in every process about each optional engine that is not installed
  # (torchtitan, veomni, ...). The user's own PYTHONWARNINGS entries come later and take precedence.
  export PYTHONWARNINGS="ignore::UserWarning:verl.workers.engine${PYTHONWARNINGS:+,$PYTHONWARNINGS}"
  # TransferQueue asks torch for TQ_NUM_THREADS (default 8) threads at every put and get, and on a machine
  # with fewer physical cores warns each time before using the core count: ask for that count.
  if [ -z "${TQ_NUM_THREADS:-}" ]; then
    TQ_NUM_THREADS=$("$PYTHON" -c "import psutil; print(min(8, psutil.cpu_count(logical=False) or 8))")
    export TQ_NUM_THREADS
  fi
}

prepare_data() {
  if [ -f "$DATA_DIR/train.parquet" ] && [ -f "$DATA_DIR/validation.parquet" ]; then return; fi
  if [ -z "$HOTPOTQA_TRAIN_JSON" ] || [ -z "$HOTPOTQA_DEV_JSON" ]; then
    local missing="no train.parquet/validation.parquet in DATA_DIR=$DATA_DIR; set DATA_DIR to prepared data, or \
HOTPOTQA_TRAIN_JSON and HOTPOTQA_DEV_JSON to the official HotpotQA files (hotpot_train_v1.1.json, \
hotpot_dev_distractor_v1.json) to prepare it"
    [ "$DRY_RUN" = 1 ] && { echo "[dry run] $missing" >&2; return; }
    die "$missing"
  fi
  for f in "$HOTPOTQA_TRAIN_JSON" "$HOTPOTQA_DEV_JSON"; do [ -f "$f" ] || die "HotpotQA file not found: $f"; done
  step "$PYTHON" -m steppo_verl.tasks.qa.prepare --dataset hotpotqa --out-dir "$DATA_DIR" \
    --input "train=$HOTPOTQA_TRAIN_JSON" --input "validation=$HOTPOTQA_DEV_JSON"
}

# Sets RETRIEVER_ENV: the tool config reads these variables in the agent-loop workers.
setup_retriever() {
  if [ -n "$RETRIEVER_URL" ]; then
    RETRIEVER_ENV=(STEPPO_SEARCH_BACKEND=http "STEPPO_RETRIEVER_URL=$RETRIEVER_URL")
    return
  fi
  INDEX_DIR=$(cd "$(dirname "$INDEX_DIR")" 2>/dev/null && pwd)/$(basename "$INDEX_DIR") \
    || die "the parent directory of INDEX_DIR=$INDEX_DIR does not exist"
  if [ ! -f "$INDEX_DIR/steppo_index.json" ]; then
    [ -f "$DATA_DIR/corpus.jsonl" ] || [ "$DRY_RUN" = 1 ] \
      || die "no BM25 index in INDEX_DIR=$INDEX_DIR and no $DATA_DIR/corpus.jsonl to build it from"
    step "$PYTHON" -m steppo_verl.tasks.qa.retrieval.server --corpus "$DATA_DIR/corpus.jsonl" --index "$INDEX_DIR" --build-only
  fi
  RETRIEVER_ENV=(STEPPO_SEARCH_BACKEND=embedded "STEPPO_INDEX_DIR=$INDEX_DIR")
}

# The settings every HotpotQA script shares; sources: [verl] defaults, [paper] StepPO's HotpotQA
# setting, [s-r1] Search-R1. Algorithm-specific choices come from each script.
# A file shipped inside the installed steppo_verl package, by its path below the package.
package_file() {
  [ -n "${STEPPO_PACKAGE_DIR:-}" ] || check_python
  local IFS=/
  printf '%s\n' "$STEPPO_PACKAGE_DIR/$*"
}

# Hydra overrides that hand the retriever settings (RETRIEVER_ENV) to every Ray worker.
retriever_overrides() {
  local kv
  for kv in "${RETRIEVER_ENV[@]}"; do
    printf '%s\n' "+ray_kwargs.ray_init.runtime_env.env_vars.${kv%%=*}=${kv#*=}"
  done
}

common_overrides() {
  local tool_config
  tool_config=$(package_file tasks qa search_tool.yaml)
  COMMON_OVERRIDES=(
    "data.train_files=$DATA_DIR/train.parquet"
    "data.val_files=$DATA_DIR/validation.parquet"
    "${POLICY_RUN[@]}"
    "actor_rollout_ref.rollout.multi_turn.tool_config_path=$tool_config"
    "actor_rollout_ref.rollout.agent.agent_loop_config_path=$(package_file config agent_loop.yaml)"
    "actor_rollout_ref.model.path=$MODEL_PATH"
    actor_rollout_ref.model.enable_gradient_checkpointing=true
    actor_rollout_ref.actor.ppo_epochs=1        # [paper]
    actor_rollout_ref.rollout.name=vllm
    "critic.model.path=$CRITIC_MODEL_PATH"
    critic.ppo_micro_batch_size_per_gpu=2
    trainer.total_epochs=5                      # [paper]
    trainer.test_freq=10                        # [paper]
    trainer.val_before_train=true               # [paper]
    trainer.save_freq=50
    "trainer.n_gpus_per_node=$N_GPUS"
    "trainer.nnodes=$NNODES"
    "trainer.project_name=$PROJECT_NAME"
    "trainer.experiment_name=$EXPERIMENT_NAME"
    "trainer.logger=$LOGGER"
  )
  mapfile -t -O "${#COMMON_OVERRIDES[@]}" COMMON_OVERRIDES < <(retriever_overrides)
}

# launch ALGORITHM_OVERRIDES... -- USER_OVERRIDES...
launch() {
  check_python
  quiet_logs
  prepare_data
  setup_retriever
  common_overrides
  local algorithm=() user=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do algorithm+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  user=("$@")
  local cmd=("$PYTHON" -m steppo_verl.main "${COMMON_OVERRIDES[@]}" "${algorithm[@]}" "${user[@]}")
  if [ "$DRY_RUN" = 1 ]; then
    printf "%q " "${cmd[@]}"; echo
    return
  fi
  command -v nvidia-smi >/dev/null || die "no nvidia-smi: these scripts are for GPU nodes; see the README for the CPU run"
  exec "${cmd[@]}"
}
