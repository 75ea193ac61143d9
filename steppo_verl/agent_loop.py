"""Step-aware multi-turn agent loop, registered with verl as ``steppo_agent``.

It runs verl's tool agent loop (token-in/token-out through verl's Continuous Token builder, verl's
tool parser and tool interfaces) and records, per trajectory, what StepPO needs:

- ``step_ids`` ``[R]``: step k on the tokens the model generated in turn k, -1 elsewhere
  (DESIGN.md section 3); carried into the training batch as a tensor field.
- ``env_rewards`` ``[R]``: each step's tool/environment reward, on the step's last action token
  (the protocol credits it to that step; the outcome score stays in verl's ``rm_scores``).
- ``step_keys`` ``[R]``: on each step's tokens, a 48-bit key of the observation the step was taken
  from (the prompt for step 0, the previous tool responses after that) for GiGPO's anchor groups.
  A tool that knows its exact state names it in its result metrics (``metrics["state"]``, any
  JSON-serialisable value); the key then comes from the states of the calls instead of their text, so
  observations that differ only in what the state does not depend on (the vault's code, shown when it
  opens) count as one state.
- ``ending``: why the episode ended (:class:`steppo_verl.endings.Ending`, as its code), also in
  ``extra_fields["ending"]`` as its name.
- ``truncated`` and ``bootstrap_index``: whether the return continues with V(s_K) after the last
  step (decided by the one endings policy, :mod:`steppo_verl.endings`: by default only a wall-clock
  timeout bootstraps; the turn and length limits are terminal), and the response position whose
  critic value is V(s_K).

How the state after the last step becomes scorable: when a bootstrapping ending leaves a complete
state (turn limit, timeout) the loop completes the pending observation (at the turn limit it still
runs the requested tool calls) and appends one extra non-action token after it. verl's critic value
at a position is the value of everything *before* that token, so the value at ``bootstrap_index``
is V(prompt + all actions + all observations + the next turn's generation prompt), the same kind of
prefix that V(s_k) is read from at every step start. A response-length cut leaves that state
incomplete (the observation or the step itself did not fit): ``bootstrap_index`` is then -1 and the
trainer falls back as documented there. The step record, the output row and that bootstrap token are built
by :mod:`steppo_verl.step_record`, shared with the environment loop ``steppo_env_agent``.

Limits come from verl's keys: ``rollout.response_length``, ``rollout.multi_turn.max_assistant_turns``
(model steps), ``max_user_turns``, ``max_parallel_calls``, ``max_tool_response_length``. Our own
options (``tool_timeout_s``, ``max_episode_seconds``, ``initial_search_tool`` for the StepPO paper's
forced first search of the question, ``bootstrap_endings`` for the endings a task bootstraps)
come from the agent-loop yaml
(``steppo_verl/config/agent_loop.yaml``). A malformed tool call, an unknown tool, a tool that
fails or times out all become an observation for the model; the rollout never fails because of a
tool. Every sample of a batch must use this loop, since verl requires identical keys per sample.

Branching rollouts (ARPO, :mod:`steppo_verl.branching`; the yaml's ``branching`` block, off by default; the
driver, shared with ``steppo_env_agent``, is :mod:`steppo_verl.branch_loop`): one sample then returns a list of ``total_rollouts`` outputs. The ``initial_rollouts`` trajectories
start from the prompt and advance one step per round together; after each round the planner reads the
entropy of each step's opening tokens (the rollout server's top-k log-probs, asked for with
``sampling_params["top_logprobs"]``) and may branch a trajectory that just received a tool response:
the branch copies its whole context (tokens, messages, step record) and samples its own continuation.
Each row carries ``path_id``, ``parent_id`` and ``branch_position`` (the response token where it leaves
its parent). A tool that keeps per-trajectory state outside verl's ``AgentData`` copies it in an
``on_branch(parent_agent_data, child_agent_data)`` method. verl's v1 worker would give every output of
a list the last one's reward: :mod:`steppo_verl.branch_worker` scores each on its own. Validation does
not branch: that worker marks validation samples (:data:`~steppo_verl.branching.PLAIN_ROLLOUT`), which
then run as one plain trajectory each, so validation measures ``val_kwargs.n`` samples of the policy as
for any other estimator.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any

from verl.experimental.agent_loop.agent_loop import register
from verl.experimental.agent_loop.tool_agent_loop import AgentData, AgentState, ToolAgentLoop
from verl.experimental.agent_loop.tool_parser import FunctionCall
from verl.tools.schemas import ToolResponse

from steppo_verl.branch_loop import BranchingLoop
from steppo_verl.endings import Ending, EndingPolicy
from steppo_verl.safe_text import prompt_safe
from steppo_verl.state_keys import state_key, tool_states_key
from steppo_verl.step_record import StepAgentLoopOutput, StepRecord, at_turn_limit, start_episode

__all__ = ["AGENT_LOOPS", "Ending", "StepAgentLoop", "StepAgentLoopOutput", "state_key"]

# A tool-call name no real tool can have: marks a call the parser could not decode.
_MALFORMED_CALL = "<malformed tool call>"


@dataclasses.dataclass
class _Trajectory:
    """One trajectory in progress: verl's state, our step record, and what the next step needs.

    key: the state key of the observation the next step is taken from.
    tool_fields: what tools wrote to ``extra_fields`` before the first generation (joined after it).
    top_logprobs: ``[T][k]`` the top-k log-probs of the segment generated last (branching only).
    """

    agent_data: AgentData
    steps: list[StepRecord]
    key: int
    tool_fields: dict[str, Any]
    deadline: float | None
    top_logprobs: list[list[float]] | None = None


@register("steppo_agent")
class StepAgentLoop(BranchingLoop, ToolAgentLoop):
    """verl's tool agent loop with a step record and optional ARPO branching; see the module docstring."""

    def __init__(
        self,
        *args,
        tool_timeout_s: float = 60.0,
        max_episode_seconds: float | None = None,
        initial_search_tool: str | None = None,
        bootstrap_endings: list[str] | None = None,
        branching: Any = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.tool_timeout_s = tool_timeout_s
        self.max_episode_seconds = max_episode_seconds
        self.initial_search_tool = initial_search_tool
        self.endings = EndingPolicy.from_names(bootstrap_endings)
        self._init_branching(branching)
        self._tool_states: list[Any] | None = None  # the states the tools of the current observation named

    async def _start_trajectory(
        self, sampling_params: dict[str, Any], priority: int, kwargs: dict[str, Any]
    ) -> _Trajectory:
        """A new trajectory at the prompt (s_0), the forced first search done if configured."""
        agent_data = start_episode(self, kwargs["raw_prompt"], priority, kwargs.get("tools_kwargs", {}))
        self._select_tools(agent_data, kwargs.get("extra_info") or {})
        if self.initial_search_tool:
            await self._search_the_question(agent_data, kwargs.get("extra_info") or {})
        # verl's generating state copies the rollout server's extra fields (global steps, ...) only into an
        # empty dict, and verl's metrics need them: hold what the forced search's tool wrote there until the
        # first generation has run.
        tool_fields = dict(agent_data.extra_fields)
        agent_data.extra_fields.clear()
        await self._handle_pending_state(agent_data, sampling_params)
        deadline = time.monotonic() + self.max_episode_seconds if self.max_episode_seconds else None
        return _Trajectory(agent_data, [], state_key(agent_data.prompt_ids), tool_fields, deadline)

    def _select_tools(self, agent_data: AgentData, extra_info: dict[str, Any]) -> None:
        """The sample's tools: ``extra_info["tool_selection"]`` (tool names) as verl's ``ToolAgentLoop.run``
        reads it (a name the loop has no tool for is left out, as there), else all of them.

        Why here: verl makes the selection in its ``run``, which this loop replaces; without it a sample's
        selection would be ignored and the prompt would offer every tool.
        """
        selection = extra_info.get("tool_selection")
        tools = {name: self.tools[name] for name in selection if name in self.tools} if selection else self.tools
        agent_data._active_tools = tools
        agent_data._active_tool_schemas = (
            [tool.tool_schema.model_dump(exclude_unset=True, exclude_none=True) for tool in tools.values()]
            if selection
            else self.tool_schemas
        )

    async def _search_the_question(self, agent_data: AgentData, extra_info: dict[str, Any]) -> None:
        """The StepPO paper's forced first search: the question's results become part of the prompt (s_0).

        Calls ``initial_search_tool`` with ``{"query_list": [question]}`` (the search tool's contract);
        the question is ``extra_info["question"]`` as written by our data preparation, else the last
        user message. A failing search becomes the observation text, as for any tool call.
        """
        question = extra_info.get("question") or next(
            m["content"] for m in reversed(agent_data.messages) if m.get("role") == "user"
        )
        call = FunctionCall(name=self.initial_search_tool, arguments=json.dumps({"query_list": [question]}))
        response, _, _ = await self._call_tool(call, agent_data.tools_kwargs, agent_data)
        agent_data.messages.append({"role": "tool", "content": response.text or ""})

    async def _step(self, trajectory: _Trajectory, sampling_params: dict[str, Any]) -> Ending | None:
        """One model step and the observation it asked for; the ending if the trajectory ended, else None."""
        agent_data, steps = trajectory.agent_data, trajectory.steps
        if trajectory.deadline is not None and time.monotonic() > trajectory.deadline:
            return Ending.TIMEOUT
        generated_before = len(agent_data.response_mask)
        state = await self._handle_generating_state(agent_data, sampling_params)
        self._take_top_logprobs(trajectory)
        agent_data.extra_fields.update(trajectory.tool_fields)
        trajectory.tool_fields = {}
        if len(agent_data.response_mask) > generated_before:
            steps.append(StepRecord(state_key=trajectory.key))
        if state == AgentState.TERMINATED:
            ending = await self._classify_stop(agent_data)
            if ending is Ending.TURN_LIMIT:
                # Observe what the last step asked for, so the state after it can be valued.
                fits = await self._observe(agent_data, steps) is not None
                return ending if fits else Ending.LENGTH_LIMIT
            if ending is not None:
                return ending
        key = await self._observe(agent_data, steps)
        if key is None:
            return Ending.LENGTH_LIMIT
        trajectory.key = key
        return None

    # ------------------------------------------------------------------------------------------ branching

    async def _branch(self, parent: _Trajectory, priority: int) -> _Trajectory:
        """A copy of ``parent`` (its whole context, steps and tool-visible state) with its own request id.

        Tools are shared, not copied. A tool that keeps per-trajectory state outside ``AgentData`` (keyed
        by it) copies that state in an ``on_branch(parent_agent_data, child_agent_data)`` method.
        """
        agent_data, steps = self._copy_context(parent, priority, memo={id(tool): tool for tool in self.tools.values()})
        for tool in self.tools.values():
            if hasattr(tool, "on_branch"):
                tool.on_branch(parent.agent_data, agent_data)
        return _Trajectory(agent_data, steps, parent.key, {}, parent.deadline)

    async def _classify_stop(self, agent_data: AgentData) -> Ending | None:
        """Why verl's generating state stopped. None: a malformed tool call, queued for an observation."""
        content, calls, malformed = await self._parse_last_step(agent_data)
        wants_tools = bool(calls) or malformed
        if len(agent_data.response_mask) >= self.response_length:
            finished_turn = agent_data.response_ids[-1:] == [self.tokenizer.eos_token_id]
            return Ending.ANSWER if finished_turn and not wants_tools else Ending.LENGTH_LIMIT
        if not wants_tools:
            return Ending.ANSWER
        malformed_call = [FunctionCall(name=_MALFORMED_CALL, arguments="")]
        if at_turn_limit(agent_data, self.max_assistant_turns, self.max_user_turns):
            # verl stops at a turn limit before recording the assistant message; record it now.
            agent_data.tool_calls = calls
            agent_data.messages.append(self._build_assistant_message(content, agent_data))
            agent_data.tool_calls = calls or malformed_call
            return Ending.TURN_LIMIT
        agent_data.tool_calls = malformed_call  # verl recorded the message and found no decodable call
        return None

    async def _parse_last_step(self, agent_data: AgentData) -> tuple[str, list[FunctionCall], bool]:
        """The last step's text without calls, its tool calls, and whether it tried an undecodable call."""
        schemas = [tool.tool_schema for tool in self.tools.values()]
        content, calls = await self.tool_parser.extract_tool_calls(agent_data.response_ids, schemas)
        if calls:
            return content, calls, False
        start_marker = getattr(self.tool_parser, "tool_call_start_token", "<tool_call>")
        return content, calls, start_marker in self.tokenizer.decode(agent_data.response_ids)

    async def _observe(self, agent_data: AgentData, steps: list[StepRecord]) -> int | None:
        """Run the pending tool calls and append their responses.

        Returns the state key of the new observation, or None if it did not fit the response budget.
        """
        rewards_before, messages_before = len(agent_data.tool_rewards), len(agent_data.messages)
        self._tool_states = []
        state = await self._handle_processing_tools_state(agent_data)
        tool_states, self._tool_states = self._tool_states, None
        if steps:
            steps[-1].reward += float(sum(agent_data.tool_rewards[rewards_before:]))
        if state == AgentState.TERMINATED:
            return None
        if tool_states and None not in tool_states:
            return tool_states_key(tool_states)
        return state_key(agent_data.messages[messages_before:])

    async def _call_tool(self, tool_call: FunctionCall, tools_kwargs: dict[str, Any], agent_data: AgentData):
        """verl's tool call, plus a time limit, an explanation for undecodable calls, and prompt-safe text.

        Every tool observation (the forced first search included) enters the conversation here, so this is
        where text nobody vetted (a tool's output, verl's echo of the model's call) is made encodable and
        stripped of control tokens (:func:`steppo_verl.safe_text.prompt_safe`) before it is tokenized.
        """
        if tool_call.name == _MALFORMED_CALL:
            # Our own fixed text: its <tool_call> markers show the model the real call tokens.
            text = (
                "Your tool call could not be parsed. Write exactly one JSON object per call: "
                '<tool_call>{"name": "<tool name>", "arguments": {...}}</tool_call>'
            )
            response, reward, metrics = ToolResponse(text=text), 0.0, {"malformed_tool_call": True}
        else:
            response, reward, metrics = await self._call_tool_in_time(tool_call, tools_kwargs, agent_data)
        if self._tool_states is not None:
            self._tool_states.append(metrics.get("state") if isinstance(metrics, dict) else None)
        return response, reward, metrics

    async def _call_tool_in_time(self, tool_call: FunctionCall, tools_kwargs: dict[str, Any], agent_data: AgentData):
        """verl's tool call within ``tool_timeout_s``, its text made prompt-safe."""
        try:
            response, reward, metrics = await asyncio.wait_for(
                super()._call_tool(tool_call, tools_kwargs, agent_data), self.tool_timeout_s
            )
        except asyncio.TimeoutError:
            text = f"Tool '{tool_call.name}' timed out after {self.tool_timeout_s:g} s. You may retry or answer."
            response, reward, metrics = ToolResponse(text=text), 0.0, {"tool_timeout": True}
        if response.text:
            response = response.model_copy(update={"text": prompt_safe(response.text, self.tokenizer)})
        return response, reward, metrics


# What this module registers with verl; the plugin checks each entry after import.
AGENT_LOOPS = {"steppo_agent": StepAgentLoop}
