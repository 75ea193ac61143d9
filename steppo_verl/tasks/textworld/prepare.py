"""Generate TextWorld games of a built-in challenge and write verl rows for the environment agent loop.

    python -m steppo_verl.tasks.textworld.prepare --out DIR --challenge tw-coin_collector --levels 1 2 \\
        --train-seeds 64 --val-seeds 16 --test-seeds 16 [--first-seed 0]

writes ``DIR/games/<challenge>-level<L>-seed<S>.z8`` (with TextWorld's ``.json`` and ``.ni`` beside it),
one game per level and seed, made by TextWorld's own generator (what ``tw-make <challenge> --level L
--seed S`` makes; seconds a game, nothing downloaded; games already there are kept), and
``DIR/{train,validation,test}.parquet``: one verl row per game, for ``steppo_env_agent``:

- ``prompt``: the system instructions only; the game's first observation (objective and first room)
  becomes the first user turn when the agent loop resets the environment;
- ``extra_info.env``: the environment (:class:`steppo_verl.tasks.textworld.env.TextWorldEnv`, by class path,
  so Ray workers need no import of it beforehand); ``extra_info.env_task``: ``{"game_file": <absolute path>}``;
  ``extra_info.walkthrough``: the game's winning commands (for warm starts and scripted checks);
- ``reward_model``: verl requires one; the reward is the game's (:mod:`steppo_verl.envs.reward`).

With ``--demos N`` it also writes ``DIR/demos.jsonl``: N conversations that play *uniformly random admissible
commands* in the training games, as the environment loop presents them (the instructions, the game's first
observation as the first user turn, one ``<action>...</action>`` per assistant turn, the game's answers as user
turns), for the tiny policy's warm start (``python -m steppo_verl.dev.tiny_model --warm-start DIR/demos.jsonl``):
it learns to pick a command from the list the game shows, and nothing about which command wins (a random
command is as likely to win there as the untrained policy's is after the warm start). Validation and test games
never appear in them.

Seeds: each ``--X-seeds`` is a count ``N`` or a half-open range ``A:B``. Counts take consecutive seeds from
``--first-seed`` in the order train, validation, test; a split's seeds are the same for every level. The
splits must not share a seed: a validation game made from a training seed would be a training game.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from steppo_verl.env_loop import ENV_AGENT
from steppo_verl.envs import action_text
from steppo_verl.tasks.textworld.env import TextWorldEnv, import_textworld

__all__ = ["CHALLENGES", "SPLITS", "SYSTEM_PROMPT", "assign_seeds", "build_row", "check_settings",
           "game_row", "generate_game", "parse_seeds", "random_command_demonstration", "write_demonstrations",
           "write_task"]

ENV_SPEC = {"class": "steppo_verl.tasks.textworld.env.TextWorldEnv"}
# TextWorld's built-in challenges whose only setting is a difficulty level, and their highest level
# (tw-simple and tw-cooking take other settings).
CHALLENGES = {"tw-coin_collector": 300, "tw-treasure_hunter": 30}
SPLITS = ("train", "validation", "test")
SYSTEM_PROMPT = (
    "You are playing a text adventure game. Each turn you read what the game says and reply with one "
    "command inside <action>...</action>, for example <action>go north</action>. The commands the game "
    "accepts are listed after each observation. Do what the game asks of you to win."
)


@dataclass(frozen=True)
class SeedSpec:
    """A split's seeds as given: ``count`` consecutive seeds, or the explicit ``seeds``."""

    count: int | None = None
    seeds: tuple[int, ...] = ()


def parse_seeds(text: str) -> SeedSpec:
    """``"N"`` (N >= 0 seeds, placed by :func:`assign_seeds`) or ``"A:B"`` (seeds A .. B-1, 0 <= A < B)."""
    start, colon, end = text.partition(":")
    try:
        numbers = (int(start), int(end)) if colon else (int(text),)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be a count N or a range A:B, got {text!r}") from None
    if not colon:
        if numbers[0] < 0:
            raise argparse.ArgumentTypeError(f"a seed count must be >= 0, got {text!r}")
        return SeedSpec(count=numbers[0])
    if not 0 <= numbers[0] < numbers[1]:
        raise argparse.ArgumentTypeError(f"a seed range A:B needs 0 <= A < B, got {text!r}")
    return SeedSpec(seeds=tuple(range(*numbers)))


