"""Start-up checks for CPU runs: fail with numbers instead of hanging or swapping.

On CPU, verl asks Ray for one placement-group bundle per FSDP rank with a logical "GPU" each; a
request Ray cannot satisfy waits forever (``verl/single_controller/ray/base.py``, no timeout). And
every rank, the critic, the reference model and the rollout server hold model copies in host RAM.
Both are checked before Ray starts.
"""

from __future__ import annotations

from typing import Any

import psutil

__all__ = ["check_cpu_resources", "estimate_training_bytes"]

# Bytes per parameter of a trained model: fp32 weights, gradients and Adam's two moments.
_TRAINED_BYTES = 16
# Bytes per parameter of a model that only runs forward (reference policy, rollout server).
_FORWARD_BYTES = 4
# What a verl worker process costs before any model is loaded (torch, verl, Ray), measured ~0.55 GB.
_PROCESS_BYTES = 0.6e9


def _num_parameters(model_path: str, override: dict[str, Any]) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, **override)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config).num_parameters()


def estimate_training_bytes(config: Any, num_parameters: int) -> float:
    """Host memory a CPU run needs: trained copies (actor, critic), forward copies (ref, rollout), processes."""
    trained = 1 + bool(config.critic.get("enable"))
    forward = 1 + bool(config.actor_rollout_ref.actor.get("use_kl_loss") or config.algorithm.get("use_kl_in_reward"))
    ranks = config.trainer.n_gpus_per_node * config.trainer.nnodes
    processes = ranks * (1 + trained) + 4  # FSDP ranks per role, driver, task runner, rollout, agent loop
    return num_parameters * (trained * _TRAINED_BYTES + forward * _FORWARD_BYTES) + processes * _PROCESS_BYTES


def check_cpu_resources(config: Any, available_bytes: float | None = None, num_parameters: int | None = None) -> None:
    """Raise ValueError, saying what to set, if a CPU run cannot get its Ray resources or memory.

    Args:
        config: the composed trainer config (``trainer.device == "cpu"``).
        available_bytes: host memory available; defaults to what psutil reports.
        num_parameters: model size; defaults to reading the actor model's config (no weights loaded).
    """
    ranks = config.trainer.n_gpus_per_node * config.trainer.nnodes
    ray_init = config.get("ray_kwargs", {}).get("ray_init", {})
    logical_gpus = ray_init.get("num_gpus") or 0
    if logical_gpus < ranks:
        raise ValueError(
            f"the CPU run asks for {ranks} FSDP ranks (trainer.n_gpus_per_node x trainer.nnodes) but Ray is told of "
            f"{logical_gpus} logical GPUs, and verl's placement groups would wait forever: set "
            f"+ray_kwargs.ray_init.num_gpus={ranks} or lower trainer.n_gpus_per_node"
        )
    if num_parameters is None:
        model = config.actor_rollout_ref.model
        num_parameters = _num_parameters(model.path, dict(model.get("override_config") or {}))
    needed = estimate_training_bytes(config, num_parameters)
    available = psutil.virtual_memory().available if available_bytes is None else available_bytes
    if needed > available:
        raise ValueError(
            f"a CPU run of a {num_parameters / 1e6:,.0f}M-parameter model with {ranks} ranks needs about "
            f"{needed / 2**30:.1f} GiB of RAM (trained copies at {_TRAINED_BYTES} B/parameter, forward copies at "
            f"{_FORWARD_BYTES} B/parameter, ~{_PROCESS_BYTES / 1e9:.1f} GB per process) but "
            f"{available / 2**30:.1f} GiB are available: use a smaller model or fewer ranks"
        )
