"""What a tokenizer adds to a text by default, saving a tokenizer so that every reader sees that,
and checking that a student and a teacher read token ids the same way.

Training tokenizes each document as its tokenizer does by default (`tsld_ds.data.packing`), so
a tokenizer the project writes must say, to every reader, exactly what it adds. Distillation
feeds both models the same ids and compares their logits position by position and vocabulary
entry by entry, so the two tokenizers must agree on every id.
"""
from __future__ import annotations

import json
from pathlib import Path

_SPECIAL_TOKEN_IDS = ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id")
_PROBE = "In the beginning"


def special_tokens_added(tokenizer) -> tuple[list[int], list[int]]:
    """(ids put before a text, ids put after it) when `tokenizer` tokenizes it by default: what
    `tokenizer(text)` adds to `tokenizer(text, add_special_tokens=False)`. LLaMA's: [BOS] and
    []; OPT's: [</s>] and []; GPT-2's and the built-in one's: [] and []."""
    plain = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    default = tokenizer(_PROBE)["input_ids"]
    for start in range(len(default) - len(plain) + 1):
        if default[start:start + len(plain)] == plain:
            return default[:start], default[start + len(plain):]
    raise ValueError(f"tokenizer {type(tokenizer).__name__} tokenizes {_PROBE!r} into {default} "
                     f"by default, which does not hold its ids without special tokens {plain}")


def bos_eos_added(tokenizer) -> tuple[bool, bool] | None:
    """(whether a BOS goes before a text, whether an EOS goes after it) when the tokenizer's
    default special tokens are just those, the two flags most readers know (transformers'
    `add_bos_token`/`add_eos_token`, llama.cpp's keys); None when it adds anything else."""
    before, after = special_tokens_added(tokenizer)
    if before not in ([], [tokenizer.bos_token_id]) or after not in ([], [tokenizer.eos_token_id]):
        return None
    return bool(before), bool(after)


def save_tokenizer(tokenizer, directory) -> None:
    """`tokenizer.save_pretrained(directory)`, with tokenizer_config.json's `add_bos_token` and
    `add_eos_token` saying what it adds by default. transformers 5 reads that from
    tokenizer.json's post-processor and leaves the keys out; transformers 4's LLaMA tokenizers
    and llama.cpp's converter (gguf-py's SpecialVocab) read the keys first, and to the former a
    missing `add_bos_token` means true. A tokenizer that adds anything else than a BOS before
    and an EOS after a text keeps what save_pretrained wrote (its post-processor says it)."""
    tokenizer.save_pretrained(directory)
    added = bos_eos_added(tokenizer)
    if added is None:
        return
    path = Path(directory) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(add_bos_token=added[0], add_eos_token=added[1])
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                    encoding="utf-8")


def check_tokenizers_match(student_tokenizer, teacher_tokenizer) -> None:
    """Raise ValueError naming the first difference in vocabulary size, token -> id mapping or
    special token ids."""
    if len(student_tokenizer) != len(teacher_tokenizer):
        raise ValueError(
            f"tokenizers differ in vocabulary size: student {len(student_tokenizer)}, "
            f"teacher {len(teacher_tokenizer)}"
        )
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    differing = sorted(t for t in student_vocab.keys() | teacher_vocab.keys()
                       if student_vocab.get(t) != teacher_vocab.get(t))
    if differing:
        examples = ", ".join(
            f"{t!r}: student {student_vocab.get(t)}, teacher {teacher_vocab.get(t)}"
            for t in differing[:5]
        )
        raise ValueError(f"tokenizers map {len(differing)} tokens to different ids, "
                         f"e.g. {examples}")
    for name in _SPECIAL_TOKEN_IDS:
        student_id, teacher_id = getattr(student_tokenizer, name), getattr(teacher_tokenizer, name)
        if student_id != teacher_id:
            raise ValueError(f"tokenizers differ in {name}: student {student_id}, "
                             f"teacher {teacher_id}")
