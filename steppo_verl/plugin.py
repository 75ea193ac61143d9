"""verl plugin entry point (setuptools group ``verl.plugins``).

verl imports this module in every process that imports verl (driver and Ray workers alike).
Importing it registers StepPO's components in verl's own registries: the ``cpu`` platform, its
FSDP2 engines and the ``hf`` rollout backend (:mod:`steppo_verl.cpu`; never selected where an
accelerator is present unless asked), the advantage estimators, the ``steppo`` policy loss, the
``steppo_agent`` and ``steppo_env_agent`` agent loops and the ``steppo`` trainer. verl functions that
no registry reaches are wrapped in two documented places:
:func:`steppo_verl.trainer.install_compute_advantage_hook` and :func:`steppo_verl.cpu.platform.wrap_verl_functions`.

Each component registers independently (:mod:`steppo_verl.registration`): one that fails is logged
at ERROR with its cause and the others stay registered. verl logs a failing plugin only at DEBUG
level, so the import then also raises, naming every failure; verl carries on with what registered.
A run whose config selects a failed component is stopped by
:func:`steppo_verl.registration.require_components_for`.
"""

from __future__ import annotations

from steppo_verl.registration import ensure_registered

__all__ = ["ensure_registered"]

ensure_registered()
