"""Does the critic's input at a step start tell the states apart? The final hidden state of a model per position
around the step start, grouped by state.

    python benchmarks/probe_step_starts.py --model /tmp/tw/world0/model-world0-level2 \
        --games /tmp/tw/world0/games-world0-level2/train.parquet
    python benchmarks/probe_step_starts.py --model /tmp/vault/world0/model-world0 \
        --demos /tmp/vault/world0/task-world0/demos.jsonl --prefix ""

StepPO reads V(s_k) at the first action token of step k: verl's critic value there is a linear head on the hidden
state of the token before it, the last token of the chat template's generation prompt. A critic initialised from
the policy can only tell two states apart at once if that hidden state differs between them. For every TextWorld
game of ``--games`` (a parquet the task's prepare wrote) the probe plays the game's walkthrough and renders each
state it passes through (the first observation, then the observation after each walkthrough command) as the
environment loop's conversation: the row's system prompt, the observations as user turns and the commands as
``<action>...</action>`` assistant turns, then the generation prompt and ``--prefix`` (the action's opening text).
For the last ``--positions`` tokens it reports the mean norm of the hidden state, its spread within a state (root
mean squared distance to the state's mean over the games), the distance between the states' means (averaged
over pairs of states) and the smallest such distance (the closest pair: a mean can look large while two of the
states sit on top of each other). States are the walkthrough depth: 0 is the first room, 1 after the first command, etc.

``--demos`` probes a tool task instead (the vault's warm-start demonstrations, ``demos.jsonl``: chat messages with
tool calls, and the tools): every tool response a demonstration goes on to act on is a state, named by its text,
rendered with the tools as the tool agent loop renders it (the first user turn is left out: its template tokens
differ, so positions counted from the end would not line up). ``--same-state PREFIX`` names every observation that
starts with PREFIX as one state (the vault's open vault shows a different code in every prompt). The step start
there is the assistant turn's first token (``--prefix ""``).
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
    closest: float  # the smallest distance between two states' means: the pair a critic there tells apart least
    closest_pair: tuple[int, int]  # those two states


def final_hidden_states(model: Any, tokenizer: Any, messages: list[dict[str, Any]], prefix: str,
                        tools: list[dict] | None = None) -> tuple[Any, Any]:
    """``([T, H] final hidden states, [T] token ids)`` of ``messages`` (and ``tools``) rendered with the generation
    prompt and ``prefix`` appended."""
    import torch

    text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False) + prefix
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[-1][0]
    return hidden, ids[0]


def position_signal(model: Any, tokenizer: Any, conversations: Sequence[list[dict[str, Any]]],
                    states: Sequence[int], prefix: str = "", positions: int = 12,
                    tools: list[dict] | None = None) -> list[PositionSignal]:
    """Per position from the end (1 = last token), how far apart the states' hidden states are.

    Args:
        conversations: one chat per sample, each ending in the observation of the state it was taken in.
        states: the state of each conversation; at least two distinct states.
        prefix: text the assistant turn starts with before its first free choice (e.g. ``<action>``).
        positions: how many positions to report, counted back from the last token.
        tools: the tools every conversation is rendered with (a tool task's), None for none.
    """
    import torch

    if len(conversations) != len(states) or len(set(states)) < 2:
        raise ValueError("need one state per conversation and at least two distinct states")
    hidden, tokens = zip(*(final_hidden_states(model, tokenizer, chat, prefix, tools) for chat in conversations))
    positions = min(positions, min(len(ids) for ids in tokens))
    labels = torch.tensor(states)
    report = []
    for offset in range(1, positions + 1):
        at = torch.stack([h[-offset] for h in hidden]).double()  # [N, H]
        means = {state: at[labels == state].mean(0) for state in sorted(set(states))}
        spread = torch.cat([at[labels == state] - mean for state, mean in means.items()])
        between = {(a, b): torch.dist(means[a], means[b]).item() for a, b in itertools.combinations(means, 2)}
        closest_pair = min(between, key=between.get)
        report.append(PositionSignal(offset, tokenizer.decode(tokens[0][-offset]), at.norm(dim=1).mean().item(),
                                     spread.pow(2).sum(1).mean().sqrt().item(), sum(between.values()) / len(between),
                                     between[closest_pair], closest_pair))
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


def demo_states(demos: str, limit: int) -> tuple[list[list[dict[str, Any]]], list[str], list[dict] | None]:
    """The conversations of the first ``limit`` demonstrations' states (each ending in a tool response that an
    assistant turn follows), their observation texts and the demonstrations' tools."""
    import json

    conversations, names, tools = [], [], None
    with open(demos) as lines:
        for line in itertools.islice(lines, limit):
            demo = json.loads(line)
            tools = demo.get("tools", tools)
            messages = demo["messages"]
            for at, message in enumerate(messages[:-1]):
                if message["role"] == "tool" and messages[at + 1]["role"] == "assistant":
                    conversations.append(messages[: at + 1])
                    names.append(message["content"])
    return conversations, names, tools


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local model directory (the task's warm start)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--games", help="a TextWorld task parquet with walkthroughs")
    source.add_argument("--demos", help="a tool task's demonstrations (the vault's demos.jsonl)")
    parser.add_argument("--limit", type=int, default=64, help="demonstrations to read with --demos")
    parser.add_argument("--same-state", action="append", default=[], metavar="PREFIX",
                        help="with --demos: observations starting with PREFIX are one state (repeatable)")
    parser.add_argument("--prefix", default="<action>", help="the action's fixed opening text")
    parser.add_argument("--depth", type=int, default=1, help="walkthrough commands to follow (states 0..depth)")
    parser.add_argument("--positions", type=int, default=12)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tools = None
    if args.games:
        conversations, depths = walkthrough_states(args.games, args.depth)
        names = [f"depth {depth}" for depth in depths]
    else:
        conversations, names, tools = demo_states(args.demos, args.limit)
        names = [next((prefix for prefix in args.same_state if name.startswith(prefix)), name) for name in names]
    ordered = sorted(set(names))
    states = [ordered.index(name) for name in names]
    described = f"{len(ordered)} states ({', '.join(map(repr, ordered))})"
    prefix_tokens = len(tokenizer.encode(args.prefix, add_special_tokens=False))
    print(f"{len(conversations)} conversations of {described}; the step start (V(s_k)'s input) is "
          f"offset {prefix_tokens + 1}, the token before the action's first token")
    print("| offset | token | norm | within a state | between states | between / within | closest pair | "
          "closest / within |")
    print("|---:|---|---:|---:|---:|---:|---|---:|")
    for row in position_signal(model, tokenizer, conversations, states, args.prefix, args.positions, tools):
        pair = " / ".join(str(ordered[state]) for state in row.closest_pair)
        print(f"| {row.offset} | {row.token!r} | {row.norm:.2f} | {row.within:.3f} | {row.between:.3f} | "
              f"{row.between / max(row.within, 1e-12):.2f} | {pair}: {row.closest:.3f} | "
              f"{row.closest / max(row.within, 1e-12):.2f} |")


if __name__ == "__main__":
    main()
