"""Supervised warm start of a tiny policy on demonstration conversations (the assistant turns only).

A randomly initialised model never writes a well-formed tool call, so RL from it has nothing to
reinforce. The warm start teaches the format from demonstrations (``{"messages": [...], "tools": [...]}``
per JSONL line, rendered with the model's own chat template, as verl's agent loop renders prompts);
what the demonstrations leave random (e.g. which door, :mod:`steppo_verl.tasks.vault.prepare`) is left for RL.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase


def render(tokenizer: PreTrainedTokenizerBase, conversation: dict[str, Any]) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and a 0/1 mask of the tokens the policy itself writes.

    The written span of an assistant turn starts after the generation prompt (``<|im_start|>assistant``)
    and ends with its end-of-turn token, which is where rollout generation stops.
    """
    messages, tools = conversation["messages"], conversation.get("tools")
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    spans = []
    for turn, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(tokenizer.apply_chat_template(messages[:turn], tools=tools, tokenize=False,
                                                      add_generation_prompt=True))
            turn_text = tokenizer.apply_chat_template(messages[: turn + 1], tools=tools, tokenize=False)
            end = turn_text.rindex(tokenizer.eos_token) + len(tokenizer.eos_token)
            spans.append((start, end))
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    mask = [int(any(s <= begin < e for s, e in spans)) for begin, _ in encoded["offset_mapping"]]
    return encoded["input_ids"], mask


def warm_start(model_dir: str | Path, demos: str | Path, steps: int = 500, batch_size: int = 32, lr: float = 3e-3,
               seed: int = 0) -> list[float]:
    """Fine-tune the model in ``model_dir`` on the assistant turns of ``demos``; saves it in place.

    Returns the training loss of every step (mean cross-entropy per written token).
    """
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    with open(demos) as lines:
        examples = [render(tokenizer, json.loads(line)) for line in lines if line.strip()]
    if not examples:
        raise ValueError(f"warm start: {demos} holds no demonstrations")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    model.train()
    losses = []
    for _ in range(steps):
        input_ids, labels, attention = _batch(rng.sample(examples, min(batch_size, len(examples))),
                                              tokenizer.pad_token_id)
        loss = written_token_loss(model, input_ids, labels, attention)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.save_pretrained(model_dir)
    return losses


def written_token_loss(model: Any, input_ids: torch.Tensor, labels: torch.Tensor,
                       attention: torch.Tensor) -> torch.Tensor:
    """The causal LM loss of ``model(..., labels=labels).loss`` (mean cross-entropy of the next token where the
    label is not -100), with the output head applied at those positions only.

    Why: the policy writes ~8% of a demonstration's tokens (the rest is instructions, tool schema and
    observations); the full ``[B, T, vocab]`` logits the library computes cost as much as the model's body.
    """
    targets = labels[:, 1:]
    written = targets != -100  # [B, T - 1]: position t predicts token t + 1
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention).last_hidden_state  # [B, T, H]
    logits = model.get_output_embeddings()(hidden[:, :-1][written])  # [N, vocab], N written tokens
    return torch.nn.functional.cross_entropy(logits.float(), targets[written])


def _batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ``[B, T]`` ids, labels (-100 outside the written tokens) and attention mask."""
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id)
    labels = torch.full((len(examples), length), -100)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (ids, mask) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.where(torch.tensor(mask, dtype=torch.bool), torch.tensor(ids), -100)
    return input_ids, labels, attention