def assign_seeds(specs: dict[str, SeedSpec], first_seed: int = 0) -> dict[str, list[int]]:
    """Each split's seeds: counts laid end to end from ``first_seed`` (in the order of ``specs``), ranges as given.

    Raises:
        ValueError: two splits share seeds (naming both and the shared seeds).
    """
    seeds, next_seed = {}, first_seed
    for split, spec in specs.items():
        if spec.count is None:
            seeds[split] = list(spec.seeds)
        else:
            seeds[split] = list(range(next_seed, next_seed + spec.count))
            next_seed += spec.count
    names = list(seeds)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            shared = sorted(set(seeds[first]) & set(seeds[second]))
            if shared:
                raise ValueError(
                    f"the {first} and {second} splits share seeds {_shorten(shared)}: a game made from one seed is "
                    "the same game in both; give disjoint ranges (A:B) or counts only (laid end to end from "
                    "--first-seed)"
                )
    return seeds


def _shorten(seeds: list[int], shown: int = 8) -> str:
    return str(seeds[:shown])[:-1] + (f", ... ({len(seeds)} seeds)]" if len(seeds) > shown else "]")


def check_settings(challenge: str, levels: list[int]) -> None:
    """ValueError naming what is wrong: a challenge not supported here, or a level it does not have."""
    if challenge not in CHALLENGES:
        raise ValueError(
            f"unknown challenge {challenge!r}; supported: {', '.join(CHALLENGES)} (TextWorld's challenges that "
            "take a --level)"
        )
    wrong = [level for level in levels if not 1 <= level <= CHALLENGES[challenge]]
    if wrong or not levels:
        raise ValueError(f"{challenge} has levels 1 to {CHALLENGES[challenge]}, got {levels}")


def generate_game(challenge: str, level: int, seed: int, games_dir: Path) -> tuple[Path, list[str]]:
    """The game of ``challenge`` at ``level`` made from ``seed`` (generated unless already in ``games_dir``),
    and its walkthrough (the winning commands)."""
    textworld = import_textworld()
    path = games_dir / f"{challenge}-level{level}-seed{seed}.z8"
    if not (path.is_file() and path.with_suffix(".json").is_file()):
        import textworld.challenges

        _, make, _ = textworld.challenges.CHALLENGES[challenge]
        options = textworld.GameOptions()
        options.seeds = seed
        options.path = str(path)
        options.file_ext = path.suffix
        options.force_recompile = True  # a file without its .json was cut off part-way
        textworld.generator.compile_game(make(settings={"level": level}, options=options), options)
    game = textworld.Game.load(str(path.with_suffix(".json")))
    return path.resolve(), list(game.metadata["walkthrough"])


def build_row(challenge: str, level: int, seed: int, game_file: Path, walkthrough: list[str], split: str,
              index: int) -> dict[str, Any]:
    """One verl row of a generated game (:func:`game_row`)."""
    info = {"index": index, "split": split, "challenge": challenge, "level": level, "seed": seed,
            "walkthrough": walkthrough}
    return game_row(f"textworld/{challenge}", SYSTEM_PROMPT, ENV_SPEC, game_file, info)


def game_row(data_source: str, system_prompt: str, env_spec: dict[str, Any], game_file: Path,
             extra_info: dict[str, Any]) -> dict[str, Any]:
    """One verl row of a game played through the environment loop (TextWorld's and ALFWorld's): the instructions
    as the prompt, the environment and its game file in ``extra_info`` after the task's own ``extra_info``."""
    return {
        "data_source": data_source,
        "prompt": [{"role": "system", "content": system_prompt}],
        "ability": "text_game",
        "reward_model": {"style": "env", "ground_truth": "won"},
        "extra_info": {**extra_info, "env": env_spec, "env_task": {"game_file": str(game_file)}},
        "agent_name": ENV_AGENT,
    }


