"""A real ``python -m verl.trainer.main_ppo`` run on CPU: 2 training steps of the tiny model.

Uses the cpu platform, FSDP2 actor/ref (and critic) over gloo and the ``hf`` rollout backend from
``steppo_verl.cpu``. Each run starts its own Ray cluster in a new session; whatever is left of that
session afterwards (a timeout, a crash) is killed by process id.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_inspect import run_chromium

from steppo_verl.dev import runs
from steppo_verl.dev.runs import RunResult
from steppo_verl.progress import step_table

pytestmark = pytest.mark.ray

RUN_TIMEOUT_S = 900
FP32 = "{param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}"  # verl's default bfloat16 is emulated on CPU

REWARD_FN = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    return float(ground_truth.lower() in solution_str.lower()) + len(solution_str) / 1000
'''

QUESTIONS = [
    ("Which city is the capital of France?", "Paris"),
    ("Is the fox quick?", "yes"),
    ("Where is the Eiffel Tower?", "Paris"),
    ("Is the dog lazy?", "yes"),
]


def cpu_overrides(tmp: Path) -> list[str]:
    """Every hydra override a 2-step run needs on a 2-core machine (see steppo_verl/cpu/__init__.py)."""
    return [
        f"data.train_files={tmp}/train.parquet",
        f"data.val_files={tmp}/val.parquet",
        "data.train_batch_size=4",
        "data.max_prompt_length=64",
        "data.max_response_length=16",
        "data.dataloader_num_workers=0",
        f"actor_rollout_ref.model.path={tmp}/model",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.actor.strategy=fsdp2",
        "actor_rollout_ref.ref.strategy=fsdp2",
        f"+actor_rollout_ref.actor.fsdp_config.mixed_precision={FP32}",
        f"+actor_rollout_ref.ref.fsdp_config.mixed_precision={FP32}",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.rollout.name=hf",
        "actor_rollout_ref.rollout.n=2",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        f"reward.custom_reward_function.path={tmp}/reward.py",
        "reward.num_workers=1",
        "trainer.device=cpu",
        "trainer.n_gpus_per_node=2",
        "trainer.nnodes=1",
        "trainer.total_training_steps=2",
        "trainer.val_before_train=false",
        "trainer.test_freq=-1",
        "trainer.save_freq=-1",
        "trainer.logger=[console]",
        "ray_kwargs.ray_init.num_cpus=16",
        "+ray_kwargs.ray_init.num_gpus=2",
        "+ray_kwargs.ray_init.include_dashboard=false",
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
    ]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    from steppo_verl.dev.tiny_model import build_tiny_model

    tmp = tmp_path_factory.mktemp("cpu_e2e")
    build_tiny_model(tmp / "model")
    rows = [
        {
            "data_source": "tiny_qa",
            "prompt": [{"role": "user", "content": question}],
            "ability": "qa",
            "reward_model": {"style": "rule", "ground_truth": answer},
            "extra_info": {"split": "train", "index": i},
        }
        for i, (question, answer) in enumerate(QUESTIONS * 2)
    ]
    pd.DataFrame(rows).to_parquet(tmp / "train.parquet")
    pd.DataFrame(rows[:4]).to_parquet(tmp / "val.parquet")
    (tmp / "reward.py").write_text(REWARD_FN)
    return tmp


def run_main_ppo(tmp: Path, extra: list[str]) -> RunResult:
    """Run verl's main_ppo with the CPU overrides; see :func:`run_in_session`."""
    return run_in_session([sys.executable, "-m", "verl.trainer.main_ppo", *cpu_overrides(tmp), *extra], tmp)


