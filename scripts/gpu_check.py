"""One-shot GPU check: CUDA parity, large-batch time and the actor's two layouts, written as JSON.

    bash scripts/gpu_check.sh --out gpu_check.json               # on the GPU machine, <= 8 minutes on an H200
    bash scripts/gpu_check.sh --device cpu --small --out x.json  # seconds, anywhere (the test runs this)

Sections, each with a time budget (checked before every case; a case that would start past its
section's budget is recorded as skipped, so the whole run stays under ~8 minutes by construction):

(a) parity: ``compute_steppo_advantage``, ``compute_gigpo_advantage`` and the step policy loss
    (``compute_policy_loss_steppo``, ``compute_policy_loss_steppo_step_mean``: loss and gradient)
    on ``--device`` against CPU, in float64 and float32, on random ragged multi-turn batches
    (empty rows, adjacent steps, rewards on observation tokens, bootstrap values, repeated anchor
    states). Max abs difference against a tolerance per dtype; the run exits 1 if any case fails.
(b) time: the estimators and the loss (forward+backward) on 1,024 x 8 steps x 4,096 tokens and
    4,096 x 16 x 8,192 (skipped with the reason if memory runs out), median of a few repeats,
    ``torch.cuda.synchronize`` around each call; extra peak CUDA memory per call.
(c) actor: forward+backward of a randomly initialised Qwen2 model shaped like Qwen2.5-0.5B (bf16 on
    CUDA) over the same synthetic HotpotQA-shaped rollouts laid out one row per trajectory (ours)
    and one row per step (the reference code's), using ``benchmarks/bench_layout.py``'s rollout
    shapes and timing loop: tokens, seconds and peak memory per layout.

The GPU machine has torch and transformers but no verl, and our modules import verl names at
import time. ``scripts/verl_stand_in.py`` installs, in this process only, a stand-in ``verl``
whose registration decorators return the function unchanged; verl's run-time helpers our code calls
(``masked_whiten``, ``masked_mean``, ``agg_loss``) are executed from verl's own source file, found on
disk (``--verl-src``, default: the repository's ``.venv`` or any ``verl`` directory on ``sys.path``),
never re-implemented. Carry ``.venv/lib/python3.11/site-packages/verl`` to the device for it.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import verl_stand_in

REPO = Path(__file__).resolve().parents[1]

FLOAT_INPUTS = ("token_level_rewards", "values", "bootstrap_values", "old_log_prob", "log_prob", "advantages")
# Max abs difference allowed between the device and CPU. float32: reductions run in another order
# on the device (atomic index_add_, tree sums), which moves results by a few ulp of the inputs' scale.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


@dataclass
class Sizes:
    """Everything ``--small`` changes."""

    parity: tuple[int, int, int]  # (trajectories, max steps, tokens) per random batch
    parity_seeds: int
    timing: list[tuple[int, int, int]]
    timing_repeats: int
    actor: dict[str, Any]  # Qwen2Config sizes
    actor_steps: list[int]
    actor_batch: int
    actor_micro_batch: int
    actor_repeats: int
    # 440 s in all; a case starts only inside its section's budget, and no single case at the full
    # sizes is expected past ~1 minute on an H200, which keeps the run under 8 minutes.
    budgets_s: dict[str, float] = field(default_factory=lambda: {"parity": 60.0, "timing": 200.0, "actor": 180.0})


QWEN25_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True)
FULL = Sizes(parity=(128, 8, 512), parity_seeds=3, timing=[(1024, 8, 4096), (4096, 16, 8192)], timing_repeats=5,
             actor=QWEN25_05B, actor_steps=[5, 8], actor_batch=16, actor_micro_batch=4, actor_repeats=3)
SMALL = Sizes(parity=(24, 5, 64), parity_seeds=2, timing=[(16, 4, 128), (32, 8, 256)], timing_repeats=3,
              actor=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=128, vocab_size=512),
              actor_steps=[2], actor_batch=2, actor_micro_batch=2, actor_repeats=1)


# ----------------------------------------------------------------------------- synthetic batches


def synthetic_batch(batch: int, max_steps: int, length: int, seed: int, ragged: bool, group: int = 8) -> dict:
    """Multi-turn rows on CPU: per step an observation lead-in, an action, then padding to the segment.

    Row ``b`` has ``max_steps`` steps (``ragged``: 0..``max_steps``), step k in tokens
    ``[k * S, (k + 1) * S)`` with ``S = length // max_steps``: 0..S/4 observation tokens, then 1..S/2
    action tokens (so steps may touch), then observation. Outcome reward 0/1 on the last action token,
    sparse Gaussian tool rewards anywhere (observation tokens included), bootstrap value for half the rows.

    Returns:
        ``token_level_rewards``, ``values``, ``old_log_prob``, ``log_prob``, ``advantages`` ``[B, L]``
        float32; ``response_mask``, ``step_ids`` ``[B, L]`` int64; ``bootstrap_values`` ``[B]``;
        ``step_keys`` ``[B, K]`` int64 anchor states (3 per step index, so groups repeat);
        ``index`` ``[B]`` prompt uids, ``group`` rows each.
    """
    segment = length // max_steps
    if segment < 4:
        raise ValueError(f"length {length} leaves {segment} tokens per step for {max_steps} steps; need >= 4")
    gen = torch.Generator().manual_seed(seed)
    low = 0 if ragged else max_steps
    num_steps = torch.randint(low, max_steps + 1, (batch,), generator=gen)
    lead = torch.randint(0, segment // 4 + 1, (batch, max_steps), generator=gen)
    action = torch.randint(1, segment // 2 + 1, (batch, max_steps), generator=gen)
    position = torch.arange(length)
    seg = (position // segment).clamp(max=max_steps - 1)
    offset = (position - seg * segment)[None, :]
    start = lead[:, seg]  # [B, L] first action token of each position's segment, as an offset
    in_action = (offset >= start) & (offset < start + action[:, seg]) & (seg[None, :] < num_steps[:, None])

    rewards = torch.where(torch.rand(batch, length, generator=gen) < 1.0 / segment,
                          0.5 * torch.randn(batch, length, generator=gen), torch.zeros(()))
    last_action = (in_action * (position + 1)).amax(dim=1) - 1  # -1: a row without steps
    has_steps = last_action >= 0
    outcome = torch.randint(0, 2, (batch,), generator=gen).float()
    rewards[has_steps, last_action[has_steps]] += outcome[has_steps]
    old_log_prob = -2.0 * torch.rand(batch, length, generator=gen)
    truncated = torch.rand(batch, generator=gen) < 0.5
    return {
        "token_level_rewards": rewards,
        "values": torch.randn(batch, length, generator=gen),
        "response_mask": in_action.long(),
        "step_ids": torch.where(in_action, seg[None, :], -1),
        "bootstrap_values": torch.where(truncated, torch.randn(batch, generator=gen), 0.0),
        "step_keys": torch.randint(0, 3, (batch, max_steps), generator=gen),
        "index": np.array([f"prompt{b // group}" for b in range(batch)], dtype=object),
        "old_log_prob": old_log_prob,
        "log_prob": old_log_prob + 0.2 * torch.randn(batch, length, generator=gen),
        "advantages": torch.randn(batch, length, generator=gen),
    }


def on_device(data: dict, device: str, dtype: torch.dtype) -> dict:
    """Tensors moved to ``device``, float inputs cast to ``dtype``; ``log_prob`` a fresh leaf with a grad."""
    out = {}
    for name, value in data.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device=device, dtype=dtype if name in FLOAT_INPUTS else value.dtype)
        out[name] = value
    out["log_prob"] = out["log_prob"].detach().requires_grad_(True)
    return out


# ----------------------------------------------------------------------------- the cases


@dataclass
class ActorClipConfig:
    """The fields of verl's ``ActorConfig`` the step loss reads (verl's defaults, DAPO's higher clip)."""

    clip_ratio: float = 0.2
    clip_ratio_low: float | None = None
    clip_ratio_high: float | None = 0.28
    clip_ratio_c: float = 3.0
    global_batch_info: dict = field(default_factory=dict)  # one rank: agg_loss's defaults

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name, default)


