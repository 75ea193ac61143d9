"""A token-in/token-out generation server around a transformers causal LM: the ``hf`` rollout engine.

verl's agent loops talk to a rollout server through one Ray actor method,
``generate(request_id=, prompt_ids=, sampling_params=, ...) -> TokenOutput``, and the trainer drives
its lifecycle (``wake_up``/``sleep``/``clear_kv_cache``/``abort_all_requests``/...). vLLM and SGLang
need an accelerator; this server needs only torch and transformers, so the real trainer can run on
a CPU (tests, CI, a laptop). It decodes one request at a time with a KV cache, sampling the way vLLM
does (repetition penalty, temperature, top-k, top-p) and reporting the sampled tokens' log-probs in
vLLM's ``logprobs_mode`` (verl's default ``processed_logprobs``: after temperature and top-k/top-p).
New weights arrive each step through :meth:`HFRolloutServer.load_weights` (see ``rollout.py``).
Lifecycle calls are no-ops: the model stays resident in host memory.
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch
from transformers import AutoModelForCausalLM, DynamicCache
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.rollout.replica import TokenOutput


def process_logits(
    logits: torch.Tensor, history: list[int], temperature: float, top_k: int, top_p: float, repetition_penalty: float
) -> torch.Tensor:
    """Logits after vLLM's sampling pipeline: repetition penalty, temperature, then top-k/top-p masking.

    ``temperature <= 0`` means greedy; the logits are then returned unscaled.
    """
    logits = logits.float()
    if repetition_penalty != 1.0 and history:
        seen = torch.tensor(sorted(set(history)))
        scores = logits[seen]
        logits[seen] = torch.where(scores > 0, scores / repetition_penalty, scores * repetition_penalty)
    if temperature <= 0:
        return logits
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        logits[logits < torch.topk(logits, top_k).values[-1]] = float("-inf")
    if top_p < 1.0:
        probs, order = torch.sort(torch.softmax(logits, dim=-1), descending=True)
        # drop a token once the more likely ones already cover top_p (the most likely always stays)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        logits[order[drop]] = float("-inf")
    return logits


class HFRolloutServer:
    """Ray actor: one replica's model, its sampler and verl's rollout-server lifecycle methods."""

    def __init__(self, config, model_config, replica_rank: int = 0):
        self.config = omega_conf_to_dataclass(config)
        self.model_config = model_config
        self.replica_rank = replica_rank
        path = getattr(model_config, "local_path", None) or model_config.path
        # float32 on purpose: the FSDP actor computes log-probs in float32 on CPU, so rollout and
        # actor log-probs agree (bfloat16 decoding would put ~1e-2 noise into importance ratios).
        self.model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch.float32,
            attn_implementation="sdpa",
            trust_remote_code=getattr(model_config, "trust_remote_code", False),
        ).eval()
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        tokenizer = getattr(model_config, "tokenizer", None)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_token_ids = set(eos)
        self.generator = torch.Generator().manual_seed(self.config.seed + replica_rank)
        self.global_steps = None
        self._lock = asyncio.Lock()  # one request (or weight load) at a time

    # ------------------------------------------------------------------ generation

    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: list[Any] | None = None,
        video_data: list[Any] | None = None,
        **kwargs: Any,
    ) -> TokenOutput:
        """Sample one response for ``prompt_ids`` (text only); same contract as verl's vLLM server."""
        if image_data is not None or video_data is not None or kwargs.get("audio_data") is not None:
            raise NotImplementedError("the hf rollout server is text-only")
        prompt_ids = list(prompt_ids)
        params = dict(sampling_params)
        max_tokens = self._max_tokens(len(prompt_ids), params)
        async with self._lock:
            token_ids, log_probs = await asyncio.to_thread(self._decode, prompt_ids, params, max_tokens)
        return TokenOutput(
            token_ids=token_ids,
            log_probs=log_probs if params.get("logprobs") else None,
            stop_reason="completed",
            extra_fields={"global_steps": self.global_steps},
        )

    def _max_tokens(self, prompt_len: int, params: dict[str, Any]) -> int:
        """verl's vLLM server rule: ``max_tokens`` (or ``max_new_tokens``), else the configured
        response budget, clamped to ``[1, max_model_len - prompt_len]``."""
        max_model_len = self.config.max_model_len or self.config.prompt_length + self.config.response_length
        room = max_model_len - prompt_len
        if room < 1:
            raise ValueError(f"prompt length {prompt_len} leaves no room to generate within {max_model_len} tokens")
        requested = params.get("max_tokens", params.get("max_new_tokens"))
        if requested is None:
            requested = min(
                self.config.response_length, self.config.prompt_length + self.config.response_length - prompt_len
            )
        return max(1, min(int(requested), room))

    @torch.no_grad()
    def _decode(self, prompt_ids: list[int], params: dict[str, Any], max_tokens: int) -> tuple[list[int], list[float]]:
        temperature = float(params.get("temperature", 1.0))
        top_k = int(params.get("top_k", -1) or -1)
        top_p = float(params.get("top_p", 1.0))
        penalty = float(params.get("repetition_penalty", self.config.get("repetition_penalty", 1.0)))
        processed = self.config.logprobs_mode in (None, "processed_logprobs")
        ignore_eos = params.get("ignore_eos", self.config.ignore_eos)
        stop_ids = set(params.get("stop_token_ids") or ()) | (set() if ignore_eos else self.eos_token_ids)

        cache = DynamicCache()
        step_input = torch.tensor([prompt_ids])
        token_ids: list[int] = []
        log_probs: list[float] = []
        for _ in range(max_tokens):
            logits = self.model(input_ids=step_input, past_key_values=cache, use_cache=True).logits[0, -1]
            scores = process_logits(logits, prompt_ids + token_ids, temperature, top_k, top_p, penalty)
            if temperature <= 0:
                token = int(torch.argmax(scores))
            else:
                token = int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self.generator))
            reported = scores if processed else logits.float()
            log_probs.append(float(torch.log_softmax(reported, dim=-1)[token]))
            token_ids.append(token)
            if token in stop_ids:
                break
            step_input = torch.tensor([[token]])
        return token_ids, log_probs

    # ------------------------------------------------------------------ weights

    async def load_weights(self, weights: dict[str, torch.Tensor], global_steps: int | None = None) -> None:
        """Replace the model's weights with the actor's (HF parameter names, full tensors)."""
        async with self._lock:
            result = self.model.load_state_dict(weights, strict=False)
            tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
            missing = set(result.missing_keys) - tied
            if result.unexpected_keys or missing:
                raise RuntimeError(
                    f"actor weights do not fit the rollout model: unexpected {result.unexpected_keys}, "
                    f"missing {sorted(missing)}"
                )
            if tied:
                self.model.tie_weights()
            if global_steps is not None:
                self.global_steps = global_steps

    # ------------------------------------------------------------------ lifecycle (nothing to free on CPU)

    async def wake_up(self, tags: list[str] | None = None) -> None:
        pass

    async def sleep(self) -> None:
        pass

    async def clear_kv_cache(self) -> None:
        pass  # caches are per request

    async def release_kv_cache(self) -> None:
        pass

    async def resume_kv_cache(self) -> None:
        pass

    async def abort_all_requests(self, reject_request: bool = False, **kwargs: Any) -> dict[str, Any]:
        return {"aborted_count": 0, "request_ids": []}  # requests are short and run to completion

    async def resume_generation(self) -> None:
        pass

    async def start_profile(self, **kwargs: Any) -> None:
        pass

    async def stop_profile(self) -> None:
        pass
