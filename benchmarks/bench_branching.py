"""ARPO's branching rollouts against independent rollouts: what the rollout server encodes and generates per prompt.

    python benchmarks/bench_branching.py             # 16 trajectories per prompt (8 initial, beam 2), 8 planner seeds
    python benchmarks/bench_branching.py --quick     # 3 seeds, one run each
    python benchmarks/bench_branching.py --initial 4 --total 8 --seeds 16

Both arms run ``steppo_agent`` with a ``branching:`` block and return ``--total`` trajectories per prompt:

- **branching**: ARPO's public setting (:class:`steppo_verl.branching.BranchingConfig`'s defaults): ``--initial``
  whole rollouts, then branches (a copy of a trajectory's whole context after a tool response) until ``--total``.
- **independent**: ``initial_rollouts = total_rollouts``: the planner has no slot left to branch into, so all
  trajectories start from the prompt, as ``rollout.n`` copies would (same loop, same steps, no branch).

The rollout server is scripted and instant; it plays a search agent of HotpotQA's shape (as
``bench_layout.py``): a prompt of ~``--prompt-tokens``, then per step an action of 30-120 tokens (text, then a
tool call) and a retrieval observation of 200-600 tokens; a trajectory makes 3 tool calls, a 4th with
probability 1/2, then answers (``--calls``). Text is drawn from the local encyclopedia corpus. Each reply reports
top-k log-probs (the top token's probability drawn per reply), which the planner's entropy rule reads; the
planner's own draws are seeded per prompt (``branch_seed``: the rollout seed and the sample's index).

Counted in the server's ``generate``, per prompt: calls; tokens encoded (the summed lengths of the contexts it
was sent: every call re-encodes its whole context); tokens encoded with an ideal prefix cache (vLLM's automatic
prefix caching: blocks of 16 tokens already seen in an earlier call, prompt or generated, are not encoded
again; no eviction, calls in the order they arrive); tokens generated. These counts are the same in every run
of a seed (the benchmark checks it). From the rows: branches made, whole rollouts started late (when no
trajectory could branch), the response tokens each branch copied from its parent, and the tokens of the
training rows. Wall time is the agent loop's own work (the server and the tool are instant), the median of
``--repeats`` runs. Writes ``benchmarks/results/branching.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import math
import os
import random
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import encyclopedia_text
import verl
from hydra import compose, initialize_config_dir
from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap
from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse
from verl.utils.dataset.rl_dataset import RLHFDataset
from verl.workers.rollout.replica import TokenOutput

from steppo_verl.agent_loop import StepAgentLoop
from steppo_verl.branching import BranchingConfig
from steppo_verl.dev.tiny_model import build_tiny_tokenizer

ACTION_TOKENS = (30, 120)  # per step, the tool call or the answer included
OBSERVATION_TOKENS = (200, 600)
CACHE_BLOCK = 16  # vLLM's default KV-cache block size: its prefix cache matches whole blocks
SYSTEM = "Answer the question. Search with the search tool, then give the answer inside <answer> tags."
SEARCH_SCHEMA = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the encyclopedia.",
        "parameters": {"type": "object", "properties": {"query_list": {"type": "array"}}, "required": []},
    },
}
CALL = '<tool_call>{"name": "search", "arguments": {"query_list": ["the bridge over the river"]}}</tool_call>'
ANSWER = "<answer>Dunmore</answer>"


class TextPool:
    """Token ids of encyclopedia paragraphs; random spans of it are the scripted actions and observations."""

    def __init__(self, tokenizer, paragraphs: int = 400):
        text = " ".join(p.text for p in encyclopedia_text.generate(paragraphs, seed=0))
        self.ids = tokenizer.encode(text, add_special_tokens=False)

    def span(self, rng: random.Random, length: int) -> list[int]:
        if not 0 <= length < len(self.ids):
            raise ValueError(f"a span of the text pool must have 0 to {len(self.ids) - 1} tokens, got {length}")
        start = rng.randrange(len(self.ids) - length)
        return self.ids[start : start + length]


class PrefixCache:
    """An ideal prefix cache: block hashes (each chained to the previous block's) of every token sequence seen."""

    def __init__(self):
        self.blocks: set[int] = set()

    def cached_tokens(self, ids: list[int]) -> int:
        """How many leading tokens of ``ids`` are in whole blocks already seen."""
        cached = 0
        for block_hash in self._chain(ids):
            if block_hash not in self.blocks:
                break
            cached += CACHE_BLOCK
        return cached

    def store(self, ids: list[int]) -> None:
        self.blocks.update(self._chain(ids))

    @staticmethod
    def _chain(ids: list[int]) -> Iterator[int]:
        """The hash of each whole block of ``ids``, chained: a block matches only after the same prefix."""
        previous = None
        for start in range(0, len(ids) - CACHE_BLOCK + 1, CACHE_BLOCK):
            previous = hash((previous, tuple(ids[start : start + CACHE_BLOCK])))
            yield previous


class ScriptedSearchAgent:
    """Stands in for the rollout server: an instant search agent of HotpotQA's shape that counts its work.

    A reply is a span of text, then a tool call or the answer: with ``calls = (low, high)``, a trajectory makes
    ``low`` calls, then one more with probability 1/2 at each turn, up to ``high``. Every token of a reply gets
    the same top-k log-probs: the top token's probability is drawn per reply, the rest split evenly, so the
    planner sees segments of varying entropy.
    """

    def __init__(self, tokenizer, pool: TextPool, seed: int, calls: tuple[int, int]):
        self.tokenizer, self.pool, self.calls = tokenizer, pool, calls
        self.rng = random.Random(f"server-{seed}")
        self.tool_response_id = tokenizer.convert_tokens_to_ids("<tool_response>")
        self.call_ids = tokenizer.encode(CALL, add_special_tokens=False)
        self.answer_ids = tokenizer.encode(ANSWER, add_special_tokens=False)
        self.cache = PrefixCache()
        self.counts = {"calls": 0, "encoded": 0, "encoded_prefix_cached": 0, "generated": 0}

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs) -> TokenOutput:
        ids = self._reply(turn=prompt_ids.count(self.tool_response_id))
        self._count(list(prompt_ids), ids)
        return TokenOutput(
            token_ids=ids, log_probs=[-0.5] * len(ids), stop_reason="completed",
            extra_fields={"top_logprobs": [self._top_logprobs(sampling_params["top_logprobs"])] * len(ids)},
        )

    def _reply(self, turn: int) -> list[int]:
        low, high = self.calls
        calls_again = turn < low or (turn < high and self.rng.random() < 0.5)
        ending = self.call_ids if calls_again else self.answer_ids
        text_length = max(0, self.rng.randint(*ACTION_TOKENS) - len(ending) - 1)  # a bare call is 32 tokens
        return self.pool.span(self.rng, text_length) + ending + [self.tokenizer.eos_token_id]

    def _top_logprobs(self, k: int) -> list[float]:
        top = self.rng.uniform(0.3, 0.95)
        return [math.log(top)] + [math.log((1 - top) / (k - 1))] * (k - 1)

    def _count(self, prompt_ids: list[int], generated: list[int]) -> None:
        self.counts["calls"] += 1
        self.counts["encoded"] += len(prompt_ids)
        self.counts["encoded_prefix_cached"] += len(prompt_ids) - self.cache.cached_tokens(prompt_ids)
        self.counts["generated"] += len(generated)
        self.cache.store(prompt_ids + generated)


