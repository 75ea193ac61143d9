"""Evaluate a policy on multi-hop QA datasets, each searched in its own corpus.

Usage::

    python -m steppo_verl.tasks.qa.evaluate --model MODEL_DIR --out OUT_DIR \\
        --dataset hotpotqa=data/hotpotqa/validation.parquet:data/hotpotqa/bm25_index \\
        --dataset 2wikimultihopqa=data/2wiki/validation.parquet:http://127.0.0.1:8001 \\
        [--platform cpu|gpu] [--dry-run] [hydra overrides ...]

Each ``--dataset NAME=PARQUET:INDEX`` names a data source, its prepared parquet (``steppo_verl.tasks.qa.prepare``;
every row's ``data_source`` must be NAME) and its corpus: a saved BM25 index directory or a Search-R1 server
URL. One run holds them all: the search tool maps data sources to indexes (``SearchToolConfig.indexes``) and
each sample tells the tool its data source through verl's per-sample tool kwargs, which this command adds to
the rows it copies into ``OUT_DIR/eval.parquet`` (``extra_info.tools_kwargs.search.create_kwargs``).

The run is verl's own validation path through ``python -m steppo_verl.main`` (``trainer.val_only=true``: the
trainer starts, validates once and stops; vLLM on GPU, the ``hf`` rollout on CPU, greedy by verl's
``rollout.val_kwargs``). The reward function of the run is :func:`score_sample`: the QA reward's own scorer
(:func:`steppo_verl.tasks.qa.reward.compute_score`, the policy's last answer, SQuAD-normalised EM and F1) plus
what the table needs; verl dumps it per sample (``trainer.validation_data_dir``). From that dump this command
writes ``OUT_DIR/results.json`` and ``OUT_DIR/results.md``: per dataset, the questions, the samples scored, EM,
F1, and the mean number of policy steps and of searches per sample (the forced first search of the question
included when the agent loop does one), and ``OUT_DIR/samples.jsonl`` with each sample's record.
``--dry-run`` checks the datasets, writes the run's data and tool config and prints the command instead.
Hydra overrides of the validation files or the tool config are refused (:func:`check_overrides`): data that
bypassed ``--dataset`` would have no index. The run builds no critic: validation computes no advantage.

``--model`` is a Hugging Face model directory or hub name; a verl checkpoint is first merged into one with
``python -m verl.model_merger merge --backend fsdp --local_dir CKPT/actor --target_dir MODEL_DIR``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from steppo_verl.tasks.qa.reward import compute_score
from steppo_verl.tasks.qa.tool import SEARCHED_INDEXES, is_server_url
from steppo_verl.transcript import policy_answer

SEARCH_TOOL = "search"  # the tool's name in search_tool.yaml, under which verl looks up its kwargs
PLATFORMS = ("cpu", "gpu")
# Set by this command so that every sample reaches its own index: data given here in their place would
# reach the search tool without a data source it has an index for, and every search of it would fail.
ROUTING_KEYS = ("data.val_files", "actor_rollout_ref.rollout.multi_turn.tool_config_path")


@dataclass(frozen=True)
class EvalDataset:
    """One dataset of the run: its data source name, prepared parquet and corpus (index dir or server URL)."""

    name: str
    parquet: Path
    index: str


def parse_dataset(spec: str) -> EvalDataset:
    """``NAME=PARQUET:INDEX`` (split at the first ``=`` and the first ``:`` after it) as an :class:`EvalDataset`."""
    name, equals, rest = spec.partition("=")
    parquet, colon, index = rest.partition(":")
    if not (equals and colon and name and parquet and index):
        raise ValueError(f"--dataset {spec!r}: expected NAME=PARQUET:INDEX_DIR_OR_URL")
    return EvalDataset(name=name, parquet=Path(parquet), index=index)


def check_datasets(datasets: Sequence[EvalDataset]) -> None:
    """Refuse, before anything starts, a dataset that could not be searched in its own corpus."""
    from steppo_verl.tasks.qa.retrieval import BM25Index

    if not datasets:
        raise ValueError("give at least one --dataset NAME=PARQUET:INDEX")
    names = [dataset.name for dataset in datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"--dataset names must differ (each names the data source of one index), got {names}")
    for dataset in datasets:
        if not dataset.parquet.is_file():
            raise ValueError(f"dataset {dataset.name}: {dataset.parquet} is not a file")
        if not is_server_url(dataset.index) and not BM25Index.is_saved(dataset.index):
            raise ValueError(
                f"dataset {dataset.name}: {dataset.index} holds no BM25 index and is no http(s) URL; build one with "
                "python -m steppo_verl.tasks.qa.retrieval.server --corpus CORPUS.jsonl --index DIR --build-only"
            )


def check_overrides(overrides: Sequence[str]) -> None:
    """Refuse hydra overrides of :data:`ROUTING_KEYS`: data must come as ``--dataset`` with its index."""
    for override in overrides:
        key = override.partition("=")[0].lstrip("+~")
        if key in ROUTING_KEYS:
            raise ValueError(
                f"{override!r}: this command sets {key} so that each dataset is searched in its own index; give "
                "each dataset as --dataset NAME=PARQUET:INDEX instead"
            )


def write_eval_parquet(datasets: Sequence[EvalDataset], path: Path) -> dict[str, int]:
    """All datasets' rows in one parquet, each telling the search tool its data source; rows per dataset.

    One file, not one per dataset: verl concatenates its validation files, which needs identical columns,
    and the datasets' ``extra_info`` differ (HotpotQA has a ``level``, 2Wiki and MuSiQue do not); one table
    holds the union. Every row's ``data_source`` must be its dataset's name: a row from another source would
    be searched in a corpus not its own (ValueError naming the sources found).
    """
    import pandas as pd

    frames = [_routed_rows(dataset, pd.read_parquet(dataset.parquet)) for dataset in datasets]
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.concat(frames, ignore_index=True).to_parquet(path)
    return {dataset.name: len(frame) for dataset, frame in zip(datasets, frames, strict=True)}


def _routed_rows(dataset: EvalDataset, frame: Any) -> Any:
    """``frame`` with ``extra_info.tools_kwargs.search.create_kwargs.data_source`` set, checked to be one source."""
    if "data_source" not in frame.columns:
        raise ValueError(f"dataset {dataset.name}: {dataset.parquet} has no data_source column")
    sources = sorted(set(map(str, frame["data_source"])))
    if sources != [dataset.name]:
        raise ValueError(
            f"dataset {dataset.name}: {dataset.parquet} has samples of data source(s) {sources}, but its index "
            f"serves {dataset.name!r}; name each dataset after its rows' data_source"
        )
    route = {SEARCH_TOOL: {"create_kwargs": {"data_source": dataset.name}}}
    infos = frame["extra_info"] if "extra_info" in frame.columns else [None] * len(frame)
    frame["extra_info"] = [{**_as_dict(info), "tools_kwargs": route} for info in infos]
    return frame


def _as_dict(info: Any) -> dict[str, Any]:
    return dict(info) if isinstance(info, dict) else {}


def write_tool_config(datasets: Sequence[EvalDataset], path: Path) -> None:
    """The shipped search tool yaml with this run's index map in place of its single index."""
    from omegaconf import OmegaConf

    tools = OmegaConf.load(str(files("steppo_verl").joinpath("tasks", "qa", "search_tool.yaml")))
    tool = tools.tools[0]
    # Not read with indexes; replaces the shipped ${oc.env:...} so that the workers' environment plays no part.
    tool.config.backend = "embedded"
    tool.config.index_dir = tool.config.url = tool.config.corpus = None
    tool.config.indexes = {
        dataset.name: dataset.index if is_server_url(dataset.index) else str(Path(dataset.index).resolve())
        for dataset in datasets
    }
    OmegaConf.save(tools, path)


