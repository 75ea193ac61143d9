"""Agent-loop overhead per step (ours vs verl's tool agent loop), then rollout concurrency of ours.

    python benchmarks/bench_agent_loop.py                  # 64 episodes x 5 steps; 1, 8, 64 in flight
    python benchmarks/bench_agent_loop.py --episodes 256 --steps 8 --concurrency 1 16 128

Overhead: both loops run the same scripted episodes against an instant in-process server
(pre-tokenized turns, so "generation" costs nothing) and an instant tool, with verl's real
Continuous Token builder, hermes tool parser and the tiny local tokenizer. Wall time per step is
then the loop's own overhead.

Concurrency: N trajectories of our loop in flight at once on one event loop, as in a verl agent-loop
worker, against a server that sleeps ``--generation-ms`` per turn, with two tools: one that sleeps
``--tool-ms`` (a remote retriever) and the real embedded BM25 search tool on a small synthetic
corpus. Wall time is compared with N times the wall time of one trajectory alone (nothing
overlapped), measured in the same run; the ratio is the achieved overlap (ideal: N). Also reported:
process CPU time, and the event loop's worst lag (how long a coroutine waited past its wake-up),
which shows whether anything blocks the loop.

Writes ``benchmarks/results/agent_loop.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import verl
from bench_retrieval import make_zipf_corpus, make_zipf_queries
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap
from verl.experimental.agent_loop.tool_agent_loop import ToolAgentLoop
from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse
from verl.utils.dataset.rl_dataset import RLHFDataset
from verl.workers.rollout.replica import TokenOutput

from steppo_verl.agent_loop import StepAgentLoop
from steppo_verl.dev.tiny_model import build_tiny_tokenizer
from steppo_verl.tasks.qa.retrieval import BM25Index
from steppo_verl.tasks.qa.tool import SearchTool

SEARCH_TOOL_YAML = Path(__file__).parents[1] / "steppo_verl" / "tasks" / "qa" / "search_tool.yaml"
LAG_PROBE_S = 0.005

PROMPT = [{"role": "system", "content": "Answer with search."}, {"role": "user", "content": "Question: capital?"}]


class InstantServer:
    """Returns pre-tokenized turns; generation costs a list copy."""

    def __init__(self, turns: list[list[int]]):
        self.turns, self.next = turns, 0

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs) -> TokenOutput:
        ids = self.turns[self.next % len(self.turns)]
        self.next += 1
        return TokenOutput(token_ids=list(ids), log_probs=[-0.5] * len(ids), stop_reason="completed")


class SlowServer(InstantServer):
    """Pre-tokenized turns after a simulated generation latency, during which the event loop is free."""

    def __init__(self, turns: list[list[int]], latency_s: float):
        super().__init__(turns)
        self.latency_s = latency_s

    async def generate(self, request_id, **kwargs) -> TokenOutput:
        await asyncio.sleep(self.latency_s)
        return await super().generate(request_id, **kwargs)


class InstantSearch(BaseTool):
    def __init__(self):
        schema = {"type": "function", "function": {"name": "search", "description": "search",
                  "parameters": {"type": "object", "properties": {"query_list": {"type": "array"}}, "required": []}}}
        super().__init__({}, OpenAIFunctionToolSchema.model_validate(schema))

    async def execute(self, instance_id, parameters, **kwargs):
        return ToolResponse(text="Doc 1 (Title: Paris) Paris is the capital of France."), 0.0, {}


class SlowSearch(InstantSearch):
    """A remote retriever's answer time, spent awaiting (the event loop is free meanwhile)."""

    def __init__(self, latency_s: float):
        super().__init__()
        self.latency_s = latency_s

    async def execute(self, instance_id, parameters, **kwargs):
        await asyncio.sleep(self.latency_s)
        return await super().execute(instance_id, parameters, **kwargs)


def episode_turns(tokenizer, steps: int, query: str = "capital of France") -> list[list[int]]:
    call = '<tool_call>{"name": "search", "arguments": {"query_list": [%s]}}</tool_call>' % json.dumps(query)
    texts = ["I will search. " + call] * (steps - 1) + ["<answer>Paris</answer>"]
    return [tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id] for t in texts]


def make_loop(loop_cls, config, tokenizer, server, tool: BaseTool):
    return loop_cls(
        trainer_config=DictConfigWrap(config), server_manager=server, tokenizer=tokenizer,
        processor=None, dataset_cls=RLHFDataset, data_config=DictConfigWrap(config.data),
        hf_model_type="qwen2", tools=ToolListWrap([tool]),
    )


async def run_episodes(loop_cls, config, tokenizer, turns, episodes: int) -> float:
    tool = InstantSearch()
    start = time.perf_counter()
    for _ in range(episodes):
        loop = make_loop(loop_cls, config, tokenizer, InstantServer(turns), tool)
        await loop.run({"temperature": 1.0}, raw_prompt=PROMPT)
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------ concurrency


async def worst_lag(stop: asyncio.Event) -> float:
    """The longest a coroutine waking every LAG_PROBE_S waited past its wake-up time, until ``stop``."""
    lag = 0.0
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.sleep(LAG_PROBE_S)
        lag = max(lag, time.perf_counter() - started - LAG_PROBE_S)
    return lag


