"""A small byte-level BPE tokenizer with a Qwen-style chat template, trained offline.

Digits are always split into single tokens (arithmetic is learned digit by digit). The
tokenizer is trained on chat-formatted text so that role names and the template's markers
become single tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS_CHAT, EOS_CHAT = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# Kept as ordinary (non-special) added tokens so that decoding with skip_special_tokens keeps them.
REASONING_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")

# Qwen2 chat format. Written with explicit '\n' strings so Jinja whitespace control is not involved.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def train_chat_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` (already chat-formatted) and wrap it for transformers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS_CHAT, EOS_CHAT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_CHAT,
        pad_token=PAD,
        additional_special_tokens=[BOS_CHAT],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=1024,
    )
    fast.add_tokens(list(REASONING_TOKENS))
    return fast


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat template applied in plain Python (for building tokenizer training text)."""
    out = "".join(f"{BOS_CHAT}{m['role']}\n{m['content']}{EOS_CHAT}\n" for m in messages)
    return out + (f"{BOS_CHAT}assistant\n" if add_generation_prompt else "")
