"""Instruction data and an lm-eval task made from the built-in corpus (no download, deterministic).

Every verse of tsld_ds/assets/kjv/{train,validation}.txt long enough to split (at its first clause
mark with at least 4 words on each side, else at its middle word) becomes an example:

- tsld_ds/assets/kjv-instructions/{train,validation}.jsonl: {"prompt": "Complete the verse: <first
  part>", "response": " <rest>"}, a sample of `--train_examples` / `--validation_examples`
  verses. Train with `--dataset tsld_ds/assets/kjv-instructions`.
- tests/evaluation/lm_eval_task/kjv_continuation.jsonl: validation verses as a multiple-choice
  task for lm-eval (kjv_continuation.yaml beside it): the verse's own rest among three rests of
  other verses, `label` its index.

Usage: python launch/build_instructions.py   (rewrites both, byte-identical on every run)
"""
import argparse
import json
import random
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "tsld_ds" / "assets" / "kjv"
INSTRUCTIONS = REPO / "tsld_ds" / "assets" / "kjv-instructions"
LM_EVAL_TASK = REPO / "tests" / "evaluation" / "lm_eval_task" / "kjv_continuation.jsonl"
PROMPT = "Complete the verse: "
MIN_WORDS = 4  # on each side of the split


def split_verse(verse: str):
    """(first part, rest) at the first clause mark with MIN_WORDS words on each side, else at
    the middle word; None for a verse shorter than 2 * MIN_WORDS words."""
    words = verse.split()
    if len(words) < 2 * MIN_WORDS:
        return None
    for i in range(MIN_WORDS, len(words) - MIN_WORDS + 1):
        if re.search(r"[,;:]$", words[i - 1]):
            return " ".join(words[:i]), " ".join(words[i:])
    middle = len(words) // 2
    return " ".join(words[:middle]), " ".join(words[middle:])


def verses(split: str) -> list[tuple[str, str]]:
    lines = (CORPUS / f"{split}.txt").read_text(encoding="utf-8").splitlines()
    return [parts for line in lines if line.strip() and (parts := split_verse(line.strip()))]


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {path}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train_examples", type=int, default=4000,
                   help="training examples (default: %(default)s)")
    p.add_argument("--validation_examples", type=int, default=400,
                   help="validation examples (default: %(default)s)")
    p.add_argument("--task_examples", type=int, default=100,
                   help="lm-eval task questions (default: %(default)s)")
    p.add_argument("--instructions_dir", type=Path, default=INSTRUCTIONS,
                   help="where train.jsonl and validation.jsonl go (default: %(default)s)")
    p.add_argument("--task_file", type=Path, default=LM_EVAL_TASK,
                   help="the lm-eval task's JSONL (default: %(default)s)")
    args = p.parse_args(argv)
    rng = random.Random(0)
    split_verses = {split: verses(split) for split in ("train", "validation")}
    for split, count in (("train", args.train_examples),
                         ("validation", args.validation_examples)):
        chosen = sorted(rng.sample(range(len(split_verses[split])), count))
        write_jsonl(args.instructions_dir / f"{split}.jsonl",
                    ({"prompt": PROMPT + split_verses[split][i][0],
                      "response": " " + split_verses[split][i][1]} for i in chosen))
    pool = split_verses["validation"]
    questions = []
    for i in sorted(rng.sample(range(len(pool)), args.task_examples)):
        others = rng.sample([j for j in range(len(pool)) if pool[j][1] != pool[i][1]], 3)
        choices = [pool[j][1] for j in others]
        label = rng.randrange(4)
        choices.insert(label, pool[i][1])
        questions.append({"context": pool[i][0], "choices": choices, "label": label})
    write_jsonl(args.task_file, questions)


if __name__ == "__main__":
    main()
