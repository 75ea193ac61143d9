"""Step-level trajectory inspection on real agent-loop output: records, writer, HTML report, browser.

Trajectories come from the step-aware agent loop (scripted server, tiny tokenizer, test search
tool; see test_agent_loop.py), are padded into a batch as verl pads them, and get advantages from
the StepPO estimator with random critic values. Expected numbers are read straight from the token
lists, independently of the protocol helpers the records are built with.

The browser test drives Debian's headless chromium (``scripts/install_chromium.sh`` installs it).
``make_screenshot`` renders the README's picture of the report (``scripts/make_screenshot.sh``).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote

import pytest
import torch
from test_agent_loop import EchoSearch, ScriptedServer, call, run
from verl.tools.schemas import ToolResponse

from steppo_verl.advantage import compute_steppo_advantage
from steppo_verl.dev.tiny_model import build_tiny_tokenizer
from steppo_verl.inspect.records import (
    RECORDS_DIR,
    DumpConfig,
    TrajectoryBatch,
    dump_step_records,
    read_step_records,
    rows_to_dump,
    step_ratios,
    step_records,
    write_step_records,
)
from steppo_verl.inspect.report import build_report, render_report, trajectories
from steppo_verl.protocol import locate_steps
from steppo_verl.trainer import bootstrap_values

pytestmark = pytest.mark.timeout(600)

# Model text that would run script if it ever reached the page as markup.
MALICIOUS = "<script>alert(1)</script> </script><img src=x onerror=\"document.title='pwned'\"> I will search."
GAMMA, LAM = 0.9, 0.95
CLIP = 0.2
REPO = Path(__file__).resolve().parents[1]


class PassageSearch(EchoSearch):
    """The test search tool with passage-like answers, for a readable demo report."""

    async def execute(self, instance_id, parameters, **kwargs):
        query = parameters.get("query", "")
        text = f"Doc 1 (Title: {query.title()}) {query.capitalize()} is described in this passage. Doc 2 ..."
        return ToolResponse(text=text), self.reward, {}


# (scripted turns, max assistant turns, outcome score)
SCRIPTS = [
    ([call("capital of France"), call("Paris population"), "<answer>Paris</answer>"], 5, 1.0),
    ([MALICIOUS + call("x"), "<answer>" + MALICIOUS + "</answer>"], 5, 0.0),
    ([call("river"), call("longest river"), call("Nile length")], 2, 0.0),  # cut by the turn limit (bootstrapped)
    (["<answer>Lyon</answer>"], 5, 1.0),
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def run_episodes(tokenizer, scripts=SCRIPTS, tool=EchoSearch):
    """Run each script through the agent loop; ``(output, server)`` per episode, score attached."""
    episodes = []
    for turns, max_turns, score in scripts:
        server = ScriptedServer(tokenizer, turns)
        output = run(tokenizer, server, [tool(reward=0.25)], max_assistant_turns=max_turns,
                     bootstrap_endings=["turn_limit"])  # so that the dumps hold a bootstrapped trajectory
        output.reward_score = score
        episodes.append((output, server))
    return episodes


@pytest.fixture(scope="module")
def episodes(tokenizer):
    return run_episodes(tokenizer)


def _padded(samples, name, pad):
    return torch.nested.as_nested_tensor([s[name] for s in samples], layout=torch.jagged).to_padded_tensor(pad)


def make_batch(outputs, tokenizer, values_from=None, seed=0):
    """Pad agent-loop outputs into a verl-style batch and run the StepPO estimator on it.

    ``values_from(returns, noise) -> values`` (all ``[B, L]``) shapes the critic values from the
    returns under zero values and standard normal noise; the default is the noise itself.
    Returns the :class:`TrajectoryBatch` and the padded reward and value tensors.
    """
    samples = [output.as_dict() for output in outputs]
    generator = torch.Generator().manual_seed(seed)
    mask, step_ids = _padded(samples, "response_mask", 0), _padded(samples, "step_ids", -1)
    rm_scores, env_rewards = _padded(samples, "rm_scores", 0.0), _padded(samples, "env_rewards", 0.0)
    fields = {
        "truncated": torch.stack([s["truncated"] for s in samples]),
        "bootstrap_index": torch.stack([s["bootstrap_index"] for s in samples]),
        "response_length": torch.tensor([len(s["responses"]) for s in samples]),
    }
    rewards = rm_scores + env_rewards

    def estimate(values):
        return compute_steppo_advantage(
            rewards, values, mask, step_ids, gamma=GAMMA, lam=LAM, bootstrap_values=bootstrap_values(values, fields)
        )

    values = torch.randn(mask.shape, generator=generator)
    if values_from is not None:
        values = values_from(estimate(torch.zeros_like(values))[1], values)
    advantages, returns = estimate(values)
    old_log_probs = _padded(samples, "rollout_log_probs", 0.0)
    # Rows drift up, stay, drift down in turn, so that the ratio clip binds on some steps.
    drift = torch.tensor([(0.5, 0.0, -0.5)[b % 3] for b in range(len(samples))])
    batch = TrajectoryBatch(
        responses=_padded(samples, "responses", tokenizer.pad_token_id),
        response_mask=mask,
        token_level_rewards=rm_scores,
        advantages=advantages,
        returns=returns,
        uid=[f"prompt{b}" for b in range(len(samples))],
        step_ids=step_ids,
        env_rewards=env_rewards,
        values=values,
        old_log_probs=old_log_probs,
        log_probs=old_log_probs + drift[:, None] + 0.3 * torch.randn(mask.shape, generator=generator),
        truncated=fields["truncated"],
        ending=[output.extra_fields["ending"] for output in outputs],
        response_length=fields["response_length"],
    )
    return batch, rewards


@pytest.fixture(scope="module")
def batch(episodes, tokenizer):
    return make_batch([output for output, _ in episodes], tokenizer)


@pytest.fixture(scope="module")
def records(batch, tokenizer):
    return step_records(batch[0], tokenizer, training_step=7, config=DumpConfig("unused", clip_ratio_low=CLIP))


# ----------------------------------------------------------------------------- records


def _starts(step_ids: list[int]) -> list[int]:
    return [step_ids.index(k) for k in range(max(step_ids) + 1)]


def test_records_carry_the_estimators_numbers_at_step_starts(episodes, batch, records):
    trajectory_batch, rewards = batch
    assert len(records) == sum(output.extra_fields["num_steps"] for output, _ in episodes)
    by_row = {}
    for record in records:
        row = int(record["trajectory_id"].rsplit("#", 1)[1])
        by_row.setdefault(row, []).append(record)
    for b, (output, _) in enumerate(episodes):
        starts = _starts(output.step_ids)
        rows = by_row[b]
        assert [r["step"] for r in rows] == list(range(len(starts)))
        assert {r["num_steps"] for r in rows} == {output.extra_fields["num_steps"]} == {len(starts)}
        bounds = [0, *starts[1:], len(output.response_ids)]
        for k, (record, start) in enumerate(zip(rows, starts)):
            assert record["trajectory_id"] == f"prompt{b}#{b}" and record["training_step"] == 7
            assert record["advantage"] == pytest.approx(trajectory_batch.advantages[b, start].item(), abs=1e-6)
            assert record["return"] == pytest.approx(trajectory_batch.returns[b, start].item(), abs=1e-6)
            assert record["value"] == pytest.approx(trajectory_batch.values[b, start].item(), abs=1e-6)
            assert record["reward"] == pytest.approx(rewards[b, bounds[k] : bounds[k + 1]].sum().item(), abs=1e-6)
            action = [t for t, step in enumerate(output.step_ids) if step == k]
            log_ratio = (trajectory_batch.log_probs - trajectory_batch.old_log_probs)[b, action].mean().item()
            assert record["ratio"] == pytest.approx(math.exp(log_ratio), rel=1e-5)
            binds = (record["advantage"] > 0 and record["ratio"] > 1 + CLIP) or (
                record["advantage"] < 0 and record["ratio"] < 1 - CLIP
            )
            assert record["clipped"] == binds
        last = rows[-1]
        assert last["truncated"] == output.truncated and last["terminated"] == (not output.truncated)
        assert not any(r["truncated"] or r["terminated"] for r in rows[:-1])
        assert {r["ending"] for r in rows} == {output.extra_fields["ending"]}
    assert 0 < sum(r["clipped"] for r in records) < len(records)
    # The outcome score lands on the last step and every tool call earned its reward on its step.
    assert [r["reward"] for r in by_row[0]] == pytest.approx([0.25, 0.25, 1.0])
    assert [r["env_reward"] for r in by_row[2]] == pytest.approx([0.25, 0.25])


def test_clipped_column_follows_the_whole_step_clip_of_steppo_action_clip():
    # One 4-token step whose tokens moved by exp(0.06) each: geometric mean 1.06 (inside 1.2), product 1.27.
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    old = torch.zeros(1, 5)
    new = torch.full((1, 5), 0.06)
    steps = locate_steps(mask)
    advantage = torch.ones(1, 1, dtype=torch.float64)
    _, geometric = step_ratios(old, new, advantage, steps, 0.2, 0.2)
    _, whole = step_ratios(old, new, advantage, steps, 0.2, 0.2, per_action_clip=True)
    assert geometric.tolist() == [[False]] and whole.tolist() == [[True]]


def test_record_texts_are_what_the_model_generated_and_the_tool_returned(episodes, records, tokenizer):
    rows = iter(records)
    for output, server in episodes:
        for k, generated in enumerate(server.generated):
            record = next(rows)
            assert record["action"] == tokenizer.decode(generated)
            assert record["action_tokens"] == len(generated)
            if k + 1 < len(server.prompts):  # the observation is what the next request added
                observed = server.prompts[k + 1][len(server.prompts[k]) + len(generated) :]
                assert record["observation"] == tokenizer.decode(observed)
    first, malicious, cut = (trajectories(records)[b]["steps"] for b in range(3))
    assert "result for capital of France" in first[0]["observation"] and first[2]["observation"] == ""
    assert malicious[0]["action"].startswith(MALICIOUS)
    # At the turn limit the last call is still answered, then comes the bootstrap (padding) token.
    assert cut[1]["observation"].endswith(tokenizer.pad_token) and "result for longest river" in cut[1]["observation"]


def test_long_observations_are_shortened(batch, tokenizer):
    records = step_records(batch[0], tokenizer, 0, DumpConfig("unused", max_observation_chars=12))
    assert max(len(r["observation"]) for r in records) == 13
    assert all(r["observation"].endswith("…") for r in records if r["observation_tokens"] > 12)


def test_records_without_optional_fields(batch, tokenizer):
    full = batch[0]
    bare = TrajectoryBatch(full.responses, full.response_mask, full.token_level_rewards, full.advantages,
                           full.returns, full.uid)  # plain verl: steps from mask runs, no critic or ratios
    records = step_records(bare, tokenizer, 0, DumpConfig("unused"))
    assert len(records) == len(step_records(full, tokenizer, 0, DumpConfig("unused")))
    assert all(r["value"] is None and r["ratio"] is None and r["ending"] is None for r in records)
    assert all(r["terminated"] == (r["step"] == r["num_steps"] - 1) for r in records)


# ----------------------------------------------------------------------------- writer, dump policy


def test_parquet_and_jsonl_round_trip(records, tmp_path):
    path = write_step_records(records, tmp_path, 7, jsonl=True)
    assert path == tmp_path / RECORDS_DIR / "step_000007.parquet"
    assert read_step_records(tmp_path) == records
    lines = path.with_suffix(".jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == records
    write_step_records(records[:2], tmp_path, 7)  # a rerun of the step replaces its file
    write_step_records(records[2:3], tmp_path, 12)
    assert read_step_records(tmp_path) == records[:3]
    assert sorted(p.name for p in (tmp_path / RECORDS_DIR).iterdir()) == [
        "step_000007.jsonl", "step_000007.parquet", "step_000012.parquet"
    ]  # fmt: skip


def test_dump_frequency_and_size():
    assert rows_to_dump(20, batch_size=8, every_n_steps=10, max_trajectories=3) == [0, 1, 2]
    assert rows_to_dump(21, batch_size=8, every_n_steps=10, max_trajectories=3) == []
    assert rows_to_dump(5, batch_size=2, every_n_steps=5, max_trajectories=64) == [0, 1]
    assert rows_to_dump(5, batch_size=8, every_n_steps=0, max_trajectories=3) == []  # off


def test_dump_writes_the_first_trajectories_only_at_dump_steps(batch, tokenizer, tmp_path):
    config = DumpConfig(tmp_path, every_n_steps=2, max_trajectories=2)
    assert dump_step_records(batch[0], tokenizer, 3, config) is None
    assert not (tmp_path / RECORDS_DIR).exists()
    dump_step_records(batch[0], tokenizer, 4, config)
    dumped = read_step_records(tmp_path)
    assert {r["uid"] for r in dumped} == {"prompt0", "prompt1"}
    assert dumped == step_records(batch[0].select([0, 1]), tokenizer, 4, config)


# ----------------------------------------------------------------------------- report


def embedded_data(page: str) -> dict:
    block = re.search(r'<script type="application/json" id="steppo-data">(.*?)</script>', page, re.S)
    return json.loads(block.group(1))


def test_report_is_self_contained_escaped_and_complete(records, tmp_path):
    write_step_records(records, tmp_path / "run", 7)
    out = build_report(tmp_path / "run", tmp_path / "report.html")
    page = out.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I), "external asset"
    assert "<link" not in page and "<script src" not in page and "@import" not in page
    # Model text cannot open or close a tag: only the page's own two script blocks close.
    assert "<script>alert(1)" not in page and "<img src=x" not in page
    assert page.count("</script>") == 2
    assert "\\u003cscript\\u003ealert(1)\\u003c/script\\u003e" in page
    data = embedded_data(page)
    assert [t["trajectory_id"] for t in data["trajectories"]] == [f"prompt{b}#{b}" for b in range(len(SCRIPTS))]
    assert data["trajectories"][1]["steps"][0]["action"].startswith(MALICIOUS)
    assert page.count('<svg class="plot"') == 4


def test_report_command_line(records, tmp_path):
    write_step_records(records, tmp_path / "run", 1)
    command = [sys.executable, "-m", "steppo_verl.inspect", str(tmp_path / "run"),
               "--out", str(tmp_path / "r.html")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "r.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    missing = subprocess.run(command[:3] + [str(tmp_path / "nothing")], capture_output=True, text=True,
                             timeout=300, cwd=REPO)  # fmt: skip
    assert missing.returncode == 2 and "no step records" in missing.stderr


# ----------------------------------------------------------------------------- browser


def chromium() -> str:
    """The chromium binary; fails (never skips) when it is missing."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("headless chromium is needed for the report's browser test: run scripts/install_chromium.sh")
    return binary


