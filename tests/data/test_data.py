"""Data: loading corpora, packing into blocks (each document as its tokenizer tokenizes it by
default), resumable sharded sampling, the built-in assets and what stock readers make of the
shipped tokenizers."""

import json
import re

import pytest
import torch
from datasets import Dataset, DatasetDict
from helpers import tree_digest
from transformers import AutoTokenizer

import tsld_ds.data.text
from tsld_ds.data import (
    BUILTIN_DATASET,
    EpochBatches,
    ResumableDistributedSampler,
    builtin_corpus_dir,
    builtin_tokenizer_path,
    check_dataset_source,
    check_tokenizers_match,
    dataset_rows,
    document_separator,
    load_text_splits,
    make_dataloader,
    save_tokenizer,
    special_tokens_added,
    tokenize_and_pack,
)
from tsld_ds.errors import EXIT_USAGE
from tsld_ds.models import BUILTIN_MODEL

GENESIS_1_1 = "In the beginning God created the heaven and the earth."


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(builtin_tokenizer_path())


def texts(dataset):
    return list(dataset["text"])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --- built-in corpus and tokenizer ---------------------------------------------------------------

def test_builtin_corpus_is_the_king_james_bible():
    corpus = builtin_corpus_dir()
    train_bytes = (corpus / "train.txt").stat().st_size
    validation_bytes = (corpus / "validation.txt").stat().st_size
    assert 3_500_000 < train_bytes < 4_500_000
    assert 0.03 < validation_bytes / (train_bytes + validation_bytes) < 0.07
    assert (corpus / "train.txt").read_text().startswith(GENESIS_1_1 + "\n")
    assert "public domain" in (corpus / "SOURCE.md").read_text()

    train, validation = load_text_splits()
    assert (len(train), len(validation)) == (1130, 59)  # chapters: every 20th is validation
    genesis_1 = train[0]["text"].split("\n")
    assert genesis_1[0] == GENESIS_1_1 and len(genesis_1) == 31
    assert train[-1]["text"].endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    assert not any(re.match(r"\w+\d+:\d+ ", line) for line in genesis_1)  # references stripped


