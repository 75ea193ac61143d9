"""Step-aware multi-turn agent loop, registered with verl as ``steppo_agent``.

It runs verl's tool agent loop (token-in/token-out through verl's Continuous Token builder, verl's
tool parser and tool interfaces) and records, per trajectory, what StepPO needs:

- ``step_ids`` ``[R]``: step k on the tokens the model generated in turn k, -1 elsewhere
  (DESIGN.md section 3); carried into the training batch as a tensor field.
- ``env_rewards`` ``[R]``: each step's tool/environment reward, on the step's last action token
  (the protocol credits it to that step; the outcome score stays in verl's ``rm_scores``).
- ``step_keys`` ``[R]``: on each step's tokens, a 48-bit key of the observation the step was taken
  from (the prompt for step 0, the previous tool responses after that) for GiGPO's anchor groups.
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
trainer falls back as documented there.

Limits come from verl's keys: ``rollout.response_length``, ``rollout.multi_turn.max_assistant_turns``
(model steps), ``max_user_turns``, ``max_parallel_calls``, ``max_tool_response_length``. Our own
options (``tool_timeout_s``, ``max_episode_seconds``, ``initial_search_tool`` for the StepPO paper's
forced first search of the question, ``bootstrap_endings`` for the endings a task bootstraps)
come from the agent-loop yaml
(``steppo_verl/config/agent_loop.yaml``). A malformed tool call, an unknown tool, a tool that
fails or times out all become an observation for the model; the rollout never fails because of a
tool. Every sample of a batch must use this loop, since verl requires identical keys per sample.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import torch
from verl.experimental.agent_loop.agent_loop import AgentLoopOutput, register
from verl.experimental.agent_loop.tool_agent_loop import AgentData, AgentState, ToolAgentLoop
from verl.experimental.agent_loop.tool_parser import FunctionCall
from verl.tools.schemas import ToolResponse

from steppo_verl.endings import Ending, EndingPolicy
from steppo_verl.protocol import locate_steps, scatter_to_tokens, step_sums
from steppo_verl.safe_text import prompt_safe
from steppo_verl.transcript import transcript_fields

__all__ = ["AGENT_LOOPS", "Ending", "StepAgentLoop", "StepAgentLoopOutput", "state_key"]

# A tool-call name no real tool can have: marks a call the parser could not decode.
_MALFORMED_CALL = "<malformed tool call>"
_KEY_BITS = 48  # keys stay exact through float64 scatter/gather


def state_key(content: Any) -> int:
    """A stable 48-bit key of an observation (any JSON-serialisable content)."""
    digest = hashlib.blake2b(json.dumps(content, sort_keys=True, default=str).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - _KEY_BITS)


@dataclass
class _Step:
    state_key: int
    reward: float = 0.0


class StepAgentLoopOutput(AgentLoopOutput):
    """verl's agent-loop output plus the step record; ``as_dict`` adds the tensor fields."""

    step_ids: list[int]
    env_rewards: list[float]
    step_keys: list[int]
    truncated: bool
    bootstrap_index: int
    ending: int

    def as_dict(self) -> dict[str, Any]:
        output = super().as_dict()
        output["step_ids"] = torch.tensor(output.pop("step_ids"), dtype=torch.int64)
        output["env_rewards"] = torch.tensor(output.pop("env_rewards"), dtype=torch.float32)
        output["step_keys"] = torch.tensor(output.pop("step_keys"), dtype=torch.int64)
        output["truncated"] = torch.tensor(output.pop("truncated"), dtype=torch.bool)
        output["bootstrap_index"] = torch.tensor(output.pop("bootstrap_index"), dtype=torch.int64)
        output["ending"] = torch.tensor(output.pop("ending"), dtype=torch.int64)
        return output


