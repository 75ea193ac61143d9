"""Tokens encoded per batch, and actor forward+backward time, for two training layouts of the same rollouts.

    python benchmarks/bench_layout.py                         # token counts for 2..8 steps + timing at 5 steps
    python benchmarks/bench_layout.py --time-steps 3 5 8 --batch 8

- **one row per trajectory** (ours): the step-segment layout; every token is encoded once.
- **one row per step** (the reference StepPO code): row k re-renders the whole context before step k
  as its prompt and trains on action k, so the context is encoded again for every step.

Rollouts are shaped like HotpotQA search episodes: a prompt of ~300 tokens, then per step an action
of 30-120 tokens and, after every step but the last, a retrieval observation of 200-600 tokens.
Timing uses a randomly initialised Qwen2-shaped model (``--hidden``/``--layers``) on CPU, forward and
backward of a causal-LM loss over the tokens each layout trains on, rows padded to the longest row
of their micro-batch. Writes ``benchmarks/results/layout.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def episode_lengths(steps: int, rng: random.Random) -> tuple[int, list[int], list[int]]:
    """(prompt tokens, action tokens per step, observation tokens after each step)."""
    prompt = rng.randint(250, 350)
    actions = [rng.randint(30, 120) for _ in range(steps)]
    observations = [rng.randint(200, 600) for _ in range(steps - 1)] + [0]
    return prompt, actions, observations


def rows_per_trajectory(prompt: int, actions: list[int], observations: list[int]) -> list[int]:
    return [prompt + sum(actions) + sum(observations)]


def rows_per_step(prompt: int, actions: list[int], observations: list[int]) -> list[int]:
    rows, context = [], prompt
    for action, observation in zip(actions, observations):
        rows.append(context + action)
        context += action + observation
    return rows


LAYOUTS = {"one row per trajectory (ours)": rows_per_trajectory, "one row per step (reference)": rows_per_step}


def token_counts(steps: int, batch: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    episodes = [episode_lengths(steps, rng) for _ in range(batch)]
    return {name: sum(sum(layout(*e)) for e in episodes) for name, layout in LAYOUTS.items()}


def forward_backward_seconds(model, row_lengths: list[int], micro_batch: int, repeats: int) -> float:
    """Median wall time of forward+backward over all rows, ``micro_batch`` rows at a time, on the model's device."""
    vocab, device = model.config.vocab_size, model.device
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(row_lengths), micro_batch):
            chunk = row_lengths[i : i + micro_batch]
            ids = torch.randint(0, vocab, (len(chunk), max(chunk)), device=device)
            lengths = torch.tensor(chunk, device=device)
            mask = (torch.arange(max(chunk), device=device)[None, :] < lengths[:, None]).long()
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            loss.backward()
        if device.type == "cuda":  # kernels run asynchronously: wait for them before reading the clock
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256, help="trajectories per batch for token counts")
    parser.add_argument("--time-steps", type=int, nargs="+", default=[5], help="steps per episode to time")
    parser.add_argument("--time-batch", type=int, default=4, help="trajectories per timed batch")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "layout.json")
    args = parser.parse_args()

    ours, ref = LAYOUTS
    print(f"tokens encoded per batch of {args.batch} trajectories (actor; the critic and reference model the same)")
    print(f"{'steps':>5s} {'ours':>12s} {'per-step rows':>14s} {'ours / per-step':>16s}")
    counts = {}
    for steps in range(2, 9):
        count = token_counts(steps, args.batch, args.seed)
        counts[steps] = count
        print(f"{steps:5d} {count[ours]:12,d} {count[ref]:14,d} {count[ours] / count[ref]:16.2f}")

    torch.manual_seed(args.seed)
    config = Qwen2Config(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 4,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=8192,
                         attn_implementation="sdpa")
    model = Qwen2ForCausalLM(config)
    timings = {}
    print(f"\nforward+backward on CPU, Qwen2-shaped model (hidden {args.hidden}, {args.layers} layers), "
          f"{args.time_batch} trajectories")
    print(f"{'steps':>5s} {'ours s':>9s} {'per-step s':>11s} {'per-step / ours':>16s}")
    for steps in args.time_steps:
        rng = random.Random(args.seed)
        episodes = [episode_lengths(steps, rng) for _ in range(args.time_batch)]
        seconds = {
            name: forward_backward_seconds(
                model, [r for e in episodes for r in layout(*e)], args.micro_batch, args.repeats
            )
            for name, layout in LAYOUTS.items()
        }
        timings[steps] = seconds
        print(f"{steps:5d} {seconds[ours]:9.2f} {seconds[ref]:11.2f} {seconds[ref] / seconds[ours]:16.2f}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"token_counts": counts, "forward_backward_s": timings,
                                    "model": {"hidden": args.hidden, "layers": args.layers}}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
