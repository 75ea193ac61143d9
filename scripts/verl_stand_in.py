"""A stand-in for the few ``verl`` names our estimators and loss import, for processes without verl.

The GPU check (``scripts/gpu_check.py``) runs on a machine that has torch and transformers but not
verl (nor Ray, vLLM, tensordict, omegaconf, which verl's own modules import). ``steppo_verl.advantage``
and ``steppo_verl.loss`` import these names at import time:

- ``verl.trainer.ppo.core_algos.register_adv_est`` / ``register_policy_loss``: registration
  decorators. Here they return the function unchanged: nothing is registered, nothing is computed.
- ``verl.utils.torch_functional.masked_whiten`` (step whitening) and ``masked_mean`` (loss
  metrics), ``verl.trainer.ppo.core_algos.agg_loss`` (loss aggregation): verl's maths, called at
  run time. They are **not re-implemented**: their definitions (with ``masked_sum`` and
  ``masked_var``, which they call) are read from a verl source tree on disk (``verl_src``, the
  ``verl`` package directory, e.g. ``.venv/lib/python3.11/site-packages/verl`` carried to the
  device) and executed as written, each alone, with only ``torch`` in scope. Their modules cannot
  be imported whole: they import verl's package and its dependencies.
- ``verl.trainer.ppo.core_algos.compute_value_loss``: only the critic loss calls it, which the check
  does not run; the stand-in raises if called.
- ``verl`` itself: ``steppo_verl/__init__.py`` imports it; an empty package here.

So the maths under test is ours and verl's, unchanged; only import-time registration is stood in for.
``install`` must run before anything imports ``steppo_verl``, in a process that has not imported verl.
"""

from __future__ import annotations

import ast
import sys
import types
from pathlib import Path
from typing import Any, Callable, Optional

import torch

# (file under the verl package, functions taken from it in definition order).
TORCH_FUNCTIONAL = ("utils/torch_functional.py", ("masked_sum", "masked_mean", "masked_var", "masked_whiten"))
CORE_ALGOS = ("trainer/ppo/core_algos.py", ("agg_loss",))


def find_verl_source(candidates: list[Path]) -> Path | None:
    """The first directory holding both verl files we read, without importing anything."""
    for directory in candidates:
        if all((directory / relative).is_file() for relative, _ in (TORCH_FUNCTIONAL, CORE_ALGOS)):
            return directory
    return None


def default_candidates(repo: Path) -> list[Path]:
    """The repository's venv, then every ``verl`` directory on ``sys.path`` (where verl would import from)."""
    venv = sorted(repo.glob(".venv/lib/python*/site-packages/verl"))
    return venv + [Path(entry or ".") / "verl" for entry in sys.path]


def load_functions(path: Path, names: tuple[str, ...], namespace: dict[str, Any]) -> dict[str, Callable]:
    """Execute the named top-level ``def``s of ``path`` in ``namespace``, exactly as written there.

    Raises:
        ValueError: a name is missing or decorated (a decorator could change what the function does).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    defs = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    for name in names:
        node = defs.get(name)
        if node is None:
            raise ValueError(f"{path} defines no top-level function {name!r}; is this verl's source tree?")
        if node.decorator_list:
            raise ValueError(f"{path}: {name} is decorated; the stand-in only runs plain functions")
        code = compile(ast.Module(body=[node], type_ignores=[]), filename=str(path), mode="exec")
        exec(code, namespace)  # noqa: S102 - verl's own definition, read from its installed source
    return {name: namespace[name] for name in names}


def _module(name: str, attributes: dict[str, Any], package: bool = False) -> types.ModuleType:
    module = types.ModuleType(name, "stand-in for verl (scripts/verl_stand_in.py); see its docstring")
    if package:
        module.__path__ = []  # a package: its submodules come from sys.modules only
    module.__dict__.update(attributes)
    return module


def _passthrough_registration(name: Any) -> Callable[[Callable], Callable]:
    """verl's registration decorators, minus the registry: the function comes back unchanged."""
    return lambda fn: fn


def _critic_loss_not_provided(*args: Any, **kwargs: Any) -> None:
    raise NotImplementedError(
        "verl's compute_value_loss is not available under the verl stand-in; the GPU check does not run the critic loss"
    )


def install(verl_src: Path) -> dict[str, Any]:
    """Put stand-in ``verl`` modules in ``sys.modules``; returns what was loaded, for the check's record.

    Raises:
        RuntimeError: verl (real or stand-in) is already imported in this process.
    """
    if any(name == "verl" or name.startswith("verl.") for name in sys.modules):
        raise RuntimeError("verl is already imported in this process; install the stand-in first")
    torch_functional = _module("verl.utils.torch_functional", {})
    helpers = load_functions(verl_src / TORCH_FUNCTIONAL[0], TORCH_FUNCTIONAL[1], {"torch": torch})
    torch_functional.__dict__.update(helpers)
    # agg_loss calls masked_sum as verl_F.masked_sum, verl's alias for torch_functional.
    agg = load_functions(verl_src / CORE_ALGOS[0], CORE_ALGOS[1],
                          {"torch": torch, "Optional": Optional, "verl_F": torch_functional})
    core_algos = _module("verl.trainer.ppo.core_algos", {
        "register_adv_est": _passthrough_registration,
        "register_policy_loss": _passthrough_registration,
        "compute_value_loss": _critic_loss_not_provided,
        **agg,
    })
    modules = {
        "verl": _module("verl", {}, package=True),
        "verl.utils": _module("verl.utils", {"torch_functional": torch_functional}, package=True),
        "verl.utils.torch_functional": torch_functional,
        "verl.trainer": _module("verl.trainer", {}, package=True),
        "verl.trainer.ppo": _module("verl.trainer.ppo", {"core_algos": core_algos}, package=True),
        "verl.trainer.ppo.core_algos": core_algos,
    }
    modules["verl"].utils, modules["verl"].trainer = modules["verl.utils"], modules["verl.trainer"]
    modules["verl.trainer"].ppo = modules["verl.trainer.ppo"]
    sys.modules.update(modules)
    version_file = verl_src / "version" / "version"
    return {
        "source": str(verl_src.resolve()),
        "version": version_file.read_text().strip() if version_file.is_file() else None,
        "functions_from_source": [*helpers, *agg],
        "stood_in": ["register_adv_est", "register_policy_loss", "compute_value_loss (raises)"],
    }