@register("steppo_agent")
class StepAgentLoop(ToolAgentLoop):
    """verl's tool agent loop with a step record; see the module docstring."""

    def __init__(
        self,
        *args,
        tool_timeout_s: float = 60.0,
        max_episode_seconds: float | None = None,
        initial_search_tool: str | None = None,
        bootstrap_endings: list[str] | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.tool_timeout_s = tool_timeout_s
        self.max_episode_seconds = max_episode_seconds
        self.initial_search_tool = initial_search_tool
        self.endings = EndingPolicy.from_names(bootstrap_endings)

    async def run(self, sampling_params: dict[str, Any], priority: int = 0, **kwargs) -> StepAgentLoopOutput:
        agent_data = AgentData(
            messages=list(kwargs["raw_prompt"]),
            image_data=None,
            video_data=None,
            audio_data=None,
            mm_processor_kwargs={},
            metrics={},
            request_id=self._make_request_id(priority, self.rollout_config.full_determinism),
            tools_kwargs=kwargs.get("tools_kwargs", {}),
        )
        if self.initial_search_tool:
            await self._search_the_question(agent_data, kwargs.get("extra_info") or {})
        # verl's generating state copies the rollout server's extra fields (global steps, ...) only into an
        # empty dict, and verl's metrics need them: hold what the forced search's tool wrote there until the
        # first generation has run.
        tool_fields = dict(agent_data.extra_fields)
        agent_data.extra_fields.clear()
        await self._handle_pending_state(agent_data, sampling_params)
        steps: list[_Step] = []
        ending = await self._run_steps(agent_data, sampling_params, steps, tool_fields)
        truncated = self.endings.bootstraps(ending)
        has_position = self.endings.has_bootstrap_position(ending)
        bootstrap = self._append_bootstrap_token(agent_data) if has_position else -1
        return self._build_output(agent_data, steps, ending, truncated, bootstrap)

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

    async def _run_steps(self, agent_data: AgentData, sampling_params: dict[str, Any], steps: list[_Step],
                         tool_fields: dict[str, Any]) -> Ending:
        """Alternate model steps and observations until the model answers or a limit cuts it off;
        ``tool_fields`` (what tools wrote to ``extra_fields`` before the first generation) join
        ``extra_fields`` after it."""
        deadline = time.monotonic() + self.max_episode_seconds if self.max_episode_seconds else None
        key = state_key(agent_data.prompt_ids)
        while True:
            if deadline is not None and time.monotonic() > deadline:
                return Ending.TIMEOUT
            generated_before = len(agent_data.response_mask)
            state = await self._handle_generating_state(agent_data, sampling_params)
            agent_data.extra_fields.update(tool_fields)
            tool_fields = {}
            if len(agent_data.response_mask) > generated_before:
                steps.append(_Step(state_key=key))
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
        if self._at_turn_limit(agent_data):
            # verl stops at a turn limit before recording the assistant message; record it now.
            agent_data.tool_calls = calls
            agent_data.messages.append(self._build_assistant_message(content, agent_data))
            agent_data.tool_calls = calls or malformed_call
            return Ending.TURN_LIMIT
        agent_data.tool_calls = malformed_call  # verl recorded the message and found no decodable call
        return None

    def _at_turn_limit(self, agent_data: AgentData) -> bool:
        return bool(
            (self.max_assistant_turns and agent_data.assistant_turns >= self.max_assistant_turns)
            or (self.max_user_turns and agent_data.user_turns >= self.max_user_turns)
        )

    async def _parse_last_step(self, agent_data: AgentData) -> tuple[str, list[FunctionCall], bool]:
        """The last step's text without calls, its tool calls, and whether it tried an undecodable call."""
        schemas = [tool.tool_schema for tool in self.tools.values()]
        content, calls = await self.tool_parser.extract_tool_calls(agent_data.response_ids, schemas)
        if calls:
            return content, calls, False
        start_marker = getattr(self.tool_parser, "tool_call_start_token", "<tool_call>")
        return content, calls, start_marker in self.tokenizer.decode(agent_data.response_ids)

    async def _observe(self, agent_data: AgentData, steps: list[_Step]) -> int | None:
        """Run the pending tool calls and append their responses.

        Returns the state key of the new observation, or None if it did not fit the response budget.
        """
        rewards_before, messages_before = len(agent_data.tool_rewards), len(agent_data.messages)
        state = await self._handle_processing_tools_state(agent_data)
        if steps:
            steps[-1].reward += float(sum(agent_data.tool_rewards[rewards_before:]))
        if state == AgentState.TERMINATED:
            return None
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
            return ToolResponse(text=text), 0.0, {"malformed_tool_call": True}
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

    def _append_bootstrap_token(self, agent_data: AgentData) -> int:
        """Append one non-action token after the final observation; its position, or -1 without room."""
        if len(agent_data.response_mask) + 1 > self.response_length:
            return -1
        pad = self.tokenizer.pad_token_id
        agent_data.prompt_ids = agent_data.prompt_ids + [pad if pad is not None else self.tokenizer.eos_token_id]
        agent_data.response_mask = agent_data.response_mask + [0]
        if agent_data.response_logprobs:
            agent_data.response_logprobs = agent_data.response_logprobs + [0.0]
        return len(agent_data.response_mask) - 1

    def _build_output(
        self, agent_data: AgentData, steps: list[_Step], ending: Ending, truncated: bool, bootstrap_index: int
    ) -> StepAgentLoopOutput:
        response_len = len(agent_data.response_mask)
        prompt_ids = agent_data.prompt_ids[: len(agent_data.prompt_ids) - response_len]
        response_ids = agent_data.prompt_ids[len(prompt_ids) :][: self.response_length]
        response_mask = agent_data.response_mask[: self.response_length]
        step_ids, env_rewards, step_keys = _step_tensors(response_mask, steps)
        logprobs = agent_data.response_logprobs[: self.response_length] if agent_data.response_logprobs else None
        output = StepAgentLoopOutput(
            prompt_ids=prompt_ids,
            response_ids=response_ids,
            response_mask=response_mask,
            response_logprobs=logprobs,
            num_turns=agent_data.user_turns + agent_data.assistant_turns + 1,
            metrics=agent_data.metrics,
            extra_fields=agent_data.extra_fields,
            step_ids=step_ids,
            env_rewards=env_rewards,
            step_keys=step_keys,
            truncated=truncated,
            bootstrap_index=bootstrap_index if bootstrap_index < len(response_ids) else -1,
            ending=ending.code,
        )
        output.extra_fields.update(
            {
                "turn_scores": agent_data.turn_scores,
                "tool_rewards": agent_data.tool_rewards,
                "num_steps": max(step_ids, default=-1) + 1,
                "ending": ending.value,
                # The policy's steps and the observations apart, for rewards (see steppo_verl.transcript).
                **transcript_fields(self.tokenizer, response_ids, response_mask),
            }
        )
        return output


# What this module registers with verl; the plugin checks each entry after import.
AGENT_LOOPS = {"steppo_agent": StepAgentLoop}


def _step_tensors(response_mask: list[int], steps: list[_Step]) -> tuple[list[int], list[float], list[int]]:
    """Per-token step ids, env rewards (on each step's last token) and state keys of one trajectory."""
    mask = torch.tensor([response_mask], dtype=torch.int64).reshape(1, -1)
    layout = locate_steps(mask)
    num_steps = int(layout.num_steps[0])
    if num_steps > len(steps):
        raise RuntimeError(
            f"the response has {num_steps} runs of model tokens but the loop recorded {len(steps)} steps; "
            "the Continuous Token builder merged or split a turn"
        )
    steps = steps[:num_steps]  # the response budget may have cut trailing steps
    keys = torch.tensor([[s.state_key for s in steps]], dtype=torch.int64)
    rewards = torch.tensor([[s.reward for s in steps]], dtype=torch.float32)
    last_tokens = layout.starts + step_sums(torch.ones_like(mask), layout) - 1
    env_rewards = torch.zeros(mask.shape, dtype=torch.float32)
    if num_steps:
        env_rewards[0, last_tokens[0]] = rewards[0]
    step_keys = scatter_to_tokens(keys, layout)
    return layout.step_ids()[0].tolist(), env_rewards[0].tolist(), step_keys[0].tolist()