def cases(ours: dict[str, Callable]) -> dict[str, Callable[[dict], tuple[torch.Tensor, ...]]]:
    """Name -> call on a batch from :func:`on_device`, returning the tensors to compare."""
    config = ActorClipConfig()

    def loss_and_grad(loss_fn: Callable) -> Callable[[dict], tuple[torch.Tensor, ...]]:
        def run(d: dict) -> tuple[torch.Tensor, ...]:
            loss, _ = loss_fn(d["old_log_prob"], d["log_prob"], d["advantages"], d["response_mask"],
                              loss_agg_mode="token-mean", config=config, step_ids=d["step_ids"])
            (grad,) = torch.autograd.grad(loss, d["log_prob"])
            return loss.detach(), grad

        return run

    return {
        "steppo (step_ids, whitened)": lambda d: ours["steppo"](
            d["token_level_rewards"], d["values"], d["response_mask"], step_ids=d["step_ids"],
            gamma=0.99, lam=0.95, bootstrap_values=d["bootstrap_values"]),
        "steppo (steps from mask)": lambda d: ours["steppo"](
            d["token_level_rewards"], d["values"], d["response_mask"], gamma=0.99, lam=0.95, whiten=False),
        "gigpo (step_keys)": lambda d: ours["gigpo"](
            d["token_level_rewards"], d["response_mask"], d["index"], step_ids=d["step_ids"],
            step_keys=d["step_keys"], gamma=0.95),
        "loss steppo (loss, grad)": loss_and_grad(ours["loss"]),
        "loss steppo_step_mean (loss, grad)": loss_and_grad(ours["loss_step_mean"]),
    }


