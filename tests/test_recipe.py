"""The recipe scripts: syntax, dry runs, and the hydra config their command composes (--cfg job)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

RECIPE = Path(__file__).resolve().parents[1] / "recipe" / "steppo"
SCRIPTS = sorted(RECIPE.glob("*.sh"))

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
        "actor_rollout_ref.actor.use_kl_loss": True,
        "actor_rollout_ref.actor.kl_loss_coef": 0.001,
        "actor_rollout_ref.rollout.n": 8,
    },
}
SHARED = {
    "trainer.v1.trainer_mode": "steppo",
    "actor_rollout_ref.rollout.agent.default_agent_loop": "steppo_agent",
    "actor_rollout_ref.rollout.multi_turn.enable": True,
    "actor_rollout_ref.rollout.multi_turn.max_assistant_turns": 5,
    "algorithm.gamma": 0.99,
    "reward.custom_reward_function.path": "pkg://steppo_verl.rewards.qa",
    "trainer.total_epochs": 5,
    "trainer.steppo_dump.every_n_steps": 10,
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


def test_every_script_is_valid_bash():
    assert len(SCRIPTS) == 7
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

    composed = subprocess.run(command + ["--cfg", "job"], capture_output=True, text=True, timeout=180)
    assert composed.returncode == 0, composed.stderr[-3000:]
    config = yaml.safe_load(composed.stdout)
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
    for preparation in ("steppo_verl.cpu.tiny_model", "steppo_verl.data.prepare", "--build-only"):
        assert preparation in result.stdout
    command = shlex.split(result.stdout.strip().splitlines()[-1])
    assert command[:4] == [sys.executable, "-m", "steppo_verl.main", "+platform=cpu"]
    composed = subprocess.run(command + ["--cfg", "job"], capture_output=True, text=True, timeout=180)
    assert composed.returncode == 0, composed.stderr[-3000:]
    config = yaml.safe_load(composed.stdout)
    for key, value in {
        "trainer.device": "cpu",
        "actor_rollout_ref.rollout.name": "hf",
        "actor_rollout_ref.actor.strategy": "fsdp2",
        "critic.strategy": "fsdp2",
        "algorithm.adv_estimator": "steppo",
        "actor_rollout_ref.model.path": str(tmp_path / "model"),
        "transfer_queue.backend.SimpleStorage.num_data_storage_units": 1,
    }.items():
        assert lookup(config, key) == value, key


VAULT_ESTIMATORS = {
    "steppo": {"algorithm.adv_estimator": "steppo", "critic.enable": True,
               "actor_rollout_ref.actor.policy_loss.loss_mode": "steppo"},
    "grpo": {"algorithm.adv_estimator": "grpo", "critic.enable": False,
             "actor_rollout_ref.actor.policy_loss.loss_mode": "vanilla"},
    "gae": {"algorithm.adv_estimator": "gae", "critic.enable": True,
            "actor_rollout_ref.actor.policy_loss.loss_mode": "vanilla"},
    "gigpo": {"algorithm.adv_estimator": "gigpo", "critic.enable": False,
              "actor_rollout_ref.actor.policy_loss.loss_mode": "vanilla"},
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("estimator", sorted(VAULT_ESTIMATORS))
def test_vault_dry_run_gives_every_estimator_the_same_budget(estimator, tmp_path):
    env = {"DRY_RUN": "1", "WORK_DIR": str(tmp_path), "ESTIMATOR": estimator, "SEED": "3", "STEPS": "5"}
    result = run_script(RECIPE / "run_cpu_vault.sh", env)
    assert result.returncode == 0, result.stderr
    assert "steppo_verl.data.vault" in result.stdout and "--warm-start" in result.stdout
    command = shlex.split(result.stdout.strip().splitlines()[-1])
    assert command[:5] == [sys.executable, "-m", "steppo_verl.main", "+platform=cpu", "+task=vault"]
    composed = subprocess.run(command + ["--cfg", "job"], capture_output=True, text=True, timeout=180)
    assert composed.returncode == 0, composed.stderr[-3000:]
    config = yaml.safe_load(composed.stdout)
    for key, value in {
        **VAULT_ESTIMATORS[estimator],
        "data.train_batch_size": 8,
        "actor_rollout_ref.rollout.n": 8,
        "trainer.total_training_steps": 5,
        "actor_rollout_ref.rollout.seed": 3,
        "data.seed": 3,
        "reward.custom_reward_function.path": "pkg://steppo_verl.rewards.vault",
        "actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype": "fp32",
        "trainer.default_local_dir": str(tmp_path / "runs" / f"{estimator}-3" / "checkpoints"),
    }.items():
        assert lookup(config, key) == value, key
    assert lookup(config, "actor_rollout_ref.rollout.multi_turn.tool_config_path").endswith("vault_tool.yaml")


def test_vault_rejects_an_unknown_estimator(tmp_path):
    result = run_script(RECIPE / "run_cpu_vault.sh", {"WORK_DIR": str(tmp_path), "ESTIMATOR": "ppo"})
    assert result.returncode != 0
    assert "ESTIMATOR must be one of steppo, grpo, gae, gigpo" in result.stderr