async def run_in_flight(run_one: Callable, turn_sets: list[list[list[int]]]) -> dict[str, float]:
    """All trajectories started at once; wall and process CPU time, and the event loop's worst lag."""
    stop = asyncio.Event()
    probe = asyncio.create_task(worst_lag(stop))
    cpu, start = time.process_time(), time.perf_counter()
    await asyncio.gather(*(run_one(turns) for turns in turn_sets))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    stop.set()
    return {"wall_s": wall, "cpu_s": cpu, "max_lag_ms": await probe * 1000}


def measure_concurrency(run_one: Callable, turn_sets, levels: list[int], repeats: int) -> list[dict[str, float]]:
    """The median-wall-time run per number in flight; ``levels[0]`` must be 1, the no-overlap baseline."""
    asyncio.run(run_in_flight(run_one, turn_sets[:2]))  # warm-up: index load, worker threads
    rows = []
    for n in levels:
        runs = sorted((asyncio.run(run_in_flight(run_one, turn_sets[:n])) for _ in range(repeats)),
                      key=lambda run: run["wall_s"])
        rows.append({"in_flight": n, **runs[len(runs) // 2]})
    for row in rows:
        row["serial_s"] = row["in_flight"] * rows[0]["wall_s"]
        row["overlap"] = row["serial_s"] / row["wall_s"]
    return rows


def small_index(directory: Path, paragraphs: int) -> list[str]:
    """Build a BM25 index of a small synthetic corpus into ``directory``; queries that match it."""
    passages = make_zipf_corpus(paragraphs, vocabulary_size=5_000, seed=0)
    BM25Index.build(passages, progress=False).save(directory)
    return make_zipf_queries(passages, 256, seed=0)


def embedded_search_tool(index_dir: Path) -> SearchTool:
    schema = OmegaConf.to_container(OmegaConf.load(SEARCH_TOOL_YAML).tools[0].tool_schema, resolve=True)
    return SearchTool({"backend": "embedded", "index_dir": str(index_dir)},
                      OpenAIFunctionToolSchema.model_validate(schema))


def concurrency_report(config, tokenizer, args) -> list[dict]:
    generation_s, tool_s, most = args.generation_ms / 1000, args.tool_ms / 1000, max(args.concurrency)
    levels = sorted(set(args.concurrency) | {1})
    with tempfile.TemporaryDirectory() as scratch:
        queries = small_index(Path(scratch), args.corpus_paragraphs)
        tools = {
            f"sleep {args.tool_ms:g} ms": (SlowSearch(tool_s), ["capital of France"]),
            f"embedded BM25, {args.corpus_paragraphs:,} paragraphs": (embedded_search_tool(Path(scratch)), queries),
        }
        report = []
        for tool_name, (tool, tool_queries) in tools.items():
            turn_sets = [episode_turns(tokenizer, args.steps, tool_queries[i % len(tool_queries)]) for i in range(most)]

            async def run_one(turns, tool=tool):
                loop = make_loop(StepAgentLoop, config, tokenizer, SlowServer(turns, generation_s), tool)
                await loop.run({"temperature": 1.0}, raw_prompt=PROMPT)

            for row in measure_concurrency(run_one, turn_sets, levels, args.repeats):
                report.append({"tool": tool_name, **row, "steps_per_s": row["in_flight"] * args.steps / row["wall_s"]})
    return report


def print_concurrency(report: list[dict], args) -> None:
    simulated = args.steps * args.generation_ms + (args.steps - 1) * args.tool_ms
    print(f"\nStepAgentLoop, {args.steps} steps per trajectory, generation {args.generation_ms:g} ms per turn "
          f"(simulated latency per trajectory with the sleeping tool: {simulated:g} ms)")
    print(f"{'tool':34s} {'in flight':>9s} {'wall ms':>9s} {'serial ms':>10s} {'overlap':>8s} "
          f"{'steps/s':>8s} {'CPU ms':>8s} {'max lag ms':>10s}")
    for row in report:
        print(f"{row['tool']:34s} {row['in_flight']:9d} {row['wall_s'] * 1000:9.0f} "
              f"{row['serial_s'] * 1000:10.0f} {row['overlap']:7.1f}x {row['steps_per_s']:8.0f} "
              f"{row['cpu_s'] * 1000:8.0f} {row['max_lag_ms']:10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="model steps per episode (the last one answers)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (median is reported)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64], help="trajectories in flight")
    parser.add_argument("--generation-ms", type=float, default=20.0, help="simulated generation time per turn")
    parser.add_argument("--tool-ms", type=float, default=50.0, help="simulated latency of the sleeping tool")
    parser.add_argument("--corpus-paragraphs", type=int, default=5_000, help="corpus of the embedded search tool")
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
    concurrency = concurrency_report(config, tokenizer, args)
    print_concurrency(concurrency, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "episodes": args.episodes, "steps": args.steps, "ms_per_step": results, "overhead_ms_per_step": ours - base,
        "concurrency": {"generation_ms": args.generation_ms, "tool_ms": args.tool_ms, "runs": concurrency},
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
