"""Does the critic's input at a step start tell the states apart? The final hidden state of a model per position
around the step start, grouped by state.

    python benchmarks/probe_step_starts.py --model /tmp/tw/world0/model-world0-level2 \
        --games /tmp/tw/world0/games-world0-level2/train.parquet

StepPO reads V(s_k) at the first action token of step k: verl's critic value there is a linear head on the hidden
state of the token before it, the last token of the chat template's generation prompt. A critic initialised from
the policy can only tell two states apart at once if that hidden state differs between them. For every TextWorld
game of ``--games`` (a parquet the task's prepare wrote) the probe plays the game's walkthrough and renders each
state it passes through (the first observation, then the observation after each walkthrough command) as the
environment loop's conversation: the row's system prompt, the observations as user turns and the commands as
``<action>...</action>`` assistant turns, then the generation prompt and ``--prefix`` (the action's opening text).
For the last ``--positions`` tokens it reports the mean norm of the hidden state, its spread within a state (root
mean squared distance to the state's mean over the games) and the distance between the states' means (averaged
over pairs of states). States are the walkthrough depth: 0 is the first room, 1 after the first command, etc.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from typing import Any, NamedTuple


class PositionSignal(NamedTuple):
    offset: int  # tokens from the end of the conversation: 1 is the last token
    token: str  # the token at that position in the first conversation
    norm: float  # mean norm of the final hidden state there
    within: float  # RMS distance to the state's mean hidden state
    between: float  # mean distance between two states' mean hidden states


def final_hidden_states(model: Any, tokenizer: Any, messages: list[dict[str, str]], prefix: str) -> tuple[Any, Any]:
    """``([T, H] final hidden states, [T] token ids)`` of ``messages`` rendered with the generation prompt and
    ``prefix`` appended."""
    import torch

    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + prefix
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[-1][0]
    return hidden, ids[0]


def position_signal(model: Any, tokenizer: Any, conversations: Sequence[list[dict[str, str]]],
                    states: Sequence[int], prefix: str = "", positions: int = 12) -> list[PositionSignal]:
    """Per position from the end (1 = last token), how far apart the states' hidden states are.

    Args:
        conversations: one chat per sample, each ending in the observation of the state it was taken in.
        states: the state of each conversation; at least two distinct states.
        prefix: text the assistant turn starts with before its first free choice (e.g. ``<action>``).
        positions: how many positions to report, counted back from the last token.
    """
    import torch

    if len(conversations) != len(states) or len(set(states)) < 2:
        raise ValueError("need one state per conversation and at least two distinct states")
    hidden, tokens = zip(*(final_hidden_states(model, tokenizer, chat, prefix) for chat in conversations))
    positions = min(positions, min(len(ids) for ids in tokens))
    labels = torch.tensor(states)
    report = []
    for offset in range(1, positions + 1):
        at = torch.stack([h[-offset] for h in hidden]).double()  # [N, H]
        means = {state: at[labels == state].mean(0) for state in sorted(set(states))}
        spread = torch.cat([at[labels == state] - mean for state, mean in means.items()])
        between = [torch.dist(means[a], means[b]).item() for a, b in itertools.combinations(means, 2)]
        report.append(PositionSignal(offset, tokenizer.decode(tokens[0][-offset]), at.norm(dim=1).mean().item(),
                                     spread.pow(2).sum(1).mean().sqrt().item(), sum(between) / len(between)))
    return report


def walkthrough_states(games: str, max_depth: int) -> tuple[list[list[dict[str, str]]], list[int]]:
    """The conversations of every game's walkthrough states up to ``max_depth`` commands, and their depths."""
    import pandas as pd

    from steppo_verl.envs.actions import action_text
    from steppo_verl.tasks.textworld.env import TextWorldEnv

    conversations, depths = [], []
    for _, row in pd.read_parquet(games).iterrows():
        env = TextWorldEnv()
        try:
            chat = [dict(message) for message in row["prompt"]]
            chat.append({"role": "user", "content": env.reset(dict(row["extra_info"]["env_task"])).observation})
            commands = list(row["extra_info"]["walkthrough"])
            for depth in range(min(max_depth, len(commands) - 1) + 1):  # states with a command still to give
                if depth:
                    chat.append({"role": "assistant", "content": action_text(commands[depth - 1])})
                    chat.append({"role": "user", "content": env.step(commands[depth - 1]).observation})
                conversations.append(list(chat))
                depths.append(depth)
        finally:
            env.close()
    return conversations, depths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local model directory (the task's warm start)")
    parser.add_argument("--games", required=True, help="a TextWorld task parquet with walkthroughs")
    parser.add_argument("--prefix", default="<action>", help="the action's fixed opening text")
    parser.add_argument("--depth", type=int, default=1, help="walkthrough commands to follow (states 0..depth)")
    parser.add_argument("--positions", type=int, default=12)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    conversations, depths = walkthrough_states(args.games, args.depth)
    prefix_tokens = len(tokenizer.encode(args.prefix, add_special_tokens=False))
    print(f"{len(conversations)} states of {len(set(depths))} depths; the step start (V(s_k)'s input) is "
          f"offset {prefix_tokens + 1}, the token before the action's first token")
    print("| offset | token | norm | within a state | between states | between / within |")
    print("|---:|---|---:|---:|---:|---:|")
    for row in position_signal(model, tokenizer, conversations, depths, args.prefix, args.positions):
        print(f"| {row.offset} | {row.token!r} | {row.norm:.2f} | {row.within:.3f} | {row.between:.3f} | "
              f"{row.between / max(row.within, 1e-12):.2f} |")


if __name__ == "__main__":
    main()