def test_builtin_tokenizer_loads_as_llama_and_round_trips(tokenizer):
    assert type(tokenizer).__name__ == "LlamaTokenizer"
    assert len(tokenizer) == 4096
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
            tokenizer.pad_token_id) == (0, 1, 2, 3)
    ids = tokenizer(GENESIS_1_1)["input_ids"]  # by default: no BOS, as training reads text
    assert tokenizer.bos_token_id not in ids and len(ids) < 15
    assert tokenizer.decode(ids) == GENESIS_1_1
    # Byte fallback: text far from the corpus still encodes without <unk> and decodes exactly.
    odd = "  Größe: 42 €\tend 😀\n"
    odd_ids = tokenizer(odd, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in odd_ids
    assert tokenizer.decode(odd_ids) == odd


SHIPPED_TOKENIZERS = [builtin_tokenizer_path(), BUILTIN_MODEL]


@pytest.mark.parametrize("directory", SHIPPED_TOKENIZERS, ids=["tokenizer", "tiny-llama-kjv"])
def test_stock_readers_of_the_shipped_tokenizers_tokenize_as_training_does(directory):
    """What users load the shipped tokenizers with, each with its defaults: stock transformers'
    AutoTokenizer, the tokenizers library on tokenizer.json alone (as vLLM, TGI...), and
    llama.cpp's converter (gguf-py's SpecialVocab: whether a BOS/EOS is added). On the built-in
    validation split each gives the ids training packs (documents separated by EOS)."""
    import gguf
    from tokenizers import Tokenizer

    _, validation = load_text_splits(BUILTIN_DATASET)
    documents = texts(validation)
    auto = AutoTokenizer.from_pretrained(directory)
    eos = auto.eos_token_id
    training = tokenize_and_pack(validation, auto, block_size=1)["input_ids"]  # the whole stream
    training = [row[0] for row in training]
    by_auto = [t for ids in auto(documents)["input_ids"] for t in ids + [eos]]
    raw = Tokenizer.from_file(str(f"{directory}/tokenizer.json"))
    by_raw = [t for encoding in raw.encode_batch(documents) for t in encoding.ids + [eos]]
    assert by_auto == by_raw == training
    special = gguf.SpecialVocab(directory, load_merges=False)
    assert (special.add_special_token.get("bos"), special.add_special_token.get("eos")) \
        == (False, False)


def test_the_builtin_runs_ids_are_todays(tokenizer):
    """The default run's rows (the built-in corpus, block 128, through `dataset_rows` with the
    built-in model's tokenizer) are those of the convention before each document was tokenized
    with its tokenizer's defaults: without special tokens, followed by EOS (the shipped
    tokenizers then added a BOS by default, which that call left out; the vocabulary and merges
    are unchanged). So the default run's figures do not move."""
    shipped = AutoTokenizer.from_pretrained(BUILTIN_MODEL)
    train, validation = dataset_rows(BUILTIN_DATASET, shipped, 128, seed=42)
    for rows, split in zip((train, validation), load_text_splits(BUILTIN_DATASET)):
        ids = tokenizer(texts(split), add_special_tokens=False)["input_ids"]
        stream = [t for doc in ids for t in doc + [tokenizer.eos_token_id]]
        blocks = [stream[i:i + 128] for i in range(0, len(stream) - 127, 128)]
        assert rows["input_ids"] == blocks


# --- load_text_splits ----------------------------------------------------------------------------

def test_txt_file_documents_are_blank_line_separated_and_validation_is_carved(tmp_path):
    paragraphs = [f"document {i} line one\ndocument {i} line two" for i in range(40)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs) + "\n\n\n")

    train, validation = load_text_splits(str(path), seed=0)
    assert train.column_names == validation.column_names == ["text"]
    assert len(validation) == 2
    assert sorted(texts(train) + texts(validation)) == sorted(paragraphs)
    assert texts(load_text_splits(str(path), seed=0)[1]) == texts(validation)


