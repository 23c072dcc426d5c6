"""Instruction data: examples with a `prompt` and a `response`, or chat `messages`, trained on the
response only (docs/method.md §2.4).

Each example is one row of exactly `max_length` tokens: its prompt with labels -100, its response
(ended by EOS) with labels equal to the tokens, then padding with labels -100. One example per
row, not packed, because:
- TSLD's token scale is a softmax over one sequence's positions: in a row of its own an example's
  response tokens are exactly that sequence, with no other example's tokens in its softmax;
- with right padding and causal attention no real token sees a pad, and no example sees another,
  so the model needs neither an attention mask nor document-aware attention.
The price is the padding's compute, which `--block_size` (alias `--max_length`) bounds.

An example's text is tokenized whole, as the model reads a prompt followed by its reply (a
tokenizer that prepends a space, as Llama-2's, would put a spurious one before a response
tokenized alone); a token is trained when it holds a character of a response. The only special
tokens are those the text holds: a chat template writes its own (a BOS where it has one), and
the tokenizer adds none of its defaults (packed text, `tsld_ds.data.packing`, takes them). Chat
`messages` are rendered with the tokenizer's chat template, or a plain `role: content` one when
it has none; every assistant turn is a response.
"""
from __future__ import annotations

from datasets import Dataset, Features, Sequence, Value
from jinja2 import TemplateError

IGNORE_INDEX = -100
PROMPT, RESPONSE, MESSAGES = "prompt", "response", "messages"
# For tokenizers without a chat template: "role: content" lines, EOS ending each assistant turn
# so the model learns where a reply ends (the line break opens the next turn, not the reply's).
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if not loop.first %}{{ '\n' }}{% endif %}"
    "{{ message['role'] + ': ' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ ('\n' if messages else '') + 'assistant: ' }}{% endif %}"
)


def instruction_format(columns) -> str | None:
    """"messages", "prompt/response", or None for a dataset of plain text."""
    if MESSAGES in columns:
        return MESSAGES
    if PROMPT in columns and RESPONSE in columns:
        return f"{PROMPT}/{RESPONSE}"
    return None


def chat_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """(text, trained) pieces of a rendered conversation: every assistant turn trained, the rest
    (system, user turns and the template's own markup before each reply) not."""
    template = None if tokenizer.chat_template else PLAIN_CHAT_TEMPLATE

    def render(turns, prompt):
        try:
            return tokenizer.apply_chat_template(turns, chat_template=template, tokenize=False,
                                                 add_generation_prompt=prompt)
        except TemplateError as e:  # e.g. "roles must alternate user/assistant"
            raise ValueError(f"the chat template refuses a conversation: {e}") from None

    segments, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[:i + 1], False)
        if not (before.startswith(done) and through.startswith(before)):
            raise ValueError("the chat template does not render a conversation as a prefix of "
                             "its continuation, so its assistant turns cannot be told apart")
        segments += [(before[len(done):], False), (through[len(before):], True)]
        done = through
    if not segments:
        raise ValueError("a conversation has no assistant message to train on")
    return segments


def _tokens(segments, tokenizer) -> tuple[list[int], list[int]]:
    """Ids of the segments' joint text, and labels: a token is trained when it holds a character
    of a trained segment (one that straddles a prompt's end, as "▁God" after "assistant:", is
    what the model must emit to begin the reply)."""
    text, spans = "", []
    for piece, trained in segments:
        if trained:
            spans.append((len(text), len(text) + len(piece)))
        text += piece
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                        verbose=False)
    labels = [token if any(start < b and end > a for a, b in spans) else IGNORE_INDEX
              for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"])]
    return encoded["input_ids"], labels


def instruction_rows(examples: Dataset, tokenizer, max_length: int, *,
                     desc: str = "dataset") -> tuple[Dataset, dict]:
    """(rows with "input_ids" and "labels" of `max_length` tokens each, counts): counts says how
    many examples were truncated to `max_length` and how many were dropped because nothing of
    their response was left."""
    fmt = instruction_format(examples.column_names)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token to end "
                         "responses with")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def tokenize(example):
        if fmt == MESSAGES:
            segments = chat_segments(example[MESSAGES], tokenizer)
            input_ids, labels = _tokens(segments, tokenizer)
        else:
            input_ids, labels = _tokens([(example[PROMPT], False), (example[RESPONSE], True)],
                                        tokenizer)
            input_ids, labels = input_ids + [eos], labels + [eos]
        truncated = len(input_ids) > max_length
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        kept = any(label != IGNORE_INDEX for label in labels[1:])  # a predicted response token
        padding = max_length - len(input_ids)
        return {"input_ids": input_ids + [pad] * padding,
                "labels": labels + [IGNORE_INDEX] * padding,
                "truncated": truncated, "kept": kept}

    features = Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
                         "truncated": Value("bool"), "kept": Value("bool")})
    rows = examples.map(tokenize, remove_columns=examples.column_names, features=features,
                        desc=f"Tokenizing {desc}")
    kept = rows["kept"]
    counts = {"examples": len(rows), "truncated": sum(rows["truncated"]),
              "dropped": len(rows) - sum(kept)}
    rows = rows.select([i for i, keep in enumerate(kept) if keep])
    if len(rows) == 0:
        raise ValueError(f"{desc} has no example with a response token within {max_length} "
                         "tokens: use a larger --block_size")
    return rows.remove_columns(["truncated", "kept"]), counts
