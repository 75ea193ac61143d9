"""Start-up checks of CPU runs: a clear error instead of a hang or an out-of-memory machine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

import steppo_verl
from steppo_verl.cpu.resources import check_cpu_resources, estimate_training_bytes

CONFIG_DIR = os.path.join(os.path.dirname(steppo_verl.__file__), "config")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from steppo_verl.dev.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def cpu_config(model, *overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose("steppo_trainer", overrides=["+platform=cpu", f"actor_rollout_ref.model.path={model}",
                                                    f"critic.model.path={model}", *overrides])


def test_the_shipped_cpu_configuration_passes(tiny_model):
    check_cpu_resources(cpu_config(tiny_model))


def test_more_ranks_than_logical_gpus_is_an_error_not_a_hang(tiny_model):
    config = cpu_config(tiny_model, "trainer.n_gpus_per_node=4")
    with pytest.raises(ValueError, match=r"4 FSDP ranks .* 2 logical GPUs.*\+ray_kwargs.ray_init.num_gpus=4"):
        check_cpu_resources(config)


def test_a_model_too_big_for_the_memory_is_an_error(tiny_model):
    config = cpu_config(tiny_model)
    with pytest.raises(ValueError, match=r"7,000M-parameter model .* needs about \d+\.\d GiB .* 24\.0 GiB"):
        check_cpu_resources(config, available_bytes=24 * 2**30, num_parameters=7_000_000_000)


def test_memory_estimate_counts_critic_and_reference(tiny_model):
    base = estimate_training_bytes(cpu_config(tiny_model, "critic.enable=false"), 10**9)
    with_critic = estimate_training_bytes(cpu_config(tiny_model), 10**9)
    with_ref = estimate_training_bytes(cpu_config(tiny_model, "actor_rollout_ref.actor.use_kl_loss=true"), 10**9)
    assert with_critic - base > 16e9 and with_ref - with_critic == pytest.approx(4e9)


@pytest.mark.timeout(300)
def test_the_entry_point_fails_before_starting_ray(tiny_model, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "steppo_verl.main", "+platform=cpu", f"actor_rollout_ref.model.path={tiny_model}",
         f"critic.model.path={tiny_model}", "trainer.n_gpus_per_node=8", f"hydra.run.dir={tmp_path}",
         "data.train_files=[]", "data.val_files=[]"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "+ray_kwargs.ray_init.num_gpus=8" in result.stderr
    assert "Started a local Ray instance" not in result.stderr + result.stdout


def test_cpu_training_runs_on_padded_micro_batches(tiny_model):
    """verl packs a micro-batch's rows into one sequence (``use_remove_padding``), which only pays with
    flash-attention's varlen kernel: sdpa on CPU then scores every token against every other of the pack, 2-9x
    the padded cost for the vault's rows (benchmarks/README.md, "A CPU training step")."""
    config = cpu_config(tiny_model)
    assert config.actor_rollout_ref.model.override_config.attn_implementation == "sdpa"
    assert config.actor_rollout_ref.model.use_remove_padding is False
    assert config.critic.model.use_remove_padding is False