def test_jsonl_file_uses_its_only_string_column(tmp_path):
    rows = [{"id": i, "sentence": f"sentence number {i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "data.jsonl", rows)

    train, validation = load_text_splits(str(path), validation_split=0.1)
    assert train.column_names == ["text"]
    assert sorted(texts(train) + texts(validation)) == sorted(r["sentence"] for r in rows)


def test_text_column_errors_list_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl",
                       [{"title": f"t{i}", "body": f"b{i}"} for i in range(5)])
    with pytest.raises(ValueError, match=r"(?s)cannot tell.*title.*body.*text_column"):
        load_text_splits(str(path))
    with pytest.raises(ValueError, match=r"no column 'content'.*title.*body"):
        load_text_splits(str(path), text_column="content")
    train, _ = load_text_splits(str(path), text_column="body")
    assert all(t.startswith("b") for t in texts(train))


def test_directory_with_train_and_validation_files(tmp_path):
    (tmp_path / "train.txt").write_text("first train doc\n\nsecond train doc\n")
    (tmp_path / "validation.txt").write_text("the validation doc\n")
    (tmp_path / "README.md").write_text("not data")

    train, validation = load_text_splits(str(tmp_path))
    assert texts(train) == ["first train doc", "second train doc"]
    assert texts(validation) == ["the validation doc"]


def test_directory_without_split_names_is_all_training_data(tmp_path):
    for shard in range(2):
        write_jsonl(tmp_path / f"shard{shard}.jsonl",
                    [{"text": f"doc {shard}-{i}"} for i in range(10)])
    train, validation = load_text_splits(str(tmp_path))
    assert (len(train), len(validation)) == (19, 1)


def test_hub_dataset_uses_its_splits_and_text_column(monkeypatch):
    def fake_hub(name, config):
        assert (name, config) == ("ptb_text_only", "penn_treebank")
        split = lambda n: Dataset.from_dict({"sentence": [f"s{i}" for i in range(n)]})  # noqa: E731
        return DatasetDict(train=split(30), validation=split(5), test=split(5))

    monkeypatch.setattr(tsld_ds.data.text, "load_dataset", fake_hub)
    train, validation = load_text_splits("ptb_text_only", "penn_treebank")
    assert (len(train), len(validation)) == (30, 5)
    assert train.column_names == ["text"]


def test_missing_path_and_unknown_file_type(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_text_splits(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_splits("./no/such/dir")
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"unsupported file type \.csv"):
        load_text_splits(str(csv))
    with pytest.raises(ValueError, match="unknown built-in dataset"):
        load_text_splits("builtin:shakespeare")


def test_empty_data_are_errors(tmp_path):
    (tmp_path / "train.txt").write_text("\n\n  \n")
    (tmp_path / "validation.txt").write_text("some text\n")
    with pytest.raises(ValueError, match="has no text"):
        load_text_splits(str(tmp_path))
    (tmp_path / "train.txt").write_text("")
    with pytest.raises(ValueError, match="train.txt'] are empty"):
        load_text_splits(str(tmp_path))
    (tmp_path / "notes").mkdir()
    with pytest.raises(FileNotFoundError, match="has no .txt, .json or .jsonl data files"):
        load_text_splits(str(tmp_path / "notes"))


@pytest.mark.parametrize("case", ["malformed line", "binary file"])
def test_an_unreadable_json_lines_file_is_named_with_its_line(case, tmp_path, training_loads_rows):
    """Refused in one line by the training command's loading, naming the file and, for a line
    that is not JSON, its 1-based line (the datasets library counts rows from the start of the
    block it read, blank lines left out); nothing is written beside the data."""
    data = tmp_path / "data"
    data.mkdir()
    path = data / "train.jsonl"
    if case == "malformed line":
        lines = [json.dumps({"text": f"verse {i}"}) for i in range(200)]
        lines[1] = ""
        lines[150] = '{"text": "verse 150", "n": }'
        path.write_text("\n".join(lines) + "\n")
        message = f"{path} line 151 is not valid JSON: Expecting value at column 28"
    else:
        path.write_bytes(bytes(range(256)) * 4)
        message = f"{path} is not UTF-8 text: byte 128 (0x80) cannot be decoded"
    before = tree_digest(data)
    assert training_loads_rows(data) == (EXIT_USAGE, f"error: --dataset {data}: {message}\n")
    assert tree_digest(data) == before


@pytest.mark.parametrize("files, error, message", [
    ({"data.csv": "a,b\n1,2\n"}, ValueError,
     r"unsupported file type \.csv in \[.*data\.csv'\]: use \.txt \(documents separated by "
     r"blank lines\), \.json or \.jsonl$"),
    ({"a.csv": "a\n", "b.csv": "b\n"}, ValueError,
     r"holds train files of a type not read \(a\.csv, b\.csv\): use \.txt"),
    ({"train.jsonl": '{"text": "t"}\n', "validation.csv": "v\n"}, ValueError,
     r"holds validation files of a type not read \(validation\.csv\): use \.txt"),
    ({"validation.txt": "v\n"}, ValueError,
     r"has no 'train' split; its splits are \['validation'\]"),
    ({"train.txt": "t\n", "validation.jsonl": '{"text": "v"}\n'}, ValueError,
     r"data files mix \.txt and \.json/\.jsonl"),
    ({"train.txt": ""}, ValueError, r"train\.txt'\] are empty"),
    ({}, FileNotFoundError, "has no .txt, .json or .jsonl data files"),
], ids=["csv file", "csv directory", "csv validation", "no train", "mixed", "empty", "no files"])
def test_check_dataset_source_refuses_what_the_loader_cannot_read(files, error, message, tmp_path,
                                                                  monkeypatch):
    """Before any data is read (training's pre-flight, before a process group starts): a
    dataset of a format the loader does not read, or that it would refuse, with the loader's
    message; nothing is written beside the data."""
    monkeypatch.setattr(tsld_ds.data.text, "load_dataset", no_loading)
    data = tmp_path / "data"
    data.mkdir()
    for name, text in files.items():
        (data / name).write_text(text)
    source = data / "data.csv" if "data.csv" in files else data
    before = tree_digest(data)
    with pytest.raises(error, match=message):
        check_dataset_source(source)
    with pytest.raises(error, match=message):  # the loader's own refusal, also before reading
        load_text_splits(source)
    assert tree_digest(data) == before


def test_check_dataset_source_accepts_what_the_loader_reads_without_reading_it(tmp_path,
                                                                              monkeypatch):
    monkeypatch.setattr(tsld_ds.data.text, "load_dataset", no_loading)
    (tmp_path / "train.txt").write_text("first train doc\n")
    (tmp_path / "validation.txt").write_text("the validation doc\n")
    (tmp_path / "README.md").write_text("not data")  # beside split-named files: not data
    for source in (tmp_path, tmp_path / "train.txt", BUILTIN_DATASET, "org/some-hub-dataset"):
        check_dataset_source(source)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_dataset_source(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="unknown built-in dataset"):
        check_dataset_source("builtin:shakespeare")


def no_loading(*args, **kwargs):
    raise AssertionError("check_dataset_source read data")


# --- tokenize_and_pack ---------------------------------------------------------------------------

def test_packing_cuts_the_eos_separated_stream_into_full_blocks(tokenizer):
    documents = [f"And the {i} sons of Noah went forth" + " amen" * (i % 7) for i in range(30)]
    stream = [t for doc in documents
              for t in tokenizer(doc, add_special_tokens=False)["input_ids"] + [2]]

    packed = tokenize_and_pack(Dataset.from_dict({"text": documents}), tokenizer, block_size=16)
    assert packed.column_names == ["input_ids"]
    assert len(packed) == len(stream) // 16
    assert all(len(row) == 16 for row in packed["input_ids"])
    assert [t for row in packed["input_ids"] for t in row] == stream[: len(packed) * 16]


SAMPLE = ["In the beginning God created the heaven and the earth.",
          "And God said, Let there be light: and there was light."]


@pytest.mark.parametrize("style,before", [("builtin", None), ("llama", "<s>"), ("opt", "</s>")])
def test_each_document_is_tokenized_as_its_tokenizer_does_by_default(
        style, before, tokenizer, llama_style_tokenizer, opt_style_tokenizer):
    """LLaMA's convention puts its BOS before each document, OPT's its `</s>` (run_clm and the
    paper's code see documents so); a tokenizer that marks no boundary, as the built-in one,
    gets an EOS after each document."""
    tok = {"builtin": tokenizer, "llama": llama_style_tokenizer, "opt": opt_style_tokenizer}[style]
    plain = [tok(doc, add_special_tokens=False)["input_ids"] for doc in SAMPLE]
    if before is None:
        expected = [t for doc in plain for t in doc + [tok.eos_token_id]]
        assert special_tokens_added(tok) == ([], []) and document_separator(tok) == [2]
    else:
        mark = tok.convert_tokens_to_ids(before)
        expected = [t for doc in plain for t in [mark] + doc]
        assert special_tokens_added(tok) == ([mark], []) and document_separator(tok) == []
    packed = tokenize_and_pack(Dataset.from_dict({"text": SAMPLE}), tok, block_size=1)
    assert [row[0] for row in packed["input_ids"]] == expected


def test_a_tokenizer_without_a_boundary_nor_an_eos_is_refused():
    class NoEos:  # the calls packing makes of a tokenizer
        eos_token_id = None

        def __call__(self, text, add_special_tokens=True, **options):
            return {"input_ids": [ord(c) for c in text]}

    with pytest.raises(ValueError, match="marks no document boundary and has no eos_token"):
        tokenize_and_pack(Dataset.from_dict({"text": SAMPLE}), NoEos(), block_size=4)


@pytest.mark.parametrize("style", ["builtin", "llama", "opt"])
def test_a_saved_tokenizer_says_what_it_adds_to_every_reader(style, tmp_path, tokenizer,
                                                             llama_style_tokenizer,
                                                             opt_style_tokenizer):
    """`save_tokenizer` (the converter's and the built-in tokenizer's): stock AutoTokenizer and
    tokenizer.json alone give the saved tokenizer's default ids, and tokenizer_config.json's
    add_bos_token/add_eos_token (read by transformers 4's LLaMA tokenizers, and by gguf-py's
    SpecialVocab for llama.cpp) say the same."""
    import gguf
    from tokenizers import Tokenizer

    tok = {"builtin": tokenizer, "llama": llama_style_tokenizer, "opt": opt_style_tokenizer}[style]
    save_tokenizer(tok, tmp_path)
    expected = tok(SAMPLE)["input_ids"]
    assert AutoTokenizer.from_pretrained(tmp_path)(SAMPLE)["input_ids"] == expected
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert [e.ids for e in raw.encode_batch(SAMPLE)] == expected
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    adds_bos = style != "builtin"
    assert (config["add_bos_token"], config["add_eos_token"]) == (adds_bos, False)
    assert gguf.SpecialVocab(tmp_path, load_merges=False).add_special_token["bos"] == adds_bos


def test_packing_a_corpus_shorter_than_one_block_is_an_error(tokenizer):
    short = Dataset.from_dict({"text": ["a few words"]})
    with pytest.raises(ValueError,
                       match=r"tiny corpus has \d+ tokens, fewer than one block of 1024"):
        tokenize_and_pack(short, tokenizer, block_size=1024, desc="tiny corpus")


def test_packing_the_builtin_validation_split(tokenizer):
    _, validation = load_text_splits(BUILTIN_DATASET)
    packed = tokenize_and_pack(validation, tokenizer, block_size=512)
    assert len(packed) == 49_750 // 512  # the token count SOURCE.md reports


# --- ResumableDistributedSampler and make_dataloader ---------------------------------------------

def epoch_order(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_ranks_are_disjoint_and_cover_the_epoch():
    ranks = [ResumableDistributedSampler(103, num_replicas=4, rank=r, seed=0) for r in range(4)]
    shares = [set(s) for s in ranks]
    assert all(len(s) == len(share) == 25 for s, share in zip(ranks, shares))
    assert len(set().union(*shares)) == 100  # disjoint; the 3 left over are dropped

    padded = [ResumableDistributedSampler(103, num_replicas=4, rank=r, seed=0, drop_last=False)
              for r in range(4)]
    assert all(len(s) == 26 for s in padded)
    assert set().union(*(set(s) for s in padded)) == set(range(103))


def test_order_depends_on_seed_and_epoch_only():
    make = lambda seed: ResumableDistributedSampler(50, num_replicas=2, rank=1, seed=seed)  # noqa: E731
    assert epoch_order(make(0), 3) == epoch_order(make(0), 3)
    assert epoch_order(make(0), 0) != epoch_order(make(0), 1)
    assert epoch_order(make(0), 0) != epoch_order(make(1), 0)
    unshuffled = ResumableDistributedSampler(10, num_replicas=2, rank=1, seed=0, shuffle=False)
    assert list(unshuffled) == [1, 3, 5, 7, 9]
    assert list(unshuffled) == [1, 3, 5, 7, 9]  # iterating again repeats the epoch


@pytest.mark.parametrize("stop_after", [0, 7, 24, 25])
def test_resume_mid_epoch_yields_exactly_the_remaining_indices(stop_after):
    make = lambda: ResumableDistributedSampler(103, num_replicas=4, rank=2, seed=5)  # noqa: E731
    uninterrupted = make()
    expected = epoch_order(uninterrupted, 2) + epoch_order(uninterrupted, 3)

    interrupted = make()
    interrupted.set_epoch(2)
    iterator = iter(interrupted)
    taken = [next(iterator) for _ in range(stop_after)]
    state = interrupted.state_dict()
    assert state == {"epoch": 2, "consumed": stop_after}

    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # a training loop re-entering the saved epoch keeps the position
    assert taken + list(resumed) + epoch_order(resumed, 3) == expected


def test_dataloader_batches_and_resume(tokenizer):
    packed = Dataset.from_dict({"input_ids": [[i] * 8 for i in range(40)]})
    make = lambda: ResumableDistributedSampler(len(packed), num_replicas=2, rank=0, seed=1)  # noqa: E731
    batches = list(make_dataloader(packed, 4, make()))
    assert len(batches) == 5
    assert batches[0]["input_ids"].dtype == torch.long and batches[0]["input_ids"].shape == (4, 8)
    assert torch.equal(batches[0]["labels"], batches[0]["input_ids"])
    assert batches[0]["labels"].data_ptr() != batches[0]["input_ids"].data_ptr()

    sampler = make()
    loader = iter(make_dataloader(packed, 4, sampler))
    first_two = [next(loader), next(loader)]
    resumed = make()
    resumed.load_state_dict(sampler.state_dict())
    rest = list(make_dataloader(packed, 4, resumed))
    assert ([b["input_ids"].tolist() for b in first_two + rest]
            == [b["input_ids"].tolist() for b in batches])


@pytest.mark.parametrize("stop_after", [3, 5, 6, 12])
def test_epoch_batches_cross_epochs_and_resume_from_the_samplers_state(stop_after):
    """Batches go on epoch after epoch, each in its own seeded order; the sampler's state after
    any batch (inside an epoch, at its end, into the next) resumes exactly there."""
    packed = Dataset.from_dict({"input_ids": [[i] * 4 for i in range(43)]})
    make = lambda: ResumableDistributedSampler(len(packed), num_replicas=2, rank=1, seed=3)  # noqa: E731
    per_epoch = len(make()) // 4  # 21 samples of this rank: 5 full batches, 1 sample dropped

    def ids(batches, count):
        return [next(batches)["input_ids"][:, 0].tolist() for _ in range(count)]

    uninterrupted = EpochBatches(packed, 4, make())
    expected = ids(uninterrupted, 15)
    assert uninterrupted.sampler.epoch == 2
    sampler = make()
    orders = [epoch_order(sampler, epoch) for epoch in range(3)]
    assert expected == [order[i:i + 4] for order in orders for i in range(0, 4 * per_epoch, 4)]

    interrupted = EpochBatches(packed, 4, make())
    taken = ids(interrupted, stop_after)
    sampler = make()
    sampler.load_state_dict(interrupted.sampler.state_dict())
    assert taken + ids(EpochBatches(packed, 4, sampler), 15 - stop_after) == expected


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        ResumableDistributedSampler(10, num_replicas=2, rank=2, seed=0)
    with pytest.raises(ValueError, match="3 samples"):
        ResumableDistributedSampler(3, num_replicas=4, rank=0, seed=0)
    sampler = ResumableDistributedSampler(10, num_replicas=2, rank=0, seed=0)
    with pytest.raises(ValueError, match="consumed"):
        sampler.load_state_dict({"epoch": 0, "consumed": 6})


# --- check_tokenizers_match ----------------------------------------------------------------------

def test_check_tokenizers_match(tokenizer):
    check_tokenizers_match(tokenizer, AutoTokenizer.from_pretrained(builtin_tokenizer_path()))

    different_eos = AutoTokenizer.from_pretrained(builtin_tokenizer_path(), eos_token="<pad>")
    with pytest.raises(ValueError, match="eos_token_id: student 2, teacher 3"):
        check_tokenizers_match(tokenizer, different_eos)

    bigger = AutoTokenizer.from_pretrained(builtin_tokenizer_path())
    bigger.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="vocabulary size: student 4096, teacher 4097"):
        check_tokenizers_match(tokenizer, bigger)