def eval_overrides(model: str, platform: str, parquet: Path, tool_config: Path, out: Path) -> list[str]:
    """The hydra overrides of ``steppo_verl.main`` that make it one validation pass of ``model`` over ``parquet``."""
    agent_loop_config = files("steppo_verl").joinpath("config", "agent_loop.yaml")
    platform_overrides = ["+platform=cpu"] if platform == "cpu" else ["actor_rollout_ref.rollout.name=vllm"]
    return [
        *platform_overrides,
        f"actor_rollout_ref.model.path={model}",
        "critic.enable=false",  # validation computes no advantage; a critic would only take memory
        f"data.train_files='{parquet}'",  # verl's trainer needs training data even when it only validates
        f"data.val_files='{parquet}'",
        f"actor_rollout_ref.rollout.multi_turn.tool_config_path={tool_config}",
        f"actor_rollout_ref.rollout.agent.agent_loop_config_path={agent_loop_config}",
        "reward.custom_reward_function.path=pkg://steppo_verl.tasks.qa.evaluate",
        "reward.custom_reward_function.name=score_sample",
        "trainer.val_only=true",
        "trainer.val_before_train=true",
        "trainer.resume_mode=disable",
        "trainer.total_training_steps=1",
        "trainer.steppo_dump.every_n_steps=0",
        f"trainer.validation_data_dir={out / 'generations'}",
        f"trainer.default_local_dir={out / 'checkpoints'}",
        "trainer.logger=[console]",
        f"hydra.run.dir={out / 'hydra'}",
    ]


