"""Check that a student and a teacher read token ids the same way.

Distillation feeds both models the same ids and compares their logits position by position and
vocabulary entry by entry, so the two tokenizers must agree on every id.
"""

_SPECIAL_TOKEN_IDS = ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id")


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
            f"{t!r}: student {student_vocab.get(t)}, teacher {teacher_vocab.get(t)}" for t in differing[:5]
        )
        raise ValueError(f"tokenizers map {len(differing)} tokens to different ids, e.g. {examples}")
    for name in _SPECIAL_TOKEN_IDS:
        student_id, teacher_id = getattr(student_tokenizer, name), getattr(teacher_tokenizer, name)
        if student_id != teacher_id:
            raise ValueError(f"tokenizers differ in {name}: student {student_id}, teacher {teacher_id}")
