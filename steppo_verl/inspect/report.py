"""A static, self-contained HTML view of a run's step records (one file, no server, no assets).

The page lists the dumped trajectories (filterable by final reward, length in steps and
truncation) and shows the selected one as a timeline of steps, each coloured by its advantage on a
diverging scale with V(s_k), R_k, r_k and the importance ratio beside the action and observation
text; inline SVG plots summarise the run.

Trajectory text is untrusted model output. It only travels inside a
``<script type="application/json">`` block (with ``<``, ``>`` and ``&`` written as ``\\u003c``
etc., so no ``</script>`` in it can close the block), is read with ``JSON.parse`` and reaches the
page through ``textContent``, never as markup.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from collections import defaultdict
from pathlib import Path

from steppo_verl.inspect.plots import (
    advantage_by_step,
    critic_state_error_by_training_step,
    explained_variance_by_training_step,
    steps_histogram,
)
from steppo_verl.inspect.records import read_step_records

__all__ = ["build_report", "embed_json", "render_report", "trajectories"]

_STEP_FIELDS = (
    "step", "action", "observation", "action_tokens", "observation_tokens", "reward", "env_reward",
    "value", "advantage", "return", "ratio", "clipped", "terminated", "truncated",
)  # fmt: skip


def _jsonable(value):
    """``value``, with a NaN/inf float spelt as text ("NaN", "inf", "-inf") for the page to show.

    JSON.parse rejects NaN/Infinity, which Python's json would write; and a diverged run's NaN
    advantage is exactly what the report must show rather than hide.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _is_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def trajectories(records: list[dict]) -> list[dict]:
    """Group step records into trajectories (ordered by training step, then batch order).

    Each trajectory has ``key`` (unique in the run), ``training_step``, ``trajectory_id``,
    ``uid``, ``num_steps``, ``final_reward`` (r of the last step, where the outcome lands),
    ``total_reward``, ``truncated``, ``ending`` and its ``steps`` in order. NaN/inf numbers are
    written as the text "NaN", "inf", "-inf".
    """
    grouped: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for record in records:
        grouped[(record["training_step"], record["trajectory_id"])].append(record)
    result = []
    for (training_step, trajectory_id), steps in grouped.items():
        steps.sort(key=lambda r: r["step"])
        first, last = steps[0], steps[-1]
        result.append(
            {
                "key": f"{training_step}:{trajectory_id}",
                "training_step": training_step,
                "trajectory_id": trajectory_id,
                "uid": first["uid"],
                "num_steps": first["num_steps"],
                "final_reward": _jsonable(last["reward"]),
                "total_reward": _jsonable(sum(r["reward"] for r in steps)),
                "truncated": bool(last["truncated"]),
                "ending": first["ending"],
                "steps": [{name: _jsonable(r[name]) for name in _STEP_FIELDS} for r in steps],
            }
        )
    result.sort(key=lambda t: t["training_step"])  # stable: batch order within a training step
    return result