def import_ours() -> dict[str, Callable]:
    """Our functions under test; call after ``verl_stand_in.install``."""
    from steppo_verl.advantage import compute_gigpo_advantage, compute_steppo_advantage
    from steppo_verl.loss import compute_policy_loss_steppo, compute_policy_loss_steppo_step_mean

    return {"steppo": compute_steppo_advantage, "gigpo": compute_gigpo_advantage,
            "loss": compute_policy_loss_steppo, "loss_step_mean": compute_policy_loss_steppo_step_mean}


# ----------------------------------------------------------------------------- sections


class Budget:
    """Seconds left to a section; ``spent()`` is checked before each case starts."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def spent(self) -> bool:
        return self.elapsed() > self.seconds


def max_abs_diff(device_out: tuple[torch.Tensor, ...], cpu_out: tuple[torch.Tensor, ...]) -> float:
    return max((d.detach().cpu().double() - c.detach().double()).abs().max().item() if d.numel() else 0.0
               for d, c in zip(device_out, cpu_out, strict=True))


def parity_section(calls: dict, sizes: Sizes, device: str) -> dict:
    """(a) Each case on ``device`` and on CPU from the same inputs, per dtype and seed."""
    budget, results = Budget(sizes.budgets_s["parity"]), []
    batch, max_steps, length = sizes.parity
    for seed in range(sizes.parity_seeds):
        data = synthetic_batch(batch, max_steps, length, seed=seed, ragged=True)
        for dtype, tolerance in TOLERANCE.items():
            for name, call in calls.items():
                record = {"case": name, "dtype": str(dtype).removeprefix("torch."), "seed": seed,
                          "tolerance": tolerance}
                if budget.spent():
                    results.append({**record, "skipped": "parity budget spent"})
                    continue
                diff = max_abs_diff(call(on_device(data, device, dtype)), call(on_device(data, "cpu", dtype)))
                results.append({**record, "max_abs_diff": diff, "passed": diff <= tolerance})
                print(f"  parity {name:36s} {record['dtype']:8s} seed {seed}: max |diff| {diff:.2e} "
                      f"{'ok' if diff <= tolerance else 'FAIL'}  ({budget.elapsed():.1f} s)")
    checked = [r for r in results if "passed" in r]
    return {"cases": results, "passed": bool(checked) and all(r["passed"] for r in checked),
            "elapsed_s": budget.elapsed()}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(call: Callable[[], Any], device: str, repeats: int) -> dict:
    """Median seconds of ``call`` after a warm-up, and its extra peak CUDA memory (MiB; None on CPU)."""
    call()
    synchronize(device)
    is_cuda = device.startswith("cuda")
    if is_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if is_cuda else 0
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20 if is_cuda else None
    return {"median_s": statistics.median(times), "repeats": repeats, "extra_peak_mib": peak}


def timing_section(calls: dict, sizes: Sizes, device: str) -> dict:
    """(b) Each case on one full-step float32 batch per size (the tensor layout verl hands us)."""
    budget, results = Budget(sizes.budgets_s["timing"]), []
    for batch, steps, length in sizes.timing:
        record: dict[str, Any] = {"batch": batch, "steps": steps, "length": length, "tokens": batch * length}
        if budget.spent():
            results.append({**record, "skipped": "timing budget spent"})
            continue
        try:
            data = on_device(synthetic_batch(batch, steps, length, seed=0, ragged=False), device, torch.float32)
            record["cases"] = {}
            for name, call in calls.items():
                if budget.spent():
                    record["cases"][name] = {"skipped": "timing budget spent"}
                    continue
                record["cases"][name] = timed(lambda: call(data), device, sizes.timing_repeats)
                print(f"  time {batch} x {steps} x {length} {name:36s} "
                      f"{record['cases'][name]['median_s']:.4f} s  ({budget.elapsed():.1f} s)")
        except torch.cuda.OutOfMemoryError as error:  # the largest size "if memory allows"
            record["skipped"] = f"out of memory: {str(error).splitlines()[0]}"
            print(f"  time {batch} x {steps} x {length}: {record['skipped']}")
        finally:
            data = None
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        results.append(record)
    return {"sizes": results, "elapsed_s": budget.elapsed()}


def actor_section(sizes: Sizes, device: str, seed: int = 0) -> dict:
    """(c) Actor forward+backward over both layouts of the same rollouts, per episode length."""
    from bench_layout import LAYOUTS, episode_lengths, forward_backward_seconds
    from transformers import Qwen2Config, Qwen2ForCausalLM

    budget = Budget(sizes.budgets_s["actor"])
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32  # bf16 matmuls are slow on CPU
    torch.manual_seed(seed)
    config = Qwen2Config(**sizes.actor, max_position_embeddings=32768, attn_implementation="sdpa")
    model = Qwen2ForCausalLM(config).to(device=device, dtype=dtype)
    results: dict[str, Any] = {
        "model": {**sizes.actor, "dtype": str(dtype).removeprefix("torch."),
                  "parameters": sum(p.numel() for p in model.parameters())},
        "trajectories": sizes.actor_batch, "micro_batch": sizes.actor_micro_batch, "steps": {},
    }
    for steps in sizes.actor_steps:
        rng = random.Random(seed)
        episodes = [episode_lengths(steps, rng) for _ in range(sizes.actor_batch)]
        per_layout = {}
        for name, layout in LAYOUTS.items():
            if budget.spent():
                per_layout[name] = {"skipped": "actor budget spent"}
                continue
            rows = [r for e in episodes for r in layout(*e)]
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats(device)
            seconds = forward_backward_seconds(model, rows, sizes.actor_micro_batch, sizes.actor_repeats)
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.startswith("cuda") else None
            per_layout[name] = {"rows": len(rows), "tokens": sum(rows), "longest_row": max(rows),
                                "median_s": seconds, "peak_mib": peak}
            print(f"  actor {steps} steps, {name:30s} {sum(rows):8,d} tokens {seconds:8.3f} s  "
                  f"({budget.elapsed():.1f} s)")
        results["steps"][steps] = per_layout
    results["elapsed_s"] = budget.elapsed()
    return results


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="device compared against CPU")
    parser.add_argument("--small", action="store_true", help="tiny sizes: seconds on CPU")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON results")
    parser.add_argument("--verl-src", type=Path, default=None,
                        help="verl's package directory, for masked_whiten/masked_mean/agg_loss (default: searched)")
    return parser.parse_args(argv)


def environment(device: str) -> dict:
    import transformers

    name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor()
    return {"device": device, "device_name": name, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device here; use --device cpu for a CPU-only run")
    verl_src = args.verl_src or verl_stand_in.find_verl_source(verl_stand_in.default_candidates(REPO))
    if verl_src is None or verl_stand_in.find_verl_source([verl_src]) is None:
        sys.exit(f"verl's source (verl/{verl_stand_in.TORCH_FUNCTIONAL[0]}, verl/{verl_stand_in.CORE_ALGOS[0]}) "
                 f"not found{f' under {verl_src}' if verl_src else ''}; pass --verl-src DIR (the verl package "
                 "directory) or carry .venv/lib/python3.11/site-packages/verl to this machine")
    start = time.perf_counter()
    report: dict[str, Any] = {"small": args.small, **environment(args.device),
                              "verl_stand_in": verl_stand_in.install(verl_src)}
    sizes, calls = SMALL if args.small else FULL, cases(import_ours())
    for section, run in (("parity", lambda: parity_section(calls, sizes, args.device)),
                         ("timing", lambda: timing_section(calls, sizes, args.device)),
                         ("actor", lambda: actor_section(sizes, args.device))):
        print(f"({section}) budget {sizes.budgets_s[section]:.0f} s, {time.perf_counter() - start:.1f} s elapsed")
        report[section] = run()
    report["elapsed_s"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"parity {'passed' if report['parity']['passed'] else 'FAILED'}; {report['elapsed_s']:.1f} s; "
          f"wrote {args.out}")
    return 0 if report["parity"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