class PassageSearch(BaseTool):
    """An instant retriever: a span of encyclopedia text of 200-600 tokens per call."""

    def __init__(self, tokenizer, pool: TextPool, seed: int):
        with contextlib.redirect_stdout(io.StringIO()):  # verl's BaseTool prints every schema it is given
            super().__init__({}, OpenAIFunctionToolSchema.model_validate(SEARCH_SCHEMA))
        self.tokenizer, self.pool = tokenizer, pool
        self.rng = random.Random(f"tool-{seed}")

    async def execute(self, instance_id, parameters, **kwargs):
        span = self.pool.span(self.rng, self.rng.randint(*OBSERVATION_TOKENS))
        return ToolResponse(text=self.tokenizer.decode(span)), 0.0, {}


def build_prompt(tokenizer, pool: TextPool, seed: int, prompt_tokens: int) -> list[dict[str, str]]:
    """A system message and a question padded with encyclopedia text to about ``prompt_tokens`` in all."""
    rng = random.Random(f"prompt-{seed}")
    bare = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Question: "}]
    overhead = len(tokenizer.apply_chat_template(bare, tools=[SEARCH_SCHEMA], add_generation_prompt=True))
    question = tokenizer.decode(pool.span(rng, max(1, prompt_tokens - overhead)))
    return [bare[0], {"role": "user", "content": "Question: " + question}]


