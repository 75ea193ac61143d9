"""The recipe scripts: syntax, dry runs, and the hydra config their command composes (--cfg job)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

RECIPE = Path(__file__).resolve().parents[1] / "recipe" / "steppo"
SCRIPTS = sorted(RECIPE.glob("*.sh"))

# The baselines without a critic (common.sh: GROUP_BASELINE, LOW_VAR_KL) [paper's GRPO/GiGPO setting].
GROUP_BASELINE = {
    "actor_rollout_ref.actor.policy_loss.loss_mode": "vanilla",
    "actor_rollout_ref.actor.clip_ratio_low": 0.2,
    "actor_rollout_ref.actor.clip_ratio_high": 0.2,
    "critic.enable": False,
    "actor_rollout_ref.rollout.n": 8,
    "data.train_batch_size": 32,
    "actor_rollout_ref.actor.ppo_mini_batch_size": 32,
}
LOW_VAR_KL = {
    "actor_rollout_ref.actor.use_kl_loss": True,
    "actor_rollout_ref.actor.kl_loss_coef": 0.001,
    "actor_rollout_ref.actor.kl_loss_type": "low_var_kl",
}
# How the policy runs (common.sh: POLICY_RUN), in training and in the paper's evaluation alike.
POLICY_RUN = {
    "data.max_prompt_length": 3072,
    "data.truncation": "error",
    "actor_rollout_ref.rollout.response_length": 8192,
    "actor_rollout_ref.rollout.multi_turn.max_tool_response_length": 4096,
    "actor_rollout_ref.rollout.tensor_model_parallel_size": 2,
    "actor_rollout_ref.rollout.gpu_memory_utilization": 0.6,
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": 4,
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": 2,
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu": 4,
}

# What each script must select; everything else is shared.
EXPECTED = {
    "run_qwen2.5-7b_hotpotqa.sh": {
        "algorithm.adv_estimator": "steppo",
        "actor_rollout_ref.actor.policy_loss.loss_mode": "steppo",
        "critic.enable": True,
        "actor_rollout_ref.rollout.n": 1,
        "data.train_batch_size": 256,
    },
    "run_qwen2.5-7b_hotpotqa_grpo.sh": {
        "algorithm.adv_estimator": "grpo",
        "actor_rollout_ref.actor.policy_loss.loss_mode": "vanilla",
        "critic.enable": False,
        "actor_rollout_ref.rollout.n": 8,
        "data.train_batch_size": 32,
    },
    "run_qwen2.5-7b_hotpotqa_ppo.sh": {
        "algorithm.adv_estimator": "gae",
        "actor_rollout_ref.actor.policy_loss.loss_mode": "vanilla",
        "critic.enable": True,
    },
    "run_qwen2.5-7b_hotpotqa_gigpo.sh": {
        "algorithm.adv_estimator": "gigpo",
        "algorithm.gigpo.step_weight": 1.0,
        **GROUP_BASELINE,
        **LOW_VAR_KL,
    },
    "run_qwen2.5-7b_hotpotqa_hgpo.sh": {
        "algorithm.adv_estimator": "hgpo",
        "algorithm.gamma": 0.95,
        "algorithm.hgpo.history_length": 4,
        "algorithm.hgpo.alpha": 1.0,
        **GROUP_BASELINE,
        **LOW_VAR_KL,
    },
}
SHARED = {
    "trainer.v1.trainer_mode": "steppo",
    "actor_rollout_ref.rollout.agent.default_agent_loop": "steppo_agent",
    "actor_rollout_ref.rollout.multi_turn.enable": True,
    "actor_rollout_ref.rollout.multi_turn.max_assistant_turns": 5,
    "algorithm.gamma": 0.99,
    "reward.custom_reward_function.path": "pkg://steppo_verl.tasks.qa.reward",
    "trainer.total_epochs": 5,
    "trainer.steppo_dump.every_n_steps": 10,
    **POLICY_RUN,
}


@pytest.fixture
def data_dir(tmp_path):
    for name in ("train.parquet", "validation.parquet"):
        (tmp_path / name).touch()
    return tmp_path


def run_script(script: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DATA_DIR", "RETRIEVER", "INDEX_DIR"))}
    return subprocess.run(
        ["bash", str(script), *args], capture_output=True, text=True, timeout=120,
        env={**base, "PYTHON": sys.executable, **env},
    )


def lookup(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def composed_config(command: list[str]) -> dict:
    """The configuration hydra composes for a training command (``--cfg job``), as plain data."""
    composed = subprocess.run(command + ["--cfg", "job"], capture_output=True, text=True, timeout=180)
    assert composed.returncode == 0, composed.stderr[-3000:]
    return yaml.safe_load(composed.stdout)


def test_every_script_is_valid_bash():
    assert len(SCRIPTS) == 14
    for script in SCRIPTS:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dry_run_prints_a_command_that_composes_to_the_expected_config(name, data_dir):
    result = run_script(RECIPE / name, {"DRY_RUN": "1", "DATA_DIR": str(data_dir)}, "trainer.save_freq=7")
    assert result.returncode == 0, result.stderr
    command = shlex.split(result.stdout.strip().splitlines()[-1])
    assert command[:3] == [sys.executable, "-m", "steppo_verl.main"]
    assert "would run:" in result.stdout and "--build-only" in result.stdout, "the index would be built first"

    config = composed_config(command)
    for key, value in {**SHARED, **EXPECTED[name]}.items():
        assert lookup(config, key) == value, key
    assert lookup(config, "trainer.save_freq") == 7, "user overrides come last"
    assert lookup(config, "data.train_files") == str(data_dir / "train.parquet")
    env_vars = lookup(config, "ray_kwargs.ray_init.runtime_env.env_vars")
    assert env_vars == {"STEPPO_SEARCH_BACKEND": "embedded", "STEPPO_INDEX_DIR": str(data_dir / "bm25_index")}
    assert Path(lookup(config, "actor_rollout_ref.rollout.multi_turn.tool_config_path")).is_file()
    assert Path(lookup(config, "actor_rollout_ref.rollout.agent.agent_loop_config_path")).is_file()


def test_retriever_url_selects_the_http_backend(data_dir):
    result = run_script(
        RECIPE / "run_qwen2.5-7b_hotpotqa.sh",
        {"DRY_RUN": "1", "DATA_DIR": str(data_dir), "RETRIEVER_URL": "http://127.0.0.1:8123"},
    )
    assert result.returncode == 0, result.stderr
    assert "env_vars.STEPPO_SEARCH_BACKEND=http" in result.stdout
    assert "env_vars.STEPPO_RETRIEVER_URL=http://127.0.0.1:8123" in result.stdout
    assert "--build-only" not in result.stdout


def test_missing_data_fails_early_with_what_to_set(tmp_path):
    result = run_script(RECIPE / "run_qwen2.5-7b_hotpotqa.sh", {"DATA_DIR": str(tmp_path / "none")})
    assert result.returncode != 0
    assert "HOTPOTQA_TRAIN_JSON and HOTPOTQA_DEV_JSON" in result.stderr


def test_missing_index_and_corpus_fails_early(data_dir):
    result = run_script(RECIPE / "run_qwen2.5-7b_hotpotqa.sh", {"DATA_DIR": str(data_dir)})
    assert result.returncode != 0
    assert "no BM25 index" in result.stderr


def test_an_interpreter_without_the_package_fails_early(data_dir, tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    result = run_script(RECIPE / "run_qwen2.5-7b_hotpotqa.sh", {"DATA_DIR": str(data_dir), "PYTHON": str(fake)})
    assert result.returncode != 0 and "cannot import steppo_verl" in result.stderr


@pytest.mark.timeout(300)
def test_cpu_smoke_dry_run_composes_the_cpu_platform_config(tmp_path):
    result = run_script(RECIPE / "run_cpu_smoke.sh", {"DRY_RUN": "1", "WORK_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    for preparation in ("steppo_verl.dev.tiny_model", "steppo_verl.tasks.qa.prepare", "--build-only"):
        assert preparation in result.stdout
    command = shlex.split(result.stdout.strip().splitlines()[-1])
    assert command[:4] == [sys.executable, "-m", "steppo_verl.main", "+platform=cpu"]
    config = composed_config(command)
    for key, value in {
        "trainer.device": "cpu",
        "actor_rollout_ref.rollout.name": "hf",
        "actor_rollout_ref.actor.strategy": "fsdp2",
        "critic.strategy": "fsdp2",
        "algorithm.adv_estimator": "steppo",
        "actor_rollout_ref.model.path": str(tmp_path / "model"),
        "transfer_queue.backend.SimpleStorage.num_data_storage_units": 1,
        "trainer.steppo_dump.every_n_steps": 1,  # records of every step for the report the run ends with
    }.items():
        assert lookup(config, key) == value, key


@pytest.mark.timeout(300)
def test_quiet_logs_keeps_verls_engine_warnings_out_and_the_users_own_filters():
    """Each verl process warned about every optional engine not installed (torchtitan, veomni, ...), and
    TransferQueue about its thread count on every put and get on machines with fewer than 8 cores."""
    script = ('source "$1"; quiet_logs; echo "$PYTHONWARNINGS $TQ_NUM_THREADS"; '
              '"$PYTHON" -c "import verl.workers.engine"')
    result = subprocess.run(
        ["bash", "-c", script, "bash", str(RECIPE / "common.sh")], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHON": sys.executable, "PYTHONWARNINGS": "default::DeprecationWarning"},
    )
    assert result.returncode == 0, result.stderr
    warnings, threads = result.stdout.split()[:2]
    assert warnings == "ignore::UserWarning:verl.workers.engine,default::DeprecationWarning"
    assert int(threads) == min(8, psutil.cpu_count(logical=False) or 8)
    assert "engine is not available" not in result.stderr


VAULT_ESTIMATORS = {
    "steppo": {"algorithm.adv_estimator": "steppo", "critic.enable": True,
               "actor_rollout_ref.actor.policy_loss.loss_mode": "steppo_action_clip"},
    "grpo": {"algorithm.adv_estimator": "grpo", "critic.enable": False,
             "actor_rollout_ref.actor.policy_loss.loss_mode": "vanilla"},
    "gae": {"algorithm.adv_estimator": "gae", "critic.enable": True,
            "actor_rollout_ref.actor.policy_loss.loss_mode": "vanilla"},
    "gigpo": {"algorithm.adv_estimator": "gigpo", "critic.enable": False,
              "actor_rollout_ref.actor.policy_loss.loss_mode": "vanilla"},
    "hgpo": {"algorithm.adv_estimator": "hgpo", "critic.enable": False,
             "actor_rollout_ref.actor.policy_loss.loss_mode": "vanilla"},
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("estimator", sorted(VAULT_ESTIMATORS))
def test_vault_dry_run_gives_every_estimator_the_same_budget(estimator, tmp_path):
    env = {"DRY_RUN": "1", "WORK_DIR": str(tmp_path), "ESTIMATOR": estimator, "SEED": "3", "STEPS": "5"}
    result = run_script(RECIPE / "run_cpu_vault.sh", env)
    assert result.returncode == 0, result.stderr
    assert "steppo_verl.tasks.vault.prepare" in result.stdout and "--warm-start" in result.stdout
    command = shlex.split(result.stdout.strip().splitlines()[-1])
    assert command[:5] == [sys.executable, "-m", "steppo_verl.main", "+platform=cpu", "+task=vault"]
    config = composed_config(command)
    for key, value in {
        **VAULT_ESTIMATORS[estimator],
        "data.train_batch_size": 8,
        "actor_rollout_ref.rollout.n": 8,
        "trainer.total_training_steps": 5,
        "actor_rollout_ref.rollout.seed": 3,
        "data.seed": 3,
        "reward.custom_reward_function.path": "pkg://steppo_verl.tasks.vault.reward",
        "actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype": "fp32",
        "trainer.default_local_dir": str(tmp_path / "runs" / f"{estimator}-3" / "checkpoints"),
    }.items():
        assert lookup(config, key) == value, key
    assert lookup(config, "actor_rollout_ref.rollout.multi_turn.tool_config_path").endswith("vault_tool.yaml")


TEXTWORLD_ESTIMATORS = {  # the game rewards through env_rewards: GRPO is this plugin's step_grpo
    **{name: VAULT_ESTIMATORS[name] for name in ("steppo", "gigpo", "hgpo")},
    "grpo": {**VAULT_ESTIMATORS["grpo"], "algorithm.adv_estimator": "step_grpo"},
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("estimator", sorted(TEXTWORLD_ESTIMATORS))
def test_textworld_dry_run_gives_every_estimator_the_vaults_budget_on_generated_games(estimator, tmp_path):
    env = {"DRY_RUN": "1", "WORK_DIR": str(tmp_path), "ESTIMATOR": estimator, "SEED": "3", "STEPS": "5",
           "WORLD": "2", "LEVEL": "3", "GAMES": "4", "DEMOS": "64", "WARM_START_STEPS": "50"}
    result = run_script(RECIPE / "run_cpu_textworld.sh", env)
    assert result.returncode == 0, result.stderr
    games, model = [shlex.split(line.split("would run:", 1)[1]) for line in result.stdout.splitlines()
                    if "would run:" in line]
    assert "steppo_verl.tasks.textworld.prepare" in games
    for option, value in {"--levels": "3", "--train-seeds": "2000:2004", "--val-seeds": "2004:2012",
                          "--test-seeds": "0", "--demos": "64"}.items():
        assert games[games.index(option) + 1] == value, option
    assert model[-4:] == ["--warm-start", f"{tmp_path}/games-world2-level3/demos.jsonl", "--warm-start-steps", "50"]
    command = shlex.split(result.stdout.strip().splitlines()[-1])
    assert command[:5] == [sys.executable, "-m", "steppo_verl.main", "+platform=cpu", "+task=textworld_cpu"]
    config = composed_config(command)
    for key, value in {
        **TEXTWORLD_ESTIMATORS[estimator],
        "data.train_batch_size": 8,
        "actor_rollout_ref.rollout.n": 8,
        "actor_rollout_ref.actor.optim.lr": 1e-3,  # tiny_policy.yaml, as the vault's
        "actor_rollout_ref.actor.kl_loss_coef": 0.1,
        "actor_rollout_ref.rollout.agent.default_agent_loop": "steppo_env_agent",
        "actor_rollout_ref.rollout.multi_turn.max_assistant_turns": 6,
        "data.max_response_length": 384,
        "trainer.total_training_steps": 5,
        "actor_rollout_ref.rollout.seed": 3,
        "reward.custom_reward_function.path": "pkg://steppo_verl.envs.reward",
        "data.train_files": f"{tmp_path}/games-world2-level3/train.parquet",
    }.items():
        assert lookup(config, key) == value, key
    assert lookup(config, "actor_rollout_ref.rollout.agent.agent_loop_config_path").endswith("env_agent_loop.yaml")


def test_textworld_refuses_verls_gae_which_would_drop_the_games_rewards(tmp_path):
    env = {"DRY_RUN": "1", "WORK_DIR": str(tmp_path), "ESTIMATOR": "gae"}
    result = run_script(RECIPE / "run_cpu_textworld.sh", env)
    assert result.returncode != 0
    assert "ESTIMATOR=gae (verl's) reads only the outcome score" in result.stderr


# Stands in for the trainer (any other interpreter call goes to the real one): prints verl's metric lines
# and writes the configuration hydra would compose into hydra.run.dir.
FAKE_TRAINER = """#!/usr/bin/env bash
[ "$1 $2" = "-m steppo_verl.main" ] || exec "$REAL_PYTHON" "$@"
for arg; do case "$arg" in hydra.run.dir=*) dir=${arg#*=} ;; trainer.default_local_dir=*) checkpoints=${arg#*=} ;; esac
done
mkdir -p "$dir/.hydra"
echo "trainer: {total_training_steps: 2, save_freq: -1, default_local_dir: $checkpoints}" > "$dir/.hydra/config.yaml"
echo "(TaskRunnerV1 pid=1) step:1 - critic/score/mean:0.125 - timing_s/step:20.5"
echo "(TaskRunnerV1 pid=1) step:2 - critic/score/mean:0.25 - timing_s/step:19.5"
"""


@pytest.mark.timeout(600)
def test_vault_run_ends_with_its_summary_and_learning_curve(tmp_path):
    (tmp_path / "task-world0").mkdir()
    (tmp_path / "task-world0" / "train.parquet").touch()  # prepared task and model: no preparation step
    (tmp_path / "model-world0").mkdir()
    (tmp_path / "model-world0" / "config.json").touch()
    fake = tmp_path / "python"
    fake.write_text(FAKE_TRAINER)
    fake.chmod(0o755)
    result = run_script(RECIPE / "run_cpu_vault.sh", {"WORK_DIR": str(tmp_path), "PYTHON": str(fake),
                                                      "REAL_PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "steppo-0"
    assert "step:2 - critic/score/mean:0.25" in result.stdout, "not a terminal: verl's whole output, for parsers"
    assert "StepPO run finished (exit 0): 2 of 2 training steps" in result.stdout
    assert "| 2 | 0.250 | - | - | 19.5 |" in result.stdout
    assert f"full log:        {run_dir / 'run.log'}" in result.stdout
    assert "step:1 - critic/score/mean:0.125" in (run_dir / "run.log").read_text()
    assert "HTML report:     not made (no per-step dumps)" in result.stdout
    curve = run_dir / "learning_curve.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "learning curve:  not drawn (matplotlib is not installed" in result.stdout
    else:
        assert f"learning curve:  {curve}" in result.stdout and curve.read_bytes()[:4] == b"\x89PNG"


def test_vault_task_options_and_warm_start_steps_reach_the_preparation(tmp_path):
    env = {"DRY_RUN": "1", "WORK_DIR": str(tmp_path), "VAULT_OPTIONS": "--room-tokens --practice-rooms 8",
           "WARM_START_STEPS": "1500"}
    result = run_script(RECIPE / "run_cpu_vault.sh", env)
    assert result.returncode == 0, result.stderr
    task, model = [shlex.split(line.split("would run:", 1)[1]) for line in result.stdout.splitlines()
                   if "would run:" in line]
    assert task[-3:] == ["--room-tokens", "--practice-rooms", "8"] and "steppo_verl.tasks.vault.prepare" in task
    assert model[-2:] == ["--warm-start-steps", "1500"] and "steppo_verl.dev.tiny_model" in model


def test_vault_rejects_an_unknown_estimator(tmp_path):
    result = run_script(RECIPE / "run_cpu_vault.sh", {"WORK_DIR": str(tmp_path), "ESTIMATOR": "ppo"})
    assert result.returncode != 0
    assert "ESTIMATOR must be one of steppo, grpo, gae, gigpo, hgpo" in result.stderr


PAPER_EVAL = RECIPE / "eval_qwen2.5-7b_paper.sh"
EVAL_FIXTURES = {"hotpotqa": "hotpotqa_dev.json", "2wikimultihopqa": "2wikimultihopqa_dev.json",
                 "musique": "musique_dev.jsonl"}


@pytest.fixture
def eval_dir(tmp_path) -> Path:
    """The three paper datasets' fixtures, prepared and indexed as the evaluation recipe leaves them."""
    from steppo_verl.tasks.qa.prepare import SplitInput, prepare
    from steppo_verl.tasks.qa.retrieval import BM25Index, load_corpus

    fixtures = Path(__file__).resolve().parent / "fixtures" / "qa"
    for name, source in EVAL_FIXTURES.items():
        report = prepare(name, [SplitInput("validation", str(fixtures / source))], tmp_path / "eval" / name)
        BM25Index.build(load_corpus(report.corpus_path), progress=False).save(tmp_path / "eval" / name / "bm25_index")
    return tmp_path / "eval"


@pytest.mark.timeout(300)
def test_paper_eval_dry_run_searches_each_dataset_in_its_own_index(eval_dir, tmp_path):
    env = {"DRY_RUN": "1", "MODEL_PATH": str(tmp_path / "policy"), "EVAL_DIR": str(eval_dir),
           "MUSIQUE_RETRIEVER_URL": "http://127.0.0.1:8123"}
    result = run_script(PAPER_EVAL, env, "trainer.save_freq=7")
    assert result.returncode == 0, result.stderr
    assert "would run" not in result.stdout, "prepared data and indexes are used as they are"
    command = shlex.split(result.stdout.strip().splitlines()[-1])
    assert command[:3] == [sys.executable, "-m", "steppo_verl.tasks.qa.evaluate"]
    specs = [command[i + 1] for i, arg in enumerate(command) if arg == "--dataset"]
    assert specs == [f"hotpotqa={eval_dir}/hotpotqa/validation.parquet:{eval_dir}/hotpotqa/bm25_index",
                     f"2wikimultihopqa={eval_dir}/2wikimultihopqa/validation.parquet:"
                     f"{eval_dir}/2wikimultihopqa/bm25_index",
                     f"musique={eval_dir}/musique/validation.parquet:http://127.0.0.1:8123"]

    printed = subprocess.run(command + ["--dry-run"], capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr[-3000:]
    main = shlex.split(printed.stdout.strip().splitlines()[-1])
    config = composed_config(main)
    out = eval_dir / "results" / "policy"
    for key, value in {
        **POLICY_RUN,  # evaluated as trained
        "critic.enable": False,
        "trainer.val_only": True,
        "actor_rollout_ref.rollout.name": "vllm",
        "actor_rollout_ref.model.path": str(tmp_path / "policy"),
        "data.val_files": str(out / "eval.parquet"),
        "reward.custom_reward_function.name": "score_sample",
        "trainer.n_gpus_per_node": 8,
        "trainer.save_freq": 7,  # user overrides come last
    }.items():
        assert lookup(config, key) == value, key
    tool_config_path = Path(lookup(config, "actor_rollout_ref.rollout.multi_turn.tool_config_path"))
    tool_config = yaml.safe_load(tool_config_path.read_text())
    assert tool_config["tools"][0]["config"]["indexes"] == {
        "hotpotqa": str(eval_dir / "hotpotqa" / "bm25_index"),
        "2wikimultihopqa": str(eval_dir / "2wikimultihopqa" / "bm25_index"),
        "musique": "http://127.0.0.1:8123",
    }


def test_paper_eval_without_a_model_fails_early(tmp_path):
    result = run_script(PAPER_EVAL, {"MODEL_PATH": "", "EVAL_DIR": str(tmp_path)})
    assert result.returncode != 0 and "set MODEL_PATH" in result.stderr


def test_paper_eval_without_data_says_which_dev_file_to_set(tmp_path):
    result = run_script(PAPER_EVAL, {"MODEL_PATH": "policy", "EVAL_DIR": str(tmp_path / "none")})
    assert result.returncode != 0 and "set the official dev file of hotpotqa" in result.stderr


# ----------------------------------------------------------------------------- ALFWorld (alfworld.sh)

# What every ALFWorld script shares [paper's ALFWorld setting, alfworld.sh], and what each selects.
ALFWORLD_SHARED = {
    "trainer.v1.trainer_mode": "steppo",
    "actor_rollout_ref.rollout.agent.default_agent_loop": "steppo_env_agent",
    "actor_rollout_ref.rollout.multi_turn.max_assistant_turns": 20,
    "reward.custom_reward_function.path": "pkg://steppo_verl.envs.reward",
    **LOW_VAR_KL,
    "algorithm.gamma": 1.0,
    "algorithm.lam": 1.0,
    "actor_rollout_ref.actor.entropy_coeff": 0,
    "trainer.total_epochs": 10,
    "trainer.test_freq": 5,
    "trainer.val_before_train": True,
    "data.truncation": "error",
}
ALFWORLD_GROUP_BASELINE = {**GROUP_BASELINE, "data.train_batch_size": 16,
                           "actor_rollout_ref.actor.ppo_mini_batch_size": 16}
ALFWORLD_EXPECTED = {
    "run_qwen2.5-7b_alfworld.sh": {
        "algorithm.adv_estimator": "steppo",
        "actor_rollout_ref.actor.policy_loss.loss_mode": "steppo_step_mean",
        "actor_rollout_ref.actor.clip_ratio_low": 3e-4,
        "actor_rollout_ref.actor.clip_ratio_high": 4e-4,
        "actor_rollout_ref.actor.clip_ratio_c": 10.0,
        "critic.enable": True,
        "actor_rollout_ref.rollout.n": 1,
        "data.train_batch_size": 128,
        "actor_rollout_ref.actor.ppo_mini_batch_size": 128,
    },
    "run_qwen2.5-7b_alfworld_grpo.sh": {"algorithm.adv_estimator": "step_grpo", **ALFWORLD_GROUP_BASELINE},
    "run_qwen2.5-7b_alfworld_gigpo.sh": {
        "algorithm.adv_estimator": "gigpo", "algorithm.gigpo.step_weight": 1.0, **ALFWORLD_GROUP_BASELINE,
    },
}


@pytest.fixture
def alfworld_rows(tmp_path):
    for name in ("train.parquet", "validation.parquet", "test.parquet"):
        (tmp_path / name).touch()
    return tmp_path


def run_alfworld(script: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "ALFWORLD_DATA")}
    return subprocess.run(["bash", str(RECIPE / script), *args], capture_output=True, text=True, timeout=120,
                          env={**base, "PYTHON": sys.executable, **env})


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(ALFWORLD_EXPECTED))
def test_alfworld_dry_run_composes_the_papers_alfworld_setting(name, alfworld_rows):
    from steppo_verl.advantage import ESTIMATORS

    result = run_alfworld(name, {"DRY_RUN": "1", "DATA_DIR": str(alfworld_rows)}, "trainer.save_freq=7")
    assert result.returncode == 0, result.stderr
    assert "would run" not in result.stdout, "prepared rows are used as they are"
    command = shlex.split(result.stdout.strip().splitlines()[-1])
    assert command[:4] == [sys.executable, "-m", "steppo_verl.main", "+task=alfworld"]
    config = composed_config(command)
    for key, value in {**ALFWORLD_SHARED, **ALFWORLD_EXPECTED[name]}.items():
        assert lookup(config, key) == value, key
    assert lookup(config, "algorithm.adv_estimator") in ESTIMATORS, "the env loop's rewards reach only ours"
    assert lookup(config, "trainer.save_freq") == 7, "user overrides come last"
    assert lookup(config, "data.train_files") == str(alfworld_rows / "train.parquet")
    assert lookup(config, "data.val_files") == [str(alfworld_rows / "validation.parquet"),
                                                str(alfworld_rows / "test.parquet")], "valid_seen and valid_unseen"
    assert lookup(config, "actor_rollout_ref.rollout.multi_turn.tool_config_path") is None
    assert lookup(config, "actor_rollout_ref.rollout.agent.agent_loop_config_path").endswith("env_agent_loop.yaml")


