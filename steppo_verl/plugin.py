"""verl plugin entry point (setuptools group ``verl.plugins``).

verl imports this module in every process that imports verl (driver and Ray workers alike).
Importing it registers StepPO's components in verl's own registries; nothing in verl is patched.
verl logs a failing plugin only at DEBUG level, so a failure here is logged at ERROR and re-raised.
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
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn

    from steppo_verl.advantage import ESTIMATORS
    from steppo_verl.loss import LOSSES

    for kind, lookup, ours in (
        ("advantage estimator", get_adv_estimator_fn, ESTIMATORS),
        ("policy loss", get_policy_loss_fn, LOSSES),
    ):
        for name, fn in ours.items():
            if lookup(name) is not fn:
                raise RuntimeError(
                    f"verl's {kind} '{name}' resolves to {lookup(name)!r}, not steppo_verl's "
                    f"{fn.__qualname__}; another plugin registered the same name"
                )


try:
    ensure_registered()
except Exception:
    logger.error("steppo_verl failed to register its components with verl", exc_info=True)
    raise