def run_in_session(cmd: list[str], tmp: Path, timeout_s: float = RUN_TIMEOUT_S, **env_vars: str) -> RunResult:
    """Run a training command in its own session (killed afterwards, whatever happened), logged under ``tmp``."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp), os.environ.get("PYTHONPATH")])),
        "RAY_DEDUP_LOGS": "0",
        **env_vars,
    }
    log = tmp / f"run_{len(list(tmp.glob('run_*.log')))}.log"
    return runs.run_in_session(cmd, log, timeout_s, cwd=tmp, env=env)


def assert_two_finite_steps(result: RunResult, *required: str) -> None:
    assert result.returncode == 0, result.log[-5000:]
    steps = result.metrics
    assert sorted(steps) == [1, 2], result.log[-5000:]
    for step, metrics in steps.items():
        for key in ("actor/pg_loss", "actor/grad_norm", "critic/score/mean", *required):
            assert key in metrics, (step, key, sorted(metrics))
            assert math.isfinite(metrics[key]), (step, key, metrics[key])
    print(f"2-step run: {result.wall_s:.0f} s wall, {result.peak_rss_gib:.2f} GiB peak RSS (all processes)")


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_grpo_two_steps_on_cpu(workdir):
    result = run_main_ppo(workdir, ["algorithm.adv_estimator=grpo"])
    assert_two_finite_steps(result, "actor/ppo_kl")


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_gae_with_critic_two_steps_on_cpu(workdir):
    result = run_main_ppo(
        workdir,
        [
            "algorithm.adv_estimator=gae",
            "critic.enable=true",
            "critic.strategy=fsdp2",
            f"critic.model.path={workdir}/model",
            "+critic.model.override_config.attn_implementation=sdpa",
            "critic.ppo_micro_batch_size_per_gpu=2",
            f"+critic.fsdp.mixed_precision={FP32}",
        ],
    )
    assert_two_finite_steps(result, "critic/vf_loss", "critic/values/mean")


RECIPE = Path(__file__).resolve().parents[1] / "recipe" / "steppo"


def summary_path(console: str, label: str) -> Path:
    """A path the run's summary lists (``label:   PATH``)."""
    match = re.search(rf"^{label}:\s+(\S+)$", console, re.M)
    assert match, f"the summary has no {label!r} line:\n{console[-3000:]}"
    return Path(match.group(1))


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_steppo_cpu_recipe_trains_end_to_end(tmp_path):
    """The README's CPU command: StepPO with the critic, our agent loop, search tool, loss and estimator;
    what a person sees of it: a line per step, the summary, the trajectory report it built."""
    work = tmp_path / "smoke"
    # A large actor lr makes a missed weight sync visible as a rollout/actor log-prob gap at step 2. The random
    # tiny model earns no reward, and StepPO gives a batch of equal returns zero advantages (no update to
    # check): this run keeps them to exercise the update path.
    cmd = ["bash", str(RECIPE / "run_cpu_smoke.sh"), "actor_rollout_ref.actor.optim.lr=1e-3",
           "algorithm.steppo.skip_equal_returns=false"]
    shown = run_in_session(cmd, tmp_path, PYTHON=sys.executable, WORK_DIR=str(work), STEPS="2", CONSOLE="compact")
    console = shown.log
    log = summary_path(console, "full log")
    result = dataclasses.replace(shown, log=log.read_text(errors="replace"))  # verl's whole output
    assert_two_finite_steps(
        result, "critic/vf_loss", "steppo/num_steps/mean", "steppo/step_advantage/mean",
        "steppo/step_value/mean", "steppo/truncated_frac", "actor/step_clipfrac", "actor/step_ratio_mean",
    )
    steps = result.metrics
    assert steps[1]["actor/grad_norm"] > 0, "the actor must have been updated"
    assert steps[2]["training/rollout_probs_diff_max"] < 5e-3, "the rollout server must serve the updated weights"

    # The console: a progress line per step and the summary, none of verl's per-process noise.
    assert [line.split(" [")[0] for line in console.splitlines() if line.startswith("step ")] == ["step 1/2",
                                                                                                 "step 2/2"]
    assert "StepPO run finished (exit 0): 2 of 2 training steps" in console
    assert step_table(steps) in console
    training = console.split("verl's whole output goes to", 1)[1]  # after the preparation steps' own output
    assert len(training.splitlines()) < 30, training
    for noise in ("engine is not available", "target_num_threads"):  # reaching Ray workers through the env
        assert noise not in result.log and noise not in console, f"{noise!r} is still in the output"
    assert sorted(p.name for p in (work / "checkpoints" / "steppo_steps").glob("*.parquet")) == [
        "step_000001.parquet", "step_000002.parquet"]
    report = summary_path(console, "HTML report")
    assert report == work / "report.html" and report.is_file()
    assert f"python3 -m webbrowser -t {report.as_uri()}" in console
    dom = run_chromium(report.as_uri(), "--dump-dom")
    assert len(re.findall(r'<tr class="traj-row', dom)) == 8, "4 trajectories in each of the 2 dumped steps"


# verl edits a batch after the rollout: it pads one that does not divide by the mini-batch with copies of a
# sample whose response is one masked token, and rejection sampling masks tokens (here: nearly every token
# whose rollout and trainer log-probs differ at all, so steps are cut apart mid-step). The step fields must
# follow (trainer.align_step_fields; the critic's step-start loss reads the edited mask).
BATCH_EDITS = {
    "padding": ["data.train_batch_size=6", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
                "critic.ppo_mini_batch_size=4"],  # 6 trajectories, padded to 8 for mini-batches of 4
    "rejection": ["algorithm.rollout_correction.rollout_rs=token_k1",
                  "algorithm.rollout_correction.rollout_rs_threshold='0.9999999_1.0000001'"],
}


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
@pytest.mark.parametrize("edit", sorted(BATCH_EDITS))
def test_steppo_step_fields_follow_verls_batch_edits(tmp_path, edit):
    work = tmp_path / "smoke"
    cmd = ["bash", str(RECIPE / "run_cpu_smoke.sh"), "trainer.steppo_dump.every_n_steps=0", *BATCH_EDITS[edit]]
    result = run_in_session(cmd, tmp_path, PYTHON=sys.executable, WORK_DIR=str(work), STEPS="2")
    assert_two_finite_steps(result, "critic/vf_loss", "steppo/step_advantage/mean", "steppo/step_value/mean")
    if edit == "padding":  # verl's padding samples are in the batch: one masked token, so no step
        assert all(step["steppo/num_steps/min"] == 0 for step in result.metrics.values())
    if edit == "rejection":
        rejected = [value for step in result.metrics.values() for key, value in step.items()
                    if key.endswith("rollout_rs_masked_fraction")]
        assert rejected and max(rejected) > 0, "rejection sampling must have masked tokens for this test to mean much"