def test_alfworld_without_rows_or_alfworld_data_says_what_to_install_and_download(tmp_path):
    result = run_alfworld("run_qwen2.5-7b_alfworld.sh", {"DATA_DIR": str(tmp_path / "none")})
    assert result.returncode != 0
    assert "ALFWORLD_DATA is not set" in result.stderr and "pip install alfworld" in result.stderr
    assert "alfworld-download" in result.stderr


def test_alfworld_rows_are_prepared_from_alfworld_data_first(tmp_path):
    env = {"DRY_RUN": "1", "DATA_DIR": str(tmp_path / "rows"), "ALFWORLD_DATA": str(tmp_path / "alfworld")}
    result = run_alfworld("run_qwen2.5-7b_alfworld_grpo.sh", env)
    assert result.returncode == 0, result.stderr
    preparation = shlex.split(result.stdout.split("would run:", 1)[1].splitlines()[0])
    assert preparation == [sys.executable, "-m", "steppo_verl.tasks.alfworld.prepare", "--data-dir",
                           str(tmp_path / "alfworld"), "--out", str(tmp_path / "rows")]


def test_alfworld_run_without_pddl_support_stops_before_the_trainer_saying_what_to_install(alfworld_rows):
    import importlib.util

    if importlib.util.find_spec("alfworld") and importlib.util.find_spec("fast_downward"):
        pytest.skip("ALFWorld is installed here")
    result = run_alfworld("run_qwen2.5-7b_alfworld.sh", {"DATA_DIR": str(alfworld_rows)})
    assert result.returncode != 0
    assert "cannot play ALFWorld games" in result.stderr and "pip install alfworld" in result.stderr
    assert "nvidia-smi" not in result.stderr, "stopped before the GPU check"