def embed_json(payload: object) -> str:
    """JSON for a ``<script type="application/json">`` block that no string in it can break out of."""
    text = json.dumps(payload, ensure_ascii=False, allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def render_report(records: list[dict], title: str) -> str:
    """The report page for ``records`` (as written by :mod:`steppo_verl.inspect.records`)."""
    runs = trajectories(records)
    advantages = [abs(r["advantage"]) for r in records if _is_finite(r["advantage"])]
    payload = {"trajectories": runs, "max_abs_advantage": max(advantages, default=0.0) or 1.0}
    plots = "".join(
        [
            advantage_by_step(records),
            explained_variance_by_training_step(records),
            critic_state_error_by_training_step(records),
            steps_histogram([t["num_steps"] for t in runs]),
        ]
    )
    values = {
        "TITLE": html.escape(title),
        "CSS": _CSS,
        "PLOTS": plots,
        "SUMMARY": html.escape(
            f"{len(runs)} trajectories, {len(records)} steps, "
            f"{len({t['training_step'] for t in runs})} training steps"
        ),
        "DATA": embed_json(payload),
        "JS": _JS,
    }
    # One pass, so text substituted for one placeholder is never scanned for another.
    return re.sub(r"\{\{([A-Z]+)\}\}", lambda match: values[match.group(1)], _PAGE)


def build_report(run_dir: str | os.PathLike, out: str | os.PathLike, title: str | None = None) -> Path:
    """Render the step records under ``RUN_DIR/steppo_steps/`` into the HTML file ``out``."""
    page = render_report(read_step_records(run_dir), title or f"StepPO trajectories: {Path(run_dir).name}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{TITLE}}</title>
<style>{{CSS}}</style>
</head>
<body>
<header><h1>{{TITLE}}</h1><p class="summary">{{SUMMARY}}</p></header>
<section class="plots">{{PLOTS}}</section>
<main>
<section class="list">
<form id="filters" autocomplete="off">
<label>final reward <input id="f-reward-min" type="number" step="any" placeholder="min">
 to <input id="f-reward-max" type="number" step="any" placeholder="max"></label>
<label>steps <input id="f-steps-min" type="number" min="0" step="1" placeholder="min">
 to <input id="f-steps-max" type="number" min="0" step="1" placeholder="max"></label>
<label>episode <select id="f-truncated"><option value="all">all</option>
<option value="truncated">truncated</option><option value="terminated">terminated</option></select></label>
<span id="shown"></span>
</form>
<table id="trajectories"><thead><tr><th>train step</th><th>trajectory</th><th>steps</th>
<th>final r</th><th>total r</th><th>ending</th><th>advantages</th></tr></thead><tbody></tbody></table>
</section>
<section id="detail"><p class="hint">Select a trajectory.</p></section>
</main>
<div class="legend"><span>A &lt; 0</span><span class="scale"></span><span>A &gt; 0</span></div>
<script type="application/json" id="steppo-data">{{DATA}}</script>
<script>{{JS}}</script>
</body>
</html>
"""

_CSS = """
:root { --ink: #1b1f24; --muted: #5c6670; --line: #d6dbe0; --pick: #fff4c2; }
* { box-sizing: border-box; }
body { margin: 0; font: 13px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink);
       background: #f6f7f9; }
header { padding: 10px 16px 4px; }
h1 { font-size: 17px; margin: 0; }
.summary { margin: 2px 0 0; color: var(--muted); }
.plots { display: flex; gap: 10px; flex-wrap: wrap; padding: 6px 16px; }
.plot { background: #fff; border: 1px solid var(--line); border-radius: 6px; }
.plot .title { font-weight: 600; font-size: 12px; fill: var(--ink); }
.plot .tick, .plot .label { font-size: 10px; fill: var(--muted); }
.plot .axis { stroke: #8a949e; } .plot .zero { stroke: #c5ccd3; stroke-dasharray: 3 3; }
.plot .point { fill: #4a79a8; fill-opacity: 0.35; }
.plot polyline.mean { stroke: #d0641c; stroke-width: 2; } .plot circle.mean { fill: #d0641c; }
.plot polyline.floor { stroke: #8a949e; stroke-width: 1.5; stroke-dasharray: 4 3; } .plot circle.floor { fill: #8a949e; }
.plot .bar { fill: #4a79a8; }
main { display: grid; grid-template-columns: minmax(420px, 5fr) 7fr; gap: 12px; padding: 6px 16px 40px; }
.list, #detail { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 8px; min-width: 0; }
#filters { display: flex; flex-wrap: wrap; gap: 6px 12px; align-items: center; margin-bottom: 6px; }
#filters input { width: 62px; } #shown { color: var(--muted); margin-left: auto; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 3px 6px; border-bottom: 1px solid var(--line); white-space: nowrap; }
th { font-weight: 600; color: var(--muted); }
tr.traj-row { cursor: pointer; } tr.traj-row:hover { background: #eef3f8; }
tr.traj-row.picked { background: var(--pick); }
td.id { max-width: 160px; overflow: hidden; text-overflow: ellipsis; }
.chip { display: inline-block; width: 14px; height: 12px; margin-right: 1px; border: 1px solid #0002;
        vertical-align: middle; }
.flag { font-size: 11px; padding: 0 4px; border-radius: 3px; background: #e4e7eb; }
.flag.cut { background: #ffe0b3; } .flag.clip { background: #f6c9cf; }
#detail h2 { font-size: 14px; margin: 0 0 6px; }
.timeline { display: flex; gap: 3px; margin: 6px 0 10px; flex-wrap: wrap; }
.timeline .node { min-width: 54px; padding: 3px 5px; border-radius: 4px; border: 1px solid #0002; text-align: center;
                  font-size: 11px; }
.step { border: 1px solid var(--line); border-left: 8px solid #ccc; border-radius: 4px; margin-bottom: 8px;
        padding: 6px 8px; }
.nums { display: flex; flex-wrap: wrap; gap: 4px 14px; margin-bottom: 4px; }
.nums b { color: var(--muted); font-weight: 600; margin-right: 3px; }
.text-label { color: var(--muted); font-size: 11px; margin-top: 4px; }
pre { margin: 2px 0; padding: 5px 7px; background: #f3f5f7; border-radius: 3px; white-space: pre-wrap;
      word-break: break-word; max-height: 220px; overflow: auto;
      font: 12px/1.35 ui-monospace, "DejaVu Sans Mono", monospace; }
pre.obs { background: #f7f3ec; }
.hint { color: var(--muted); }
.legend { position: fixed; right: 12px; bottom: 8px; display: flex; gap: 6px; align-items: center; font-size: 11px;
          background: #fffd; padding: 3px 6px; border-radius: 4px; border: 1px solid var(--line); }
.legend .scale { width: 120px; height: 10px;
                 background: linear-gradient(90deg, rgb(178,24,43), rgb(247,247,247), rgb(33,102,172)); }
"""

_JS = r"""
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("steppo-data").textContent);
  const runs = data.trajectories;
  const scale = data.max_abs_advantage;
  const NEUTRAL = [247, 247, 247], POSITIVE = [33, 102, 172], NEGATIVE = [178, 24, 43];

  // Model text only ever goes through textContent.
  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function fmt(v) {
    if (v === null || v === undefined) return "\u2013";
    if (typeof v !== "number") return String(v);
    const a = Math.abs(v);
    return a !== 0 && (a >= 1e4 || a < 1e-3) ? v.toExponential(2) : v.toFixed(3);
  }
  // A NaN/inf arrives as text ("NaN", "inf"): shown as written, coloured neutral.
  function finite(v) {
    return typeof v === "number" && Number.isFinite(v) ? v : 0;
  }
  // Diverging scale: red for negative advantages, white at 0, blue for positive ones.
  function advColour(a) {
    const t = Math.max(-1, Math.min(1, finite(a) / scale));
    const end = t >= 0 ? POSITIVE : NEGATIVE, w = Math.abs(t);
    const rgb = NEUTRAL.map((c, i) => Math.round(c + (end[i] - c) * w));
    return "rgb(" + rgb.join(",") + ")";
  }
  function paint(node, a) {
    node.style.background = advColour(a);
    node.style.color = Math.abs(finite(a) / scale) > 0.55 ? "#fff" : "#111";
  }
  function number(id) {
    const v = document.getElementById(id).value;
    return v === "" ? null : Number(v);
  }
  function passes(t) {
    const rMin = number("f-reward-min"), rMax = number("f-reward-max");
    const sMin = number("f-steps-min"), sMax = number("f-steps-max");
    const kind = document.getElementById("f-truncated").value;
    return (rMin === null || t.final_reward >= rMin) && (rMax === null || t.final_reward <= rMax)
      && (sMin === null || t.num_steps >= sMin) && (sMax === null || t.num_steps <= sMax)
      && (kind === "all" || (kind === "truncated") === t.truncated);
  }

  // Plain verl records no ending; the truncation flag still tells the two kinds apart.
  function endingOf(t) {
    return t.ending || (t.truncated ? "truncated" : "terminated");
  }

  let picked = null;
  function renderList() {
    const body = document.querySelector("#trajectories tbody");
    body.replaceChildren();
    let shown = 0;
    for (const t of runs) {
      if (!passes(t)) continue;
      shown += 1;
      const row = el("tr", "traj-row" + (t.key === picked ? " picked" : ""));
      row.setAttribute("data-key", t.key);
      row.appendChild(el("td", "", t.training_step));
      const id = el("td", "id", t.trajectory_id);
      id.title = t.trajectory_id;
      row.appendChild(id);
      row.appendChild(el("td", "", t.num_steps));
      row.appendChild(el("td", "", fmt(t.final_reward)));
      row.appendChild(el("td", "", fmt(t.total_reward)));
      const ending = el("td");
      ending.appendChild(el("span", "flag" + (t.truncated ? " cut" : ""), endingOf(t)));
      row.appendChild(ending);
      const chips = el("td");
      for (const s of t.steps) {
        const chip = el("span", "chip");
        chip.style.background = advColour(s.advantage);
        chip.title = "step " + s.step + ": A = " + fmt(s.advantage);
        chips.appendChild(chip);
      }
      row.appendChild(chips);
      row.addEventListener("click", () => pick(t.key));
      body.appendChild(row);
    }
    document.getElementById("shown").textContent = shown + " of " + runs.length + " shown";
  }

  function numbers(s) {
    const box = el("div", "nums");
    const items = [["A", s.advantage], ["V(s)", s.value], ["R", s.return], ["r", s.reward],
                   ["r env", s.env_reward], ["ratio", s.ratio], ["tokens", String(s.action_tokens)]];
    for (const [name, v] of items) {
      const item = el("span");
      item.appendChild(el("b", "", name));
      item.appendChild(document.createTextNode(fmt(v)));
      box.appendChild(item);
    }
    if (s.clipped) box.appendChild(el("span", "flag clip", "clipped"));
    if (s.terminated) box.appendChild(el("span", "flag", "terminated"));
    if (s.truncated) box.appendChild(el("span", "flag cut", "truncated"));
    return box;
  }

  function renderDetail(t) {
    const detail = document.getElementById("detail");
    detail.replaceChildren();
    detail.appendChild(el("h2", "", "Trajectory " + t.trajectory_id + " \u00b7 training step " + t.training_step
      + " \u00b7 " + t.num_steps + " steps \u00b7 " + endingOf(t)));
    const line = el("div", "timeline");
    for (const s of t.steps) {
      const node = el("div", "node", "k=" + s.step + "  A " + fmt(s.advantage));
      paint(node, s.advantage);
      line.appendChild(node);
    }
    detail.appendChild(line);
    for (const s of t.steps) {
      const card = el("div", "step");
      card.style.borderLeftColor = advColour(s.advantage);
      card.appendChild(el("div", "text-label", "step " + s.step));
      card.appendChild(numbers(s));
      card.appendChild(el("div", "text-label", "action"));
      card.appendChild(el("pre", "act", s.action));
      card.appendChild(el("div", "text-label", "observation (" + s.observation_tokens + " tokens)"));
      card.appendChild(el("pre", "obs", s.observation));
      detail.appendChild(card);
    }
  }

  // The trajectory key in the URL fragment; null when the fragment is not valid percent-encoding
  // (decodeURIComponent throws on "%E0%A4%A", which must not stop the page from rendering).
  function hashKey() {
    try {
      return decodeURIComponent(location.hash.slice(1));
    } catch (error) {
      return null;
    }
  }

  function pick(key) {
    const t = runs.find((r) => r.key === key);
    if (!t) return;
    picked = key;
    renderDetail(t);
    renderList();
    if (hashKey() !== key) {
      history.replaceState(null, "", "#" + encodeURIComponent(key));
    }
  }

  document.getElementById("filters").addEventListener("input", renderList);
  document.getElementById("filters").addEventListener("submit", (e) => e.preventDefault());
  renderList();
  const wanted = hashKey();
  pick(runs.some((r) => r.key === wanted) ? wanted : (runs.length ? runs[0].key : null));
})();
"""
