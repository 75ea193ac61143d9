"""Registration through verl's plugin entry point, in fresh processes and in a Ray worker."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **env},
        cwd="/",  # make sure the installed package (entry point) is what is found, not the checkout
    )


CHECK_REGISTRY = """
import sys
assert 'steppo_verl' not in sys.modules
import verl
from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY
from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
print(sorted(n for n in ('steppo', 'gigpo', 'hgpo', 'step_grpo', 'step_rloo') if n in ADV_ESTIMATOR_REGISTRY),
      'steppo' in POLICY_LOSS_REGISTRY, 'steppo_agent' in _agent_loop_registry)
"""


def test_import_verl_alone_registers_our_estimators():
    result = _python(CHECK_REGISTRY)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "['gigpo', 'hgpo', 'step_grpo', 'step_rloo', 'steppo'] True True"


def test_plugins_can_be_switched_off_with_verls_own_variable():
    result = _python(CHECK_REGISTRY, VERL_USE_EXTERNAL_PLUGINS="none")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[] False False"


def test_registration_failure_is_loud():
    # Another plugin took the name 'steppo' first: importing ours must log an ERROR and raise.
    code = """
import verl
from verl.trainer.ppo.core_algos import register_adv_est
register_adv_est('steppo')(lambda **kw: None)
import steppo_verl.plugin
"""
    result = _python(code, VERL_USE_EXTERNAL_PLUGINS="none")
    assert result.returncode != 0
    assert "steppo_verl failed to register its components with verl" in result.stderr
    assert "already been registered" in result.stderr


def test_registration_is_idempotent():
    import steppo_verl.plugin as plugin

    plugin.ensure_registered()
    importlib.reload(plugin)
    plugin.ensure_registered()
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn

    from steppo_verl.advantage import ESTIMATORS
    from steppo_verl.loss import LOSSES

    assert all(get_adv_estimator_fn(name) is fn for name, fn in ESTIMATORS.items())
    assert all(get_policy_loss_fn(name) is fn for name, fn in LOSSES.items())


def test_ensure_registered_detects_a_hijacked_name(monkeypatch):
    from verl.trainer.ppo import core_algos

    import steppo_verl.plugin as plugin

    monkeypatch.setitem(core_algos.ADV_ESTIMATOR_REGISTRY, "gigpo", lambda **kw: None)
    with pytest.raises(RuntimeError, match="advantage estimator 'gigpo'.*another plugin registered the same name"):
        plugin.ensure_registered()


def test_ensure_registered_detects_a_hijacked_agent_loop(monkeypatch):
    from verl.experimental.agent_loop import agent_loop

    import steppo_verl.plugin as plugin

    monkeypatch.setitem(agent_loop._agent_loop_registry, "steppo_agent", {"_target_": "elsewhere.Loop"})
    with pytest.raises(RuntimeError, match="agent loop 'steppo_agent' resolves to 'elsewhere.Loop'"):
        plugin.ensure_registered()


@pytest.mark.timeout(300)
def test_ray_worker_finds_steppo_through_the_entry_point_alone():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:

        @ray.remote(num_cpus=1)
        def registry_in_worker():
            import sys

            fresh = "steppo_verl" not in sys.modules
            import verl  # noqa: F401  (the plugin entry point runs here)
            from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY

            return fresh, "steppo" in ADV_ESTIMATOR_REGISTRY, os.getpid()

        fresh, found, pid = ray.get(registry_in_worker.remote(), timeout=240)
        assert pid != os.getpid()
        assert fresh, "the worker had steppo_verl imported before verl; the test would prove nothing"
        assert found
    finally:
        ray.shutdown()


def test_editable_install_does_not_touch_torch_or_verl(tmp_path):
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-build-isolation", "--quiet",
         "--report", str(report), "-e", str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    installs = [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
    assert installs == ["steppo-verl"]


REGISTERED_NAMES = """
from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
from verl.plugin.platform import PlatformRegistry
from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY
from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY
print(sorted(n for n in ('steppo', 'gigpo', 'hgpo', 'step_grpo', 'step_rloo') if n in ADV_ESTIMATOR_REGISTRY),
      'steppo' in POLICY_LOSS_REGISTRY, 'steppo_agent' in _agent_loop_registry, 'steppo' in TRAINER_REGISTRY,
      PlatformRegistry.get('cpu') is not None)
"""


def _blocking(module: str) -> str:
    """Code making every import of ``module`` fail, as a missing dependency of that module would."""
    return f"import sys\nsys.modules[{module!r}] = None\n"


@pytest.mark.parametrize(
    "blocked, component, registered",
    [
        ("steppo_verl.agent_loop", "agent loop", "['gigpo', 'hgpo', 'step_grpo', 'step_rloo', 'steppo'] True False True True"),
        ("steppo_verl.cpu", "cpu platform", "['gigpo', 'hgpo', 'step_grpo', 'step_rloo', 'steppo'] True True True False"),
    ],
)
def test_failing_component_import_keeps_the_other_components_registered(blocked, component, registered):
    result = _python(_blocking(blocked) + "import verl\n" + REGISTERED_NAMES)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == registered
    assert f"steppo_verl could not register its {component} with verl" in result.stderr
    assert f"import of {blocked} halted" in result.stderr


def test_importing_the_plugin_directly_still_raises_naming_the_failed_component():
    result = _python(_blocking("steppo_verl.agent_loop") + "import verl\nimport steppo_verl.plugin\n",
                     VERL_USE_EXTERNAL_PLUGINS="none")
    assert result.returncode != 0
    assert "RuntimeError: steppo_verl failed to register its components with verl: agent loop: ModuleNotFoundError" in (
        result.stderr
    )


REQUIRE_FOR_CONFIG = """
import verl
from omegaconf import OmegaConf
from steppo_verl.registration import require_components_for

def config(agent_loop):
    return OmegaConf.create({"algorithm": {"adv_estimator": "steppo"}, "trainer": {"device": "cuda"},
        "actor_rollout_ref": {"actor": {"policy_loss": {"loss_mode": "steppo"}},
                              "rollout": {"agent": {"default_agent_loop": agent_loop}}}})

require_components_for(config("single_turn_agent"))  # the failed agent loop is not needed: passes
print("verl's agent loop: ok")
require_components_for(config("steppo_agent"))
"""


def test_config_selecting_the_failed_agent_loop_raises_naming_its_cause():
    result = _python(_blocking("steppo_verl.agent_loop") + REQUIRE_FOR_CONFIG)
    assert result.returncode != 0
    assert "verl's agent loop: ok" in result.stdout
    assert (
        "RuntimeError: the config selects components that are not registered: "
        "actor_rollout_ref.rollout.agent.default_agent_loop=steppo_agent needs steppo_verl's agent loop, "
        "which failed: ModuleNotFoundError: import of steppo_verl.agent_loop halted"
    ) in result.stderr
