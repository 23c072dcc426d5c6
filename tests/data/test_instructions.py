"""Instruction data: prompt/response and chat examples as one row each, labels on responses only,
truncation counted; the shipped examples and their generator."""
import json
import subprocess
import sys

import pytest
from datasets import Dataset, DatasetDict
from helpers import REPO, tree_digest
from transformers import AutoTokenizer

import tsld_ds.data.text
from tsld_ds.data import builtin_tokenizer_path, dataset_rows, instruction_rows, load_splits
from tsld_ds.data.instructions import IGNORE_INDEX
from tsld_ds.errors import EXIT_USAGE

# A ChatML-like template (as Qwen's): a system turn, then "<|im_start|>role\n...<|im_end|>\n".
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(builtin_tokenizer_path())


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_prompt_response_row_trains_on_the_response_and_its_eos_only(tokenizer):
    prompt, response = "Complete the verse: And God said,", " Let there be light."
    rows, counts = instruction_rows(Dataset.from_list([{"prompt": prompt, "response": response}]),
                                    tokenizer, 32)
    row = rows[0]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    real = ids(tokenizer, prompt + response) + [eos]  # the example's text tokenized whole
    assert row["input_ids"] == real + [pad] * (32 - len(real))
    trained = [i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX]
    assert [row["input_ids"][i] for i in trained] == [row["labels"][i] for i in trained]
    assert tokenizer.decode([row["labels"][i] for i in trained]) == " Let there be light.</s>"
    assert trained == list(range(trained[0], len(real)))  # one run, ending with the EOS
    assert tokenizer.decode(row["input_ids"][:trained[0]]) == prompt
    assert counts == {"examples": 1, "truncated": 0, "dropped": 0}


def test_truncation_is_counted_and_examples_without_a_response_token_dropped(tokenizer):
    long_prompt = "And God said, " * 20
    examples = Dataset.from_list([
        {"prompt": "Short:", "response": " and there was light."},             # fits
        {"prompt": "Short:", "response": " and there was light." * 10},        # cut in the response
        {"prompt": long_prompt, "response": " and there was light."},          # prompt fills it
    ])
    rows, counts = instruction_rows(examples, tokenizer, 16)
    assert counts == {"examples": 3, "truncated": 2, "dropped": 1}
    assert len(rows) == 2 and all(len(r["input_ids"]) == 16 for r in rows)
    assert all(label != IGNORE_INDEX for label in rows[1]["labels"][len(ids(tokenizer, "Short:")):])


@pytest.mark.parametrize("template", [CHATML, None])
def test_chat_messages_train_on_every_assistant_turn(template, tokenizer):
    chat = tokenizer.__class__.from_pretrained(builtin_tokenizer_path())
    chat.chat_template = template
    messages = [{"role": "system", "content": "Answer from the King James Bible."},
                {"role": "user", "content": "Who divided the light from the darkness?"},
                {"role": "assistant", "content": "God divided the light from the darkness."},
                {"role": "user", "content": "What did he call the light?"},
                {"role": "assistant", "content": "Day."}]
    rows, counts = instruction_rows(Dataset.from_list([{"messages": messages}]), chat, 256)
    assert counts["truncated"] == 0
    row = rows[0]
    trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
    text = chat.decode(trained)
    assert "God divided the light from the darkness." in text and "Day." in text
    assert "Who divided" not in text and "What did he call" not in text and "King James" not in text
    assert row["labels"] == [t if label != IGNORE_INDEX else IGNORE_INDEX
                             for t, label in zip(row["input_ids"], row["labels"])]


# A LLaMA-2-chat-like template that writes its own BOS before each exchange.
BOS_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + "
                "m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + eos_token }}"
                "{% endif %}{% endfor %}")


def test_instruction_rows_hold_the_chat_templates_special_tokens_only(llama_style_tokenizer,
                                                                       tokenizer):
    """Packed text takes a LLaMA tokenizer's BOS before each document; an instruction example
    does not: its special tokens are the chat template's own (one BOS per exchange here), and a
    prompt/response example has none before its prompt, as with the built-in tokenizer."""
    example = {"prompt": "Complete the verse: And God said,", "response": " Let there be light."}
    llama_rows, _ = instruction_rows(Dataset.from_list([example]), llama_style_tokenizer, 32)
    builtin_rows, _ = instruction_rows(Dataset.from_list([example]), tokenizer, 32)
    assert llama_rows["input_ids"] == builtin_rows["input_ids"]
    assert llama_rows[0]["input_ids"][0] != llama_style_tokenizer.bos_token_id

    llama_style_tokenizer.chat_template = BOS_TEMPLATE
    messages = [{"role": "user", "content": "Who made light?"},
                {"role": "assistant", "content": "God."},
                {"role": "user", "content": "When?"},
                {"role": "assistant", "content": "In the beginning."}]
    try:
        rows, _ = instruction_rows(Dataset.from_list([{"messages": messages}]),
                                   llama_style_tokenizer, 64)
    finally:
        llama_style_tokenizer.chat_template = None
    row = [t for t in rows[0]["input_ids"] if t != llama_style_tokenizer.pad_token_id]
    assert row[0] == llama_style_tokenizer.bos_token_id
    assert row.count(llama_style_tokenizer.bos_token_id) == 2