def score_sample(
    data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None, **kwargs: Any
) -> dict[str, Any]:
    """verl's reward function for an evaluation run: the QA reward's scores plus the sample's record.

    Returns ``score``/``em``/``f1`` from :func:`steppo_verl.tasks.qa.reward.compute_score` (EM is the score), and
    ``data_source``, ``question_id``, ``answer`` (the policy's last answer, "" without one), ``num_steps``
    (policy steps, from the step agent loop), ``num_searches`` and ``searched_indexes`` (a JSON list of the
    index each search used, as the search tool recorded it). Text fields are strings, which verl's validation
    metrics skip (a list would break their averaging); the counts become per-data-source ``val-aux`` metrics.
    Every sample has every key, as verl requires.
    """
    info = extra_info or {}
    searched = [str(location) for location in info.get(SEARCHED_INDEXES) or []]
    return {
        **compute_score(data_source, solution_str, ground_truth, extra_info),
        "data_source": str(data_source),
        "question_id": str(info.get("question_id", "")),
        "answer": policy_answer(solution_str, extra_info) or "",
        "num_steps": int(info.get("num_steps", 0)),
        "num_searches": len(searched),
        SEARCHED_INDEXES: json.dumps(searched),
    }


def read_samples(generations_dir: Path) -> list[dict[str, Any]]:
    """The per-sample records of verl's validation dump (one ``STEP.jsonl``), searched indexes as lists."""
    dumps = sorted(generations_dir.glob("*.jsonl"))
    if len(dumps) != 1:
        raise RuntimeError(f"expected one validation dump in {generations_dir}, found {[p.name for p in dumps]}")
    samples = [json.loads(line) for line in dumps[0].read_text(encoding="utf-8").splitlines() if line.strip()]
    for sample in samples:
        sample[SEARCHED_INDEXES] = json.loads(sample[SEARCHED_INDEXES])
    return samples


def results_table(samples: Sequence[dict[str, Any]], questions: dict[str, int]) -> dict[str, dict[str, float]]:
    """Per dataset (in ``questions``' order): questions, samples scored, mean EM, F1, steps and searches.

    Raises ValueError for a dataset without any scored sample (its EM would be undefined, not 0), and for a
    sample of a data source that is not one of the run's datasets.
    """
    by_source: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for sample in samples:
        if sample["data_source"] not in questions:
            raise ValueError(f"a sample of data source {sample['data_source']!r}, which no --dataset names")
        by_source[sample["data_source"]].append(sample)
    table = {}
    for name, count in questions.items():
        rows = by_source.get(name)
        if not rows:
            raise ValueError(f"dataset {name}: no sample was scored; see the run's log")
        table[name] = {
            "questions": count,
            "samples": len(rows),
            **{column: _mean(rows, key) for column, key in _MEAN_COLUMNS.items()},
        }
    return table