def trainer_config(max_turns: int):
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose("ppo_trainer", overrides=[
            "actor_rollout_ref.rollout.response_length=16384",
            "actor_rollout_ref.rollout.multi_turn.format=hermes",
            f"actor_rollout_ref.rollout.multi_turn.max_assistant_turns={max_turns}",
            "actor_rollout_ref.rollout.multi_turn.max_tool_response_length=100000",
        ])


async def rollout_prompt(config, tokenizer, pool: TextPool, branching: BranchingConfig, seed: int, args) -> dict:
    """One prompt's ``total_rollouts`` trajectories; what the server counted, the rows' branch figures, wall time."""
    # verl tokenizes on the loop's default executor; one worker keeps the order of the server's calls, and so
    # each seed's figures, the same from run to run.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=1))
    server = ScriptedSearchAgent(tokenizer, pool, seed, tuple(args.calls))
    loop = StepAgentLoop(
        trainer_config=DictConfigWrap(config), server_manager=server, tokenizer=tokenizer, processor=None,
        dataset_cls=RLHFDataset, data_config=DictConfigWrap(config.data), hf_model_type="qwen2",
        tools=ToolListWrap([PassageSearch(tokenizer, pool, seed)]), branching=dataclasses.asdict(branching),
    )
    prompt = build_prompt(tokenizer, pool, seed, args.prompt_tokens)
    start = time.perf_counter()
    rows = await loop.run({"temperature": 1.0}, raw_prompt=prompt, extra_info={}, global_steps=1, index=seed,
                          session_id=0)
    wall_ms = (time.perf_counter() - start) * 1000
    if len(rows) != branching.total_rollouts:
        raise RuntimeError(f"expected {branching.total_rollouts} trajectories, got {len(rows)}")
    branches = [row for row in rows if row.parent_id >= 0]
    return {
        **server.counts,
        "row_tokens": sum(len(row.prompt_ids) + len(row.response_ids) for row in rows),
        "wall_ms": wall_ms,
        "branches": len(branches),
        "late_whole_rollouts": len(rows) - branching.initial_rollouts - len(branches),
        "copied_per_branch": statistics.mean(b.branch_position for b in branches) if branches else math.nan,
    }


def repeated_rollout(config, tokenizer, pool: TextPool, branching: BranchingConfig, seed: int, args) -> dict:
    """:func:`rollout_prompt` ``--repeats`` times: the median wall time; every count must come out the same."""
    runs = [asyncio.run(rollout_prompt(config, tokenizer, pool, branching, seed, args)) for _ in range(args.repeats)]
    counts = [{k: v for k, v in run.items() if k != "wall_ms"} for run in runs]
    if any(json.dumps(c) != json.dumps(counts[0]) for c in counts):  # as text: NaN == NaN there
        raise RuntimeError(f"seed {seed}: the same rollout counted differently across repeats: {counts}")
    return {**runs[0], "wall_ms": statistics.median(run["wall_ms"] for run in runs)}


METRICS = {
    "calls": "generate calls",
    "encoded": "tokens encoded",
    "encoded_prefix_cached": "encoded, ideal prefix cache",
    "generated": "tokens generated",
    "row_tokens": "tokens in the training rows",
    "wall_ms": "agent-loop wall ms",
    "branches": "branches made",
    "late_whole_rollouts": "whole rollouts started late",
    "copied_per_branch": "copied tokens per branch (past prompt)",
}
RATIO_METRICS = ("calls", "encoded", "encoded_prefix_cached", "generated", "row_tokens", "wall_ms")