def test_a_conversation_without_an_assistant_turn_is_refused(tokenizer):
    examples = Dataset.from_list([{"messages": [{"role": "user", "content": "Hello"}]}])
    with pytest.raises(ValueError, match="no assistant message"):
        instruction_rows(examples, tokenizer, 16)


def test_jsonl_columns_decide_the_kind(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl",
                        [{"prompt": f"p{i}", "response": f"r{i}", "id": i} for i in range(20)])
    chat = write_jsonl(tmp_path / "chat.jsonl",
                       [{"messages": [{"role": "user", "content": f"q{i}"},
                                      {"role": "assistant", "content": f"a{i}"}]}
                        for i in range(20)])
    train, validation, kind = load_splits(str(pairs))
    assert kind == "prompt/response" and train.column_names == ["prompt", "response"]
    assert len(train) + len(validation) == 20
    assert load_splits(str(chat))[2] == "messages"
    assert load_splits(str(pairs), text_column="prompt")[2] == "text"  # read as documents
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "response": 3}] * 4)
    with pytest.raises(ValueError, match=r"columns \['response'\] .* must hold text"):
        load_splits(str(bad))
    bad_chat = write_jsonl(tmp_path / "bad_chat.jsonl", [{"messages": ["hello"]}] * 4)
    with pytest.raises(ValueError, match="must be a list of"):
        load_splits(str(bad_chat))


def chat(i):
    return {"messages": [{"role": "user", "content": f"q{i}"},
                         {"role": "assistant", "content": f"a{i}"}]}


@pytest.mark.parametrize("example, lacking", [
    ({"prompt": "p", "response": None}, "has a null 'response'"),
    ({"prompt": None, "response": "r"}, "has a null 'prompt'"),
    ({"prompt": "p"}, "has no 'response'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
     "has a null 'content' in message 2"),
    ({"messages": None}, "has a null 'messages'"),
], ids=["null response", "null prompt", "no response", "null content", "null messages"])
def test_an_example_with_a_null_field_is_named_by_its_file_and_line(
        example, lacking, tmp_path, training_loads_rows):
    """Refused in one line by the training command's loading, before tokenizing, naming the
    file and 1-based line of the first example lacking a field; nothing written beside it."""
    good = chat if "messages" in example else lambda i: {"prompt": f"p{i}", "response": f"r{i}"}
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [good(i) for i in range(8)])
    validation = write_jsonl(data / "validation.jsonl", [good(i) for i in range(4)])
    lines = validation.read_text().splitlines()
    lines.insert(2, json.dumps(example))
    validation.write_text("\n".join(lines) + "\n")
    before = tree_digest(data)
    assert training_loads_rows(data) == (
        EXIT_USAGE, f"error: --dataset {data}: {validation} line 3 {lacking}\n")
    assert tree_digest(data) == before


def test_an_example_with_a_null_field_not_from_a_file_is_named_by_its_row(monkeypatch):
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(6)]
    rows[4]["response"] = None
    monkeypatch.setattr(tsld_ds.data.text, "load_dataset",
                        lambda name, config: DatasetDict(train=Dataset.from_list(rows)))
    with pytest.raises(ValueError) as refused:
        load_splits("org/pairs")
    assert str(refused.value) == "dataset 'org/pairs train' row 4 (from 0) has a null 'response'"


def test_shipped_examples_are_what_their_generator_writes(tmp_path, tokenizer):
    shipped = REPO / "tsld_ds" / "assets" / "kjv-instructions"
    task = REPO / "tests" / "evaluation" / "lm_eval_task" / "kjv_continuation.jsonl"
    subprocess.run([sys.executable, str(REPO / "launch" / "build_instructions.py"),
                    "--instructions_dir", str(tmp_path),
                    "--task_file", str(tmp_path / "task.jsonl")],
                   check=True, capture_output=True)
    for name in ("train.jsonl", "validation.jsonl"):
        assert (tmp_path / name).read_bytes() == (shipped / name).read_bytes()
    assert (tmp_path / "task.jsonl").read_bytes() == task.read_bytes()
    lines = []
    train, validation = dataset_rows(str(shipped), tokenizer, 64, log=lines.append)
    assert (len(train), len(validation)) == (4000, 400)
    assert lines[0].startswith(f"{shipped} train: 4000 prompt/response examples, one per row of "
                               "64 tokens; ")
    first = json.loads((shipped / "train.jsonl").read_text().splitlines()[0])
    assert first == {"prompt": "Complete the verse: And God said, Let there be light:",
                     "response": " and there was light."}
