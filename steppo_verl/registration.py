"""Registration of StepPO's components with verl, one component at a time.

The components are the ``cpu`` platform (with its FSDP2 engines and ``hf`` rollout backend), the advantage
estimators (``arpo`` included), the ``steppo`` policy loss, the ``steppo_agent`` agent loop, the
``steppo_env_agent`` environment agent loop, and the ``steppo`` trainer with its ``compute_advantage`` hook.
Each registers on its own: one whose import fails (a missing dependency, a name another plugin took) is
reported with its cause while the others stay registered, so for example a broken agent-loop dependency
leaves the pure estimators and the loss usable.

:func:`ensure_registered` is what the plugin entry point (:mod:`steppo_verl.plugin`) runs;
:func:`require_components_for` is the check for a run: it raises only where the run's config selects a
component that failed. This module never raises at import, so that check can always be imported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Any

logger = logging.getLogger("steppo_verl")

# (kind, name, what verl resolves the name to, what it should resolve to)
Check = tuple[str, str, Any, Any]


def _register_cpu_platform() -> list[Check]:
    # steppo_verl.cpu.register checks its own registrations and raises naming what did not take.
    from steppo_verl.cpu import register

    register()
    return []


def _register_estimators() -> list[Check]:
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    from steppo_verl.advantage import ESTIMATORS
    from steppo_verl.branching import BRANCH_ESTIMATORS

    estimators = {**ESTIMATORS, **BRANCH_ESTIMATORS}
    return [("advantage estimator", name, get_adv_estimator_fn(name), fn) for name, fn in estimators.items()]


def _register_losses() -> list[Check]:
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    from steppo_verl.loss import LOSSES

    return [("policy loss", name, get_policy_loss_fn(name), fn) for name, fn in LOSSES.items()]


def _register_agent_loops() -> list[Check]:
    from steppo_verl.agent_loop import AGENT_LOOPS

    return _agent_loop_checks(AGENT_LOOPS)


def _register_env_agent_loops() -> list[Check]:
    from steppo_verl.env_loop import AGENT_LOOPS

    return _agent_loop_checks(AGENT_LOOPS)


def _agent_loop_checks(agent_loops: dict[str, type]) -> list[Check]:
    from verl.experimental.agent_loop.agent_loop import _agent_loop_registry

    return [
        (
            "agent loop",
            name,
            _agent_loop_registry.get(name, {}).get("_target_", "<not registered>"),
            f"{cls.__module__}.{cls.__qualname__}",
        )
        for name, cls in agent_loops.items()
    ]


def _register_trainer() -> list[Check]:
    from verl.trainer.ppo.v1.trainer_base import get_trainer_cls

    from steppo_verl.trainer import StepPOTrainer, install_compute_advantage_hook

    install_compute_advantage_hook()
    return [("trainer", "steppo", get_trainer_cls("steppo"), StepPOTrainer)]


# In registration order: the cpu platform goes first, because importing verl's engines (which the other
# components do) resolves verl's platform singleton.
COMPONENTS: dict[str, Callable[[], list[Check]]] = {
    "cpu platform": _register_cpu_platform,
    "advantage estimators": _register_estimators,
    "policy loss": _register_losses,
    "agent loop": _register_agent_loops,
    "env agent loop": _register_env_agent_loops,
    "trainer": _register_trainer,
}


def register_components() -> dict[str, Exception]:
    """Register every component, each independently; returns the failures, by component.

    Idempotent: modules register on first import only, later calls just re-check. A component fails when
    its import raises or when verl resolves one of its names to another implementation (a conflicting plugin).
    """
    failures: dict[str, Exception] = {}
    for component, register in COMPONENTS.items():
        try:
            _check(register())
        except Exception as error:  # noqa: BLE001  (any failure of one component must spare the others)
            failures[component] = error
    return failures


def _check(checks: list[Check]) -> None:
    for kind, name, found, ours in checks:
        if found != ours:
            raise RuntimeError(
                f"verl's {kind} '{name}' resolves to {found!r}, not steppo_verl's {ours!r}; "
                "another plugin registered the same name"
            )


def ensure_registered() -> None:
    """Register every component with verl and check that verl resolves each name to ours.

    Each component that fails is logged at ERROR with its cause (verl logs a failing plugin only at DEBUG);
    the components that succeeded stay registered.

    Raises:
        RuntimeError: naming every component that failed and why, once all the others are registered.
    """
    failures = register_components()
    for component, error in failures.items():
        logger.error(
            "steppo_verl could not register its %s with verl (its other components are registered): %s",
            component,
            _cause(error),
            exc_info=error,
        )
    if failures:
        causes = "; ".join(f"{component}: {_cause(error)}" for component, error in failures.items())
        raise RuntimeError(f"steppo_verl failed to register its components with verl: {causes}")


def require_components_for(config: Any) -> None:
    """Raise if ``config`` (a verl trainer config) selects a name that a failed component would provide.

    A run that uses none of the failed components passes; one that does fails here, before any worker
    starts, instead of with verl's bare "unknown name" error deep inside a Ray worker.

    Raises:
        RuntimeError: naming the config key, its value, the component and the cause of its failure.
    """
    from omegaconf import OmegaConf

    failures = register_components()
    missing = []
    for component, (key, known_names) in _config_selections().items():
        selected = OmegaConf.select(config, key)
        if component in failures and selected is not None and selected not in known_names:
            cause = _cause(failures[component])
            missing.append(f"{key}={selected} needs steppo_verl's {component}, which failed: {cause}")
    if missing:
        raise RuntimeError("the config selects components that are not registered: " + "; ".join(missing))


def _config_selections() -> dict[str, tuple[str, Collection[str]]]:
    """Per component: the config key that selects one of its names, and the names verl knows for that key."""
    from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
    from verl.plugin.platform import PlatformRegistry
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY

    return {
        "cpu platform": ("trainer.device", PlatformRegistry.registered_names()),
        "advantage estimators": ("algorithm.adv_estimator", ADV_ESTIMATOR_REGISTRY),
        "policy loss": ("actor_rollout_ref.actor.policy_loss.loss_mode", POLICY_LOSS_REGISTRY),
        "agent loop": ("actor_rollout_ref.rollout.agent.default_agent_loop", _agent_loop_registry),
        "env agent loop": ("actor_rollout_ref.rollout.agent.default_agent_loop", _agent_loop_registry),
        "trainer": ("trainer.v1.trainer_mode", TRAINER_REGISTRY),
    }


def _cause(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"
