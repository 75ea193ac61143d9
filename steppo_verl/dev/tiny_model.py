"""A tiny Qwen2-architecture model and tokenizer built locally, for CPU runs and tests (no hub).

    python -m steppo_verl.dev.tiny_model --out /tmp/tiny-qwen2

The tokenizer is a byte-level BPE trained on a few kilobytes of text, with ChatML special tokens
and a chat template that renders tools, hermes-style ``<tool_call>`` assistant messages and
``tool`` messages the way Qwen2.5's template does, so verl's hermes tool parser and Continuous
Token builder for ``qwen2`` accept it. The weights are random; load the directory with
``AutoTokenizer`` / ``AutoModelForCausalLM`` and ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Hermes tool-call markers are ordinary added tokens in Qwen2.5 (one id each, decoded as text).
MARKUP_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<answer>", "</answer>"]

CHAT_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}{% else %}You are a helpful assistant.{% endif %}

# Tools
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
Call a tool with <tool_call>{"name": <name>, "arguments": <json>}</tool_call>.<|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}
{%- elif message.role == 'assistant' %}<|im_start|>assistant
{{ message.content }}
{%- for call in message.tool_calls or [] %}
{%- set arguments = call.function.arguments %}
<tool_call>{"name": "{{ call.function.name }}", "arguments": \
{% if arguments is string %}{{ arguments }}{% else %}{{ arguments | tojson }}{% endif %}}</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

_TRAINING_TEXT = """\
Answer the question. Use the search tool to find passages, then give the answer inside answer tags.
Question: Which city is the capital of France? Doc 1 (Title: Paris) Paris is the capital of France.
{"name": "search", "arguments": {"query_list": ["capital of France", "Paris population"]}}
The Eiffel Tower is in Paris. Were Scott Derrickson and Ed Wood of the same nationality? yes no
The quick brown fox jumps over the lazy dog. 0123456789 the a an of in on at to for with by from
system user assistant tool Search failed: timeout. Unknown function. Invalid JSON in arguments.
"""


def build_tiny_tokenizer(
    vocab_size: int = 600, extra_text: str = "", extra_tokens: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ChatML special tokens and a tool-aware chat template.

    ``extra_text`` (e.g. a task's rendered demonstrations) joins the training text, so that the task's
    words become single tokens; ``extra_tokens`` become one token each wherever they occur, like
    ``<tool_call>`` (e.g. a task's fixed tool-call boilerplate, so that a tiny model spends its capacity
    on the decision inside the call rather than on spelling JSON).
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_TRAINING_TEXT] * 4 + [extra_text], trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    wrapped.add_tokens(MARKUP_TOKENS + list(extra_tokens))
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_tiny_model(
    out_dir: str | Path,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    extra_text: str = "",
    extra_tokens: Sequence[str] = (),
) -> Path:
    """Write a random Qwen2 model and the tiny tokenizer (``extra_*``: see there) to ``out_dir``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    tokenizer = build_tiny_tokenizer(extra_text=extra_text, extra_tokens=extra_tokens)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory to write the model and tokenizer to")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warm-start", type=Path, metavar="DEMOS_JSONL",
                        help="demonstrations: their text joins the tokenizer's, then the model is fine-tuned on them")
    parser.add_argument("--warm-start-steps", type=int, default=500)
    parser.add_argument("--added-tokens", type=Path, metavar="JSON", help="a JSON list of strings to make one token each")
    args = parser.parse_args(argv)
    extra_text = demonstration_text(args.warm_start) if args.warm_start else ""
    extra_tokens = json.loads(args.added_tokens.read_text()) if args.added_tokens else ()
    # Built and warm-started beside --out, then moved there: the recipes take an existing --out for a finished
    # model, so an interrupted warm start must not leave one behind.
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    build_tiny_model(partial, args.hidden_size, args.layers, args.seed, extra_text, extra_tokens)
    if args.warm_start:
        from steppo_verl.dev.warm_start import warm_start

        losses = warm_start(partial, args.warm_start, steps=args.warm_start_steps, seed=args.seed)
        print(f"warm start on {args.warm_start}: loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    print(f"wrote a tiny Qwen2 model and tokenizer to {out}")


def demonstration_text(demos: Path, limit: int = 200) -> str:
    """The first ``limit`` demonstrations rendered with the chat template: tokenizer training text."""
    template = build_tiny_tokenizer()
    with open(demos) as lines:
        conversations = [json.loads(line) for line, _ in zip(lines, range(limit)) if line.strip()]
    return "".join(
        template.apply_chat_template(c["messages"], tools=c.get("tools"), tokenize=False) for c in conversations
    )


if __name__ == "__main__":
    main()
