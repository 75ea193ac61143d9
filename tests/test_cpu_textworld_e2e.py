"""TextWorld through verl's real trainer on CPU: 2 StepPO steps of the tiny model on generated coin-collector games.

The games are made on the spot by ``python -m steppo_verl.tasks.textworld.prepare`` (TextWorld's own generator,
nothing downloaded) and trained on with the README's command, ``python -m steppo_verl.main +task=textworld``, on
top of ``+platform=cpu``. Needs the optional ``textworld`` extra (``scripts/install.sh test`` installs it); skipped
without it. Built like test_cpu_env_e2e.py (test_cpu_e2e.py's session runner and step checks).

The tiny model's weights are random, so it writes no ``<action>``: every turn is answered ``invalid action`` and
the game is reset but never stepped (test_textworld.py plays a walkthrough through the loop). What this run shows
is the wiring: each row's game is loaded by ``TextWorldEnv`` inside verl's Ray workers, the step keys are the
game's own (its facts' hash at reset), and the environments' reward function finds the game's verdict.
"""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path

import pandas as pd
import pytest
from test_cpu_e2e import RUN_TIMEOUT_S, run_in_session
from test_cpu_env_e2e import assert_two_env_loop_steps

from steppo_verl.inspect.records import RECORDS_DIR

pytest.importorskip("textworld")

pytestmark = pytest.mark.ray

TRAIN_GAMES = 4  # one batch: the cpu platform's data.train_batch_size
MAX_TURNS = 3
ENV_LOOP_YAML = files("steppo_verl") / "config" / "env_agent_loop.yaml"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The tiny model and coin-collector level-1 games (~3 s each: the coin lies in the first room)."""
    from steppo_verl.dev.tiny_model import build_tiny_model
    from steppo_verl.tasks.textworld.prepare import main as prepare

    tmp = tmp_path_factory.mktemp("cpu_textworld_e2e")
    build_tiny_model(tmp / "model")
    prepare(["--out", str(tmp / "textworld"), "--challenge", "tw-coin_collector", "--levels", "1",
             "--train-seeds", str(TRAIN_GAMES), "--val-seeds", "1", "--test-seeds", "0"])
    return tmp


def textworld_run_command(tmp: Path) -> list[str]:
    data = tmp / "textworld"
    return [
        sys.executable, "-m", "steppo_verl.main", "+platform=cpu", "+task=textworld",
        f"actor_rollout_ref.model.path={tmp}/model",
        f"critic.model.path={tmp}/model",
        f"data.train_files={data}/train.parquet",
        f"data.val_files={data}/validation.parquet",
        f"actor_rollout_ref.rollout.agent.agent_loop_config_path={ENV_LOOP_YAML}",
        # The task's limits (4096 response tokens, 20 turns) back to the cpu platform's: the random model
        # rarely ends a turn by itself, so each turn runs to the response budget, and 20 of 4096 tokens
        # would take the 2 cores an hour. The prompt limit stays the task's (the first room is ~230 tokens).
        "data.max_response_length=96",
        f"actor_rollout_ref.rollout.multi_turn.max_assistant_turns={MAX_TURNS}",
        "trainer.steppo_dump.every_n_steps=1",  # the step records hold each step's state key
        f"trainer.default_local_dir={tmp}/checkpoints",
        f"hydra.run.dir={tmp}/hydra",
    ]


def reset_state_keys(tmp: Path) -> set[int]:
    """The state key of each training game's first room, from the game itself."""
    from steppo_verl.tasks.textworld.env import TextWorldEnv

    keys = set()
    for extra_info in pd.read_parquet(tmp / "textworld" / "train.parquet")["extra_info"]:
        env = TextWorldEnv()
        keys.add(env.reset(dict(extra_info["env_task"])).state_key)
        env.close()
    return keys


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_generated_textworld_games_train_two_steppo_steps_on_cpu(workdir):
    result = run_in_session(textworld_run_command(workdir), workdir)
    assert_two_env_loop_steps(result, max_turns=MAX_TURNS)
    for step, metrics in result.metrics.items():
        assert metrics["steppo/ending/env_truncated"] == 0, (step, "TextWorld's own step limit is off")

    games = reset_state_keys(workdir)
    assert len(games) == TRAIN_GAMES, "each generated game starts in a state of its own"
    for step in (1, 2):
        records = pd.read_parquet(workdir / "checkpoints" / RECORDS_DIR / f"step_{step:06d}.parquet")
        first_steps = records[records["step"] == 0]
        assert set(first_steps["state_key"]) == games, (step, "each batch plays every game once, from its first room")
