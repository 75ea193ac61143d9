"""The vault task: a small multi-step task with a delayed reward, for learning runs of a tiny model on CPU.

    python -m steppo_verl.data.vault --out DIR [--chains 1 --depth 3 --seed 0]

writes ``DIR/train.parquet`` and ``DIR/val.parquet`` (verl rows for ``steppo_agent`` with the
``open_door`` tool, :mod:`steppo_verl.tools.vault`), ``DIR/demos.jsonl`` (format demonstrations for the
warm start of a tiny policy, ``python -m steppo_verl.cpu.tiny_model --warm-start``), ``DIR/added_tokens.json``
(the call's boilerplate, one token each in the tiny tokenizer: ``--added-tokens``) and ``DIR/world.json``.

The world is ``chains`` chains of ``depth`` rooms. Every room has one right door, fixed for the world;
it leads to the next room of the chain, and from the last room it opens the vault. A wrong door leads to
a dead end. A question starts in the first room of a chain; its vault shows a code of its own. The final
answer is ``<answer>open</answer>`` or ``<answer>none</answer>``, and the reward
(:mod:`steppo_verl.rewards.vault`) is 1 only if the answer is ``open`` and the transcript holds the
question's vault observation, i.e. all ``depth`` doors were right. It arrives after the last step.

Why this design:

- Credit assignment matters: the outcome says whether the whole path was right, not which door was
  wrong. A trajectory that fails at its third door took two right steps that a trajectory-level
  advantage (GRPO) pushes down with the wrong one; a critic over the step states (the room names are in
  the observations) can tell them apart, which is what StepPO's step-level GAE is for.
- The answer is a report, not a copy of the code: a 100k-parameter model warm-started for a minute does
  not learn to copy a word from its context (tried: no better than chance after 400 steps), and the
  task is about the doors. The code only proves the opening to the reward.
- It is small enough for CPU: each step is one short tool call (6 tokens with the boilerplate as
  added tokens), the policy only has to learn which door is right in each of ``chains * depth``
  rooms, and the untrained policy already succeeds sometimes (``(1/2)**depth`` with two doors), so
  the first batches carry signal. One chain by default: every chain divides the visits each room gets
  (with 4 chains a third room saw ~4 of a step's 64 rollouts, and no estimator got far in 10 steps).
  What training runs show: benchmarks/README.md.
- The untrained policy is a format warm start: the demonstrations call the tool correctly and answer
  according to the last observation, but pick every door uniformly at random, and their outcomes do not
  depend on the doors (:func:`demonstration`). So its success rate is the random-door baseline, and whatever
  training adds is door choice, the multi-step part of the task.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

from steppo_verl.rewards.vault import OPENED_ANSWER
from steppo_verl.tools.vault import DEAD_END, VaultPath, VaultTool, schema_doors

from .output import AGENT_NAME

DATA_SOURCE = "vault"
TOOL_NAME = "open_door"
ROOM_NAMES = ("amber", "birch", "cedar", "dune", "ember", "fern", "grove", "heath", "iris", "jade", "kelp", "lotus",
              "marsh", "nook", "oak", "pine")
CODES = ("lime", "mint", "navy", "opal", "pearl", "quartz", "rose", "sage", "teal", "umber", "violet", "wheat",
         "onyx", "plum", "ruby", "slate")
NOT_OPENED_ANSWER = "none"
SYSTEM_PROMPT = (
    "Open one door per room with open_door to reach the vault; a wrong door leads to a dead end. "
    f"Then answer <answer>{OPENED_ANSWER}</answer> if the vault opened, else <answer>{NOT_OPENED_ANSWER}</answer>."
)


def tool_config_path() -> Path:
    """The packaged tool yaml (``actor_rollout_ref.rollout.multi_turn.tool_config_path``)."""
    return Path(str(resources.files("steppo_verl") / "config" / "vault_tool.yaml"))


def load_tool() -> VaultTool:
    """The ``open_door`` tool as verl builds it from the packaged yaml (its schema is what verl's tool agent
    loop renders into the prompt)."""
    from verl.tools.tool_registry import initialize_tools_from_config

    with contextlib.redirect_stdout(io.StringIO()):  # verl's BaseTool prints every schema it is given
        (tool,) = initialize_tools_from_config(str(tool_config_path()))
    return tool


@dataclass(frozen=True)
class VaultWorld:
    """``chains[c]`` are the rooms of chain ``c`` in order; ``right_door[room]`` opens the way on."""

    chains: tuple[tuple[str, ...], ...]
    right_door: dict[str, str]

    @classmethod
    def generate(cls, num_chains: int, depth: int, doors: tuple[str, ...], seed: int) -> VaultWorld:
        if num_chains < 1 or depth < 1 or num_chains * depth > len(ROOM_NAMES):
            raise ValueError(f"vault world: need 1 <= chains * depth <= {len(ROOM_NAMES)} rooms, "
                             f"got {num_chains} chains of depth {depth}")
        if len(doors) < 2:
            raise ValueError(f"vault world: need at least two doors to choose from, got {doors}")
        rng = random.Random(seed)
        rooms = rng.sample(ROOM_NAMES, num_chains * depth)
        chains = tuple(tuple(rooms[c * depth:(c + 1) * depth]) for c in range(num_chains))
        return cls(chains=chains, right_door={room: rng.choice(doors) for room in rooms})

    def path(self, chain: int, code: str) -> VaultPath:
        rooms = self.chains[chain]
        return VaultPath(rooms=list(rooms), doors=[self.right_door[r] for r in rooms], code=code)


def call_boilerplate() -> list[str]:
    """The text of an ``open_door`` call before and after the door, as the chat template renders it.

    Written to ``added_tokens.json`` for the tiny model's tokenizer (``--added-tokens``): one token each.
    """
    return json.dumps({"name": TOOL_NAME, "arguments": {"door": "DOOR"}}).split("DOOR")


def build_prompt(start_room: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": f"You are in room {start_room}."}]


def build_row(world: VaultWorld, chain: int, code: str, split: str, index: int) -> dict[str, Any]:
    """One verl row: the prompt, the code as ground truth (the reward's proof of opening), the path as the
    tool's create_kwargs."""
    path = world.path(chain, code)
    create_kwargs = {"rooms": path.rooms, "doors": path.doors, "code": code}
    return {
        "data_source": DATA_SOURCE,
        "prompt": build_prompt(path.rooms[0]),
        "ability": "multi_step",
        "reward_model": {"style": "rule", "ground_truth": [code]},
        "extra_info": {"index": index, "split": split, "chain": chain,
                       "tools_kwargs": {TOOL_NAME: {"create_kwargs": create_kwargs}}},
        "agent_name": AGENT_NAME,
    }


def demonstration(world: VaultWorld, chain: int, code: str, doors: tuple[str, ...],
                  rng: random.Random) -> list[dict[str, Any]]:
    """A conversation that opens uniformly random doors until the vault or a dead end, then answers.

    The outcome is drawn independently of the doors picked: half of the demonstrations reach the vault (so
    that both answers are learnt; with the world's own right doors only ``(1/2)**depth`` would), the
    others hit a dead end at a random room. So the demonstrations say nothing about which door is right.
    """
    rooms = world.chains[chain]
    picked = [rng.choice(doors) for _ in rooms]
    right = list(picked)
    if rng.random() < 0.5:
        wrong_at = rng.randrange(len(rooms))
        right[wrong_at] = rng.choice([door for door in doors if door != picked[wrong_at]])
    path = VaultPath(rooms=list(rooms), doors=right, code=code)
    messages: list[dict[str, Any]] = build_prompt(rooms[0])
    for door in picked:
        call = {"type": "function", "function": {"name": TOOL_NAME, "arguments": {"door": door}}}
        messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        messages.append({"role": "tool", "content": path.open(door)})
        if path.position == DEAD_END:
            break
    answer = OPENED_ANSWER if path.position == len(rooms) else NOT_OPENED_ANSWER
    messages.append({"role": "assistant", "content": f"<answer>{answer}</answer>"})
    return messages


def write_task(out_dir: Path, num_chains: int, depth: int, seed: int, num_demos: int,
               val_codes: int) -> dict[str, Any]:
    """Write the dataset, the demonstrations and the world; returns the world description."""
    tool = load_tool()
    doors = schema_doors(tool.tool_schema)
    schema = tool.tool_schema.model_dump(exclude_unset=True, exclude_none=True)
    world = VaultWorld.generate(num_chains, depth, doors, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {"train": CODES[val_codes:], "val": CODES[:val_codes]}
    for split, codes in splits.items():
        rows = [build_row(world, c, code, split, i)
                for i, (c, code) in enumerate((c, code) for c in range(num_chains) for code in codes)]
        pd.DataFrame(rows).to_parquet(out_dir / f"{split}.parquet")
    rng = random.Random(seed + 1)
    with (out_dir / "demos.jsonl").open("w") as demos:
        for _ in range(num_demos):
            conversation = demonstration(world, rng.randrange(num_chains), rng.choice(CODES), doors, rng)
            demos.write(json.dumps({"messages": conversation, "tools": [schema]}) + "\n")
    (out_dir / "added_tokens.json").write_text(json.dumps(call_boilerplate()))
    description = {"chains": [list(c) for c in world.chains], "right_door": world.right_door, "doors": list(doors),
                   "random_door_success": len(doors) ** -depth}
    (out_dir / "world.json").write_text(json.dumps(description, indent=1))
    return description


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for the parquet files and demos")
    parser.add_argument("--chains", type=int, default=1,
                        help="chains of rooms (start rooms); every chain multiplies the rooms to learn")
    parser.add_argument("--depth", type=int, default=3, help="doors to get right before the vault")
    parser.add_argument("--seed", type=int, default=0, help="world and demonstration seed")
    parser.add_argument("--demos", type=int, default=1024, help="warm-start demonstrations")
    parser.add_argument("--val-codes", type=int, default=4, help="codes (questions per chain) of the validation split")
    args = parser.parse_args()
    world = write_task(args.out, args.chains, args.depth, args.seed, args.demos, args.val_codes)
    print(f"wrote the vault task to {args.out}: chains {world['chains']}, "
          f"random-door success {world['random_door_success']:.3f}")


if __name__ == "__main__":
    main()
