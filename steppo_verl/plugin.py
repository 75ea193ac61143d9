"""verl plugin entry point (setuptools group ``verl.plugins``).

verl imports this module in every process that imports verl (driver and Ray workers alike).
Importing it registers StepPO's components in verl's own registries: the ``cpu`` platform, its
FSDP2 engines and the ``hf`` rollout backend (:mod:`steppo_verl.cpu`; never selected where an
accelerator is present unless asked), the advantage estimators, the ``steppo`` policy loss, the
``steppo_agent`` agent loop and the ``steppo`` trainer. verl functions that no registry reaches are
wrapped in two documented places: :func:`steppo_verl.trainer.install_compute_advantage_hook` and
:func:`steppo_verl.cpu.platform.wrap_verl_functions`. verl logs a failing plugin only at
DEBUG level, so a failure here is logged at ERROR and re-raised.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("steppo_verl")


def ensure_registered() -> None:
    """Register our components with verl and check that verl now resolves each name to ours.

    Idempotent: modules register on first import only, later calls just re-check.

    Raises:
        RuntimeError: a name resolves to another implementation (e.g. a conflicting plugin).
    """
    from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn
    from verl.trainer.ppo.v1.trainer_base import get_trainer_cls

    from steppo_verl.advantage import ESTIMATORS
    from steppo_verl.agent_loop import AGENT_LOOPS
    from steppo_verl.loss import LOSSES
    from steppo_verl.trainer import StepPOTrainer, install_compute_advantage_hook

    install_compute_advantage_hook()

    def agent_loop_target(name: str) -> str:
        return _agent_loop_registry.get(name, {}).get("_target_", "<not registered>")

    checks = [("advantage estimator", name, get_adv_estimator_fn(name), fn) for name, fn in ESTIMATORS.items()]
    checks += [("policy loss", name, get_policy_loss_fn(name), fn) for name, fn in LOSSES.items()]
    checks += [
        ("agent loop", name, agent_loop_target(name), f"{cls.__module__}.{cls.__qualname__}")
        for name, cls in AGENT_LOOPS.items()
    ]
    checks.append(("trainer", "steppo", get_trainer_cls("steppo"), StepPOTrainer))
    for kind, name, found, ours in checks:
        if found != ours:
            raise RuntimeError(
                f"verl's {kind} '{name}' resolves to {found!r}, not steppo_verl's {ours!r}; "
                "another plugin registered the same name"
            )


try:
    # The cpu platform goes first: the imports below resolve verl's platform singleton.
    from steppo_verl.cpu import register as register_cpu

    register_cpu()
    ensure_registered()
except Exception:
    logger.error("steppo_verl failed to register its components with verl", exc_info=True)
    raise
