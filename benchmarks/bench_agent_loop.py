"""Agent-loop overhead per step, excluding generation and tool time: ours vs verl's tool agent loop.

    python benchmarks/bench_agent_loop.py                  # 64 episodes x 5 steps
    python benchmarks/bench_agent_loop.py --episodes 256 --steps 8

Both loops run the same scripted episodes against an instant in-process server (pre-tokenized
turns, so "generation" costs nothing) and an instant tool, with verl's real Continuous Token
builder, hermes tool parser and the tiny local tokenizer. Wall time per step is then the loop's
own overhead. Prints both and the ratio; writes ``benchmarks/results/agent_loop.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import verl
from hydra import compose, initialize_config_dir
from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap
from verl.experimental.agent_loop.tool_agent_loop import ToolAgentLoop
from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse
from verl.utils.dataset.rl_dataset import RLHFDataset
from verl.workers.rollout.replica import TokenOutput

from steppo_verl.agent_loop import StepAgentLoop
from steppo_verl.cpu.tiny_model import build_tiny_tokenizer

PROMPT = [{"role": "system", "content": "Answer with search."}, {"role": "user", "content": "Question: capital?"}]


class InstantServer:
    """Returns pre-tokenized turns; generation costs a list copy."""

    def __init__(self, turns: list[list[int]]):
        self.turns, self.next = turns, 0

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs) -> TokenOutput:
        ids = self.turns[self.next % len(self.turns)]
        self.next += 1
        return TokenOutput(token_ids=list(ids), log_probs=[-0.5] * len(ids), stop_reason="completed")


class InstantSearch(BaseTool):
    def __init__(self):
        schema = {"type": "function", "function": {"name": "search", "description": "search",
                  "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": []}}}
        super().__init__({}, OpenAIFunctionToolSchema.model_validate(schema))

    async def execute(self, instance_id, parameters, **kwargs):
        return ToolResponse(text="Doc 1 (Title: Paris) Paris is the capital of France."), 0.0, {}


def episode_turns(tokenizer, steps: int) -> list[list[int]]:
    call = '<tool_call>{"name": "search", "arguments": {"query": "capital of France"}}</tool_call>'
    texts = ["I will search. " + call] * (steps - 1) + ["<answer>Paris</answer>"]
    return [tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id] for t in texts]


async def run_episodes(loop_cls, config, tokenizer, turns, episodes: int) -> float:
    tool = InstantSearch()
    start = time.perf_counter()
    for _ in range(episodes):
        loop = loop_cls(
            trainer_config=DictConfigWrap(config), server_manager=InstantServer(turns), tokenizer=tokenizer,
            processor=None, dataset_cls=RLHFDataset, data_config=DictConfigWrap(config.data),
            hf_model_type="qwen2", tools=ToolListWrap([tool]),
        )
        await loop.run({"temperature": 1.0}, raw_prompt=PROMPT)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="model steps per episode (the last one answers)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (median is reported)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "agent_loop.json")
    args = parser.parse_args()

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        config = compose("ppo_trainer", overrides=[
            "actor_rollout_ref.rollout.response_length=4096",
            f"actor_rollout_ref.rollout.multi_turn.max_assistant_turns={args.steps + 1}",
            "actor_rollout_ref.rollout.multi_turn.format=hermes",
        ])
    tokenizer = build_tiny_tokenizer()
    turns = episode_turns(tokenizer, args.steps)
    total_steps = args.episodes * args.steps
    results = {}
    for name, loop_cls in (("verl ToolAgentLoop", ToolAgentLoop), ("steppo StepAgentLoop", StepAgentLoop)):
        asyncio.run(run_episodes(loop_cls, config, tokenizer, turns, 2))  # warm-up
        seconds = statistics.median(
            asyncio.run(run_episodes(loop_cls, config, tokenizer, turns, args.episodes)) for _ in range(args.repeats)
        )
        results[name] = seconds / total_steps * 1000
    base, ours = results["verl ToolAgentLoop"], results["steppo StepAgentLoop"]
    print(f"{args.episodes} episodes x {args.steps} steps, instant server and tool")
    print(f"{'loop':24s} {'ms per step':>12s}")
    for name, ms in results.items():
        print(f"{name:24s} {ms:12.3f}")
    print(f"step record overhead: {ours - base:+.3f} ms per step (ratio {ours / base:.2f}x verl's loop)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"episodes": args.episodes, "steps": args.steps, "ms_per_step": results,
                                    "overhead_ms_per_step": ours - base}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