def spread(values: list[float]) -> dict[str, float]:
    """Mean and range over seeds (seeds without a value, e.g. no branch made, left out)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return {"mean": math.nan, "min": math.nan, "max": math.nan}
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values)}


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per metric: each arm's mean and range over seeds, and the branching / independent ratio (per seed)."""
    summary = {}
    for key in METRICS:
        entry = {arm: spread([run[key] for run in arm_runs]) for arm, arm_runs in runs.items()}
        if key in RATIO_METRICS:
            entry["ratio"] = spread([b[key] / i[key] for b, i in zip(runs["branching"], runs["independent"])])
        summary[key] = entry
    return summary


def cell(stats: dict[str, float], fmt: str) -> str:
    if math.isnan(stats["mean"]):
        return "-"
    return f"{stats['mean']:{fmt}} [{stats['min']:{fmt}}-{stats['max']:{fmt}}]"


def print_table(summary: dict[str, dict]) -> None:
    print(f"{'per prompt, mean [range over seeds]':38s} {'independent':>24s} {'branching':>24s} "
          f"{'branching / indep.':>20s}")
    for key, label in METRICS.items():
        entry = summary[key]
        ratio = cell(entry["ratio"], ".2f") if "ratio" in entry else ""
        print(f"{label:38s} {cell(entry['independent'], ',.0f'):>24s} {cell(entry['branching'], ',.0f'):>24s} "
              f"{ratio:>20s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = BranchingConfig()
    parser.add_argument("--initial", type=int, default=defaults.initial_rollouts, help="branching: initial rollouts")
    parser.add_argument("--total", type=int, default=defaults.total_rollouts, help="trajectories per prompt, both arms")
    parser.add_argument("--beam", type=int, default=defaults.beam, help="branching: a path and its branches per round")
    parser.add_argument("--seeds", type=int, default=8, help="prompts, each with its own planner seed")
    parser.add_argument("--repeats", type=int, default=3, help="runs per seed (median wall time)")
    parser.add_argument("--quick", action="store_true", help="3 seeds, 1 run each")
    parser.add_argument("--calls", type=int, nargs=2, default=[3, 4], metavar=("LOW", "HIGH"),
                        help="tool calls per trajectory before the answer")
    parser.add_argument("--prompt-tokens", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "branching.json")
    args = parser.parse_args()
    if not 0 <= args.calls[0] <= args.calls[1]:
        parser.error(f"--calls LOW HIGH needs 0 <= LOW <= HIGH, got {args.calls}")
    seeds = range(3 if args.quick else args.seeds)
    if args.quick:
        args.repeats = 1

    arms = {
        "independent": BranchingConfig(initial_rollouts=args.total, total_rollouts=args.total, beam=args.beam),
        "branching": BranchingConfig(initial_rollouts=args.initial, total_rollouts=args.total, beam=args.beam),
    }
    tokenizer = build_tiny_tokenizer()
    pool = TextPool(tokenizer)
    config = trainer_config(max_turns=args.calls[1] + 1)
    asyncio.run(rollout_prompt(config, tokenizer, pool, arms["branching"], -1, args))  # warm-up
    runs = {arm: [repeated_rollout(config, tokenizer, pool, branching, seed, args) for seed in seeds]
            for arm, branching in arms.items()}
    summary = summarize(runs)
    print(f"{args.total} trajectories per prompt; branching: initial {args.initial}, beam {args.beam}, "
          f"p {defaults.branch_probability}, entropy weight {defaults.entropy_weight}; independent: initial "
          f"{args.total}; {len(seeds)} seeds; {args.calls[0]}-{args.calls[1]} tool calls per trajectory, prompt "
          f"~{args.prompt_tokens}, actions {ACTION_TOKENS[0]}-{ACTION_TOKENS[1]}, observations "
          f"{OBSERVATION_TOKENS[0]}-{OBSERVATION_TOKENS[1]} tokens")
    print_table(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "arms": {arm: dataclasses.asdict(branching) for arm, branching in arms.items()},
        "calls": args.calls, "prompt_tokens": args.prompt_tokens, "runs": runs, "summary": summary,
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