# results column -> per-sample key
_MEAN_COLUMNS = {"em": "em", "f1": "f1", "steps": "num_steps", "searches": "num_searches"}


def _mean(rows: Sequence[dict[str, Any]], key: str) -> float:
    return sum(float(row[key]) for row in rows) / len(rows)


def render_markdown(table: dict[str, dict[str, float]], model: str) -> str:
    """The results as a markdown table: EM and F1 in percent, steps and searches as means per sample."""
    lines = [
        f"Model: `{model}`",
        "",
        "| dataset | questions | samples | EM (%) | F1 (%) | steps | searches |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in table.items():
        lines.append(
            f"| {name} | {row['questions']} | {row['samples']} | {100 * row['em']:.2f} | {100 * row['f1']:.2f} "
            f"| {row['steps']:.2f} | {row['searches']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def write_results(samples: Sequence[dict[str, Any]], questions: dict[str, int], model: str, out: Path) -> dict:
    """Write results.json, results.md and samples.jsonl under ``out``; returns the results."""
    table = results_table(samples, questions)
    results = {"model": model, "datasets": table}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "results.md").write_text(render_markdown(table, model), encoding="utf-8")
    with (out / "samples.jsonl").open("w", encoding="utf-8") as records:
        for sample in samples:
            records.write(json.dumps(_sample_record(sample), ensure_ascii=False) + "\n")
    return results


def _sample_record(sample: dict[str, Any]) -> dict[str, Any]:
    keys = ("data_source", "question_id", "answer", "gts", "em", "f1", "num_steps", "num_searches", SEARCHED_INDEXES)
    return {key: sample.get(key) for key in keys}


def _parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m steppo_verl.tasks.qa.evaluate",
        description="EM/F1, steps and searches of a policy on QA datasets, each searched in its own corpus.",
        epilog="Further arguments are hydra overrides for python -m steppo_verl.main (e.g. trainer.n_gpus_per_node=8).",
    )
    parser.add_argument("--model", required=True, help="Hugging Face model directory or hub name")
    parser.add_argument(
        "--dataset",
        dest="datasets",
        action="append",
        required=True,
        metavar="NAME=PARQUET:INDEX",
        help="data source NAME, its prepared parquet, and its BM25 index directory or retrieval server URL; repeat",
    )
    parser.add_argument("--out", required=True, type=Path, help="directory for the results (must hold no earlier run)")
    parser.add_argument("--platform", choices=PLATFORMS, default="gpu", help="gpu: vLLM rollout; cpu: +platform=cpu")
    parser.add_argument(
        "--dry-run", action="store_true", help="check and write the run's data and tool config, print the command"
    )
    args, overrides = parser.parse_known_args(argv)
    options = [arg for arg in overrides if arg.startswith("-")]
    if options:  # hydra would refuse them only after the run's data is written
        parser.error(f"unknown option(s) {options}; hydra overrides are written KEY=VALUE")
    return args, overrides


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; bad arguments exit 2 with a one-line error, a failed run exits with its status."""
    args, overrides = _parse_args(argv)
    out = args.out.resolve()
    try:
        datasets = [parse_dataset(spec) for spec in args.datasets]
        check_datasets(datasets)
        check_overrides(overrides)
        if (out / "generations").exists():
            raise ValueError(f"{out} already holds an evaluation run; choose a new --out")
        questions = write_eval_parquet(datasets, out / "eval.parquet")
        write_tool_config(datasets, out / "search_tool.yaml")
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    overrides = [*eval_overrides(args.model, args.platform, out / "eval.parquet", out / "search_tool.yaml", out),
                 *overrides]
    command = [sys.executable, "-m", "steppo_verl.main", *overrides]
    if args.dry_run:
        print(shlex.join(command))
        return 0
    run = subprocess.run(command, check=False)
    if run.returncode != 0:
        print(f"error: the evaluation run failed (exit status {run.returncode})", file=sys.stderr)
        return run.returncode
    results = write_results(read_samples(out / "generations"), questions, args.model, out)
    print(render_markdown(results["datasets"], args.model))
    print(f"results: {out / 'results.json'}, {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