def write_task(out_dir: Path, challenge: str, levels: list[int], seeds: dict[str, list[int]]) -> dict[str, int]:
    """Generate the games and write one parquet file per split that has seeds; rows written per split."""
    check_settings(challenge, levels)
    import_textworld()  # before any work: say how to install it
    games_dir = out_dir / "games"
    games_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, split_seeds in seeds.items():
        rows = []
        for level in levels:
            for seed in split_seeds:
                game_file, walkthrough = generate_game(challenge, level, seed, games_dir)
                rows.append(build_row(challenge, level, seed, game_file, walkthrough, split, len(rows)))
        if rows:
            pd.DataFrame(rows).to_parquet(out_dir / f"{split}.parquet")
        written[split] = len(rows)
    return written


def random_command_demonstration(env: TextWorldEnv, task: dict[str, Any], rng: random.Random,
                                 max_turns: int) -> list[dict[str, str]]:
    """A conversation that plays uniformly random admissible commands from the game's first room until the game
    ends or ``max_turns`` commands were played; the game's last answer is not shown (nothing follows it)."""
    state = env.reset(task)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": state.observation}]
    for turn in range(max_turns):
        command = rng.choice(state.info["admissible_commands"])
        messages.append({"role": "assistant", "content": action_text(command)})
        state = env.step(command)
        if state.terminated or turn == max_turns - 1:
            break
        messages.append({"role": "user", "content": state.observation})
    return messages


def write_demonstrations(out_dir: Path, count: int, max_turns: int, seed: int = 0) -> Path:
    """``out_dir/demos.jsonl``: ``count`` random-command conversations in the games of ``out_dir/train.parquet``
    (each game in turn, the commands drawn from ``seed``)."""
    if count < 1 or max_turns < 1:
        raise ValueError(f"demonstrations need count >= 1 and max_turns >= 1, got {count} and {max_turns}")
    train = out_dir / "train.parquet"
    if not train.is_file():
        raise FileNotFoundError(f"{train} not found: demonstrations play the training games (give --train-seeds)")
    tasks = [dict(info["env_task"]) for info in pd.read_parquet(train)["extra_info"]]
    rng, env, path = random.Random(seed), TextWorldEnv(), out_dir / "demos.jsonl"
    try:
        with path.open("w") as demos:
            for index in range(count):
                messages = random_command_demonstration(env, tasks[index % len(tasks)], rng, max_turns)
                demos.write(json.dumps({"messages": messages}) + "\n")
    finally:
        env.close()
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for the games and the parquet files")
    parser.add_argument("--challenge", default="tw-coin_collector", help=f"one of {', '.join(CHALLENGES)}")
    parser.add_argument("--levels", type=int, nargs="+", default=[1], help="difficulty levels")
    parser.add_argument("--train-seeds", type=parse_seeds, default=SeedSpec(count=64), help="N or A:B (64)")
    parser.add_argument("--val-seeds", type=parse_seeds, default=SeedSpec(count=16), help="N or A:B (16)")
    parser.add_argument("--test-seeds", type=parse_seeds, default=SeedSpec(count=16), help="N or A:B (16)")
    parser.add_argument("--first-seed", type=int, default=0, help="the first seed of the counted splits")
    parser.add_argument("--demos", type=int, default=0,
                        help="write DIR/demos.jsonl: this many random-command plays of the training games (0: none)")
    parser.add_argument("--demo-turns", type=int, default=10, help="commands per demonstration at most (10)")
    args = parser.parse_args(argv)
    try:
        if args.demos < 0 or args.demo_turns < 1:
            raise ValueError(f"--demos must be >= 0 and --demo-turns >= 1, got {args.demos} and {args.demo_turns}")
        if args.demos and not (args.train_seeds.count or args.train_seeds.seeds):
            raise ValueError("--demos plays the training games: give --train-seeds")
        check_settings(args.challenge, args.levels)
        specs = dict(zip(SPLITS, (args.train_seeds, args.val_seeds, args.test_seeds), strict=True))
        seeds = assign_seeds(specs, args.first_seed)
        import_textworld()
    except (ValueError, ImportError) as error:
        parser.error(str(error))
    written = write_task(args.out, args.challenge, args.levels, seeds)
    print(f"wrote {args.challenge} levels {args.levels} to {args.out}: "
          + ", ".join(f"{split} {count} games" for split, count in written.items()))
    if args.demos:
        path = write_demonstrations(args.out, args.demos, args.demo_turns, args.first_seed)
        print(f"wrote {args.demos} random-command demonstrations to {path}")


if __name__ == "__main__":
    main()
