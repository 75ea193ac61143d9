"""Train with StepPO: ``python -m steppo_verl.main [hydra overrides]``.

verl's ``main_ppo`` with StepPO's configuration (``steppo_verl/config/steppo_trainer.yaml``:
``defaults: [ppo_trainer, _self_]`` on verl's packaged config) and StepPO's start-up checks run
before Ray starts, so a configuration that cannot work fails in seconds with what to set.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig


def run(config: DictConfig) -> None:
    """Check the configuration, then run verl's v1 trainer (the StepPO trainer is selected by
    ``trainer.v1.trainer_mode=steppo``)."""
    from verl.trainer.main_ppo import TaskRunnerV1, run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    from steppo_verl.registration import require_components_for
    from steppo_verl.trainer import validate_steppo_config

    if not config.trainer.use_v1:
        raise ValueError("StepPO runs on verl's v1 trainer: set trainer.use_v1=true")
    auto_set_device(config)
    validate_steppo_config(config)
    require_components_for(config)  # a component the config selects must have registered
    if config.trainer.device == "cpu":
        from steppo_verl.cpu.resources import check_cpu_resources

        check_cpu_resources(config)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    run_ppo(config, task_runner_class=TaskRunnerV1)


@hydra.main(config_path="config", config_name="steppo_trainer", version_base=None)
def main(config: DictConfig) -> None:
    run(config)


if __name__ == "__main__":
    main()