def run_chromium(url: str, *flags: str, timeout: float = 180) -> str:
    """Load ``url`` in headless chromium with ``flags``; returns stdout. No network, a throwaway profile."""
    with tempfile.TemporaryDirectory() as profile:
        command = [
            chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", *flags, url,
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", timeout=timeout)
    assert done.returncode == 0, f"chromium failed ({done.returncode}): {done.stderr[-2000:]}"
    return done.stdout


def test_report_renders_in_a_browser_without_running_model_text(records, tmp_path):
    out = build_report_for(records, tmp_path)
    key = trajectories(records)[1]["key"]  # the malicious trajectory, selected through the URL
    dom = run_chromium(out.as_uri() + "#" + quote(key), "--dump-dom")
    rows = re.findall(r'<tr class="traj-row[^"]*" data-key="([^"]+)"', dom)
    assert rows == [t["key"] for t in trajectories(records)]
    assert "<title>StepPO trajectories: run</title>" in dom, "model text changed the page title"
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom and "&lt;img src=x onerror=" in dom
    assert "<img" not in dom
    assert re.search(r"<h2>Trajectory prompt1#1 · training step 7", dom)
    assert dom.count('<div class="step"') == 2 and dom.count('<div class="node"') == 2


def build_report_for(records, directory: Path) -> Path:
    write_step_records(records, directory / "run", records[0]["training_step"])
    return build_report(directory / "run", directory / "report.html")


def with_non_finite_numbers(records):
    """A diverged run: NaN/inf advantage, value, ratio and reward in the first trajectory's steps."""
    changed = [dict(record) for record in records]
    changed[0].update(advantage=math.nan, value=math.inf)
    changed[1].update(ratio=math.inf, reward=-math.inf)
    changed[2].update({"return": math.nan})
    return changed


def test_nan_and_inf_advantages_values_and_ratios_are_written_and_shown_as_text(records, tmp_path):
    out = build_report_for(with_non_finite_numbers(records), tmp_path)
    first = embedded_data(out.read_text(encoding="utf-8"))["trajectories"][0]
    assert [first["steps"][0][n] for n in ("advantage", "value")] == ["NaN", "inf"]
    assert [first["steps"][1][n] for n in ("ratio", "reward")] == ["inf", "-inf"]
    assert first["steps"][2]["return"] == "NaN" and first["total_reward"] == "-inf"
    dom = run_chromium(out.as_uri(), "--dump-dom")  # the first trajectory is shown
    assert re.search(r"<h2>Trajectory prompt0#0 ", dom)
    for name, text in (("A", "NaN"), ("V\\(s\\)", "inf"), ("ratio", "inf"), ("r", "-inf"), ("R", "NaN")):
        assert re.search(rf"<b>{name}</b>{text}<", dom), f"{name} = {text} not shown"
    assert dom.count('<tr class="traj-row') == len(SCRIPTS)


def test_malformed_url_fragment_still_shows_the_first_trajectory(records, tmp_path):
    out = build_report_for(records, tmp_path)
    dom = run_chromium(out.as_uri() + "#%E0%A4%A", "--dump-dom")  # not valid percent-encoding
    assert re.search(r"<h2>Trajectory prompt0#0 · training step 7", dom)
    assert 'class="traj-row picked"' in dom


# ----------------------------------------------------------------------------- demo for the README

DEMO_SCRIPTS = [
    ([call("Inception director"), call("Christopher Nolan birthplace"), "<answer>London</answer>"], 5, 1.0),
    ([call("Eiffel Tower height"), "<answer>330 metres</answer>"], 5, 1.0),
    ([call("Amazon river length"), call("Nile length"), call("longest river Africa")], 3, 0.0),
    (["<answer>1969</answer>"], 5, 0.0),
    ([call("Marie Curie prizes"), call("Nobel Prize physics 1903"), call("Curie chemistry"),
      "<answer>two</answer>"], 5, 1.0),  # fmt: skip
    ([call("tallest mountain Alps"), "<answer>Mont Blanc</answer>"], 5, 0.0),
]


def write_demo_run(run_dir: Path, tokenizer=None) -> None:
    """Three dumps of six real agent-loop episodes; the critic's noise shrinks as training goes on."""
    tokenizer = tokenizer or build_tiny_tokenizer()
    outputs = [output for output, _ in run_episodes(tokenizer, DEMO_SCRIPTS, tool=PassageSearch)]
    for dump, training_step in enumerate((10, 20, 30)):
        noise = 0.8 / (dump + 1)
        batch, _ = make_batch(outputs, tokenizer, lambda returns, randn: returns + noise * randn, seed=dump)
        write_step_records(step_records(batch, tokenizer, training_step, DumpConfig(run_dir)), run_dir, training_step)


def make_screenshot(png: Path) -> Path:
    """Render the demo report and screenshot it at 1280x900 into ``png``."""
    with tempfile.TemporaryDirectory() as directory:
        run_dir = Path(directory) / "demo_run"
        write_demo_run(run_dir)
        report = build_report(run_dir, Path(directory) / "report.html", title="StepPO trajectories: demo run")
        png.parent.mkdir(parents=True, exist_ok=True)
        key = trajectories(read_step_records(run_dir))[-2]["key"]  # a 4-step episode of the last dump
        run_chromium(report.as_uri() + "#" + quote(key), f"--screenshot={png.resolve()}", "--window-size=1280,900",
                     "--hide-scrollbars")  # fmt: skip
    assert png.stat().st_size > 0
    return png


def test_demo_report_renders(tmp_path, tokenizer):
    write_demo_run(tmp_path / "demo", tokenizer)
    page = render_report(read_step_records(tmp_path / "demo"), "demo")
    data = embedded_data(page)
    assert len(data["trajectories"]) == 3 * len(DEMO_SCRIPTS)
    assert {t["training_step"] for t in data["trajectories"]} == {10, 20, 30}


def test_report_plots_the_critic_error_at_repeated_states_per_training_step():
    def record(training_step, key, value, outcome):
        return {"training_step": training_step, "state_key": key, "value": value, "outcome": outcome}

    from steppo_verl.inspect.plots import critic_state_error_by_training_step

    records = [record(1, 5, 0.5, 1.0), record(1, 5, 0.5, 0.0), record(1, 6, 0.9, 1.0),
               record(2, 5, 0.4, 0.0), record(2, 5, 0.4, 1.0), record(2, 5, float("nan"), 1.0)]
    svg = critic_state_error_by_training_step(records)
    assert "Critic error at repeated states" in svg and '<polyline class="mean"' in svg
    assert svg.count('<circle class="mean"') == 2, "one point per training step with a repeated state"
    # The floor: state 5 returned 1 and 0 at both steps, so a critic knowing its value would be off by
    # sqrt(2 / pi) * sqrt(0.5 / 2) there too; drawn as its own (dashed) line.
    assert '<polyline class="floor"' in svg and svg.count('<circle class="floor"') == 2
    assert "no critic values" in critic_state_error_by_training_step([record(1, 5, 0.5, 1.0), record(1, 6, 0.5, 1.0)])
    keyless = [{**record(1, 5, 0.5, 1.0), "state_key": None}] * 2
    assert "no critic values" in critic_state_error_by_training_step(keyless)
