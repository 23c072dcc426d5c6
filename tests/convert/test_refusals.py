"""launch/convert.py's refusals, in this process, on run directories written without training
(helpers.written_run): each is exit 2 with one line, and leaves the run and every output as they
were."""
import json
import re
import shutil

import pytest
from helpers import tree_digest, written_run

from tsld_ds.convert.cli import main as convert_main
from tsld_ds.convert.outputs import GGUF_MARK, MANIFEST


@pytest.fixture
def run(tmp_path, tiny_llama_dir):
    """A ternary (TWN per channel) run of the tiny LLaMA."""
    return written_run(tmp_path / "run", tiny_llama_dir)


def refusal(capsys) -> str:
    """The one line a refused conversion ends with on stderr (after any loading bars)."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    return errors[0]


@pytest.mark.parametrize("fmt,output", [("gguf", "x.gguf"), ("hf", "hf"), ("gguf", "out")])
def test_an_output_under_a_file_is_refused_before_the_checkpoint_is_read(fmt, output, run,
                                                                         tmp_path, capsys):
    (tmp_path / "FILE").write_text("notes\n")
    before = tree_digest(tmp_path)
    argv = ["--output", str(tmp_path / "FILE" / output), "--format", fmt]
    assert convert_main(["--checkpoint", str(run), *argv]) == 2
    line = refusal(capsys)
    assert line.startswith(f"error: --output '{tmp_path / 'FILE' / output}") \
        and line.endswith(f"cannot be written: '{tmp_path / 'FILE'}' is a file, not a directory")
    # Before the checkpoint is even looked for: a missing one is not what is reported.
    assert convert_main(["--checkpoint", str(tmp_path / "nowhere"), *argv]) == 2
    assert "is a file, not a directory" in refusal(capsys)
    assert tree_digest(tmp_path) == before


@pytest.fixture
def run256(tmp_path, llama256_dir):
    """A ternary run of the LLaMA whose rows are 256 long (GGUF's TQ2_0 blocks)."""
    return written_run(tmp_path / "run256", llama256_dir)


def test_overwrite_replaces_only_a_directory_convert_wrote_and_only_its_files(run, tmp_path,
                                                                              capsys):
    out = tmp_path / "hf"
    assert convert_main(["--checkpoint", str(run), "--output", str(out)]) == 0
    written = json.loads((out / MANIFEST).read_text())
    assert written["files"] == sorted(p.name for p in out.iterdir() if p.name != MANIFEST)
    assert "config.json" in written["files"] and written["format"] == "hf"

    # A model directory convert did not write (config.json and all) is never replaced...
    theirs = tmp_path / "theirs"
    shutil.copytree(out, theirs)
    (theirs / MANIFEST).unlink()
    (theirs / "NOTES.txt").write_text("notes\n")
    (theirs / "sub").mkdir()
    (theirs / "sub" / "data.bin").write_bytes(b"\0")
    # ...nor an earlier output that holds files convert did not write beside its own.
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    (mixed / "NOTES.txt").write_text("notes\n")
    (mixed / "sub").mkdir()
    (mixed / "sub" / "data.bin").write_bytes(b"\0")
    capsys.readouterr()
    before = tree_digest(tmp_path)
    for target, message in ((theirs, "was not written by convert; --overwrite replaces only an "
                             "earlier conversion's output"),
                            (mixed, "holds an earlier conversion's output and also NOTES.txt, "
                             "sub/, which convert did not write")):
        for overwrite in ([], ["--overwrite"]):
            assert convert_main(["--checkpoint", str(run), "--output", str(target),
                                 *overwrite]) == 2
            line = refusal(capsys)
            assert line.startswith(f"error: --output '{target}'") and message in line, line
    assert tree_digest(tmp_path) == before

    # An earlier output alone is replaced, with --overwrite only.
    assert convert_main(["--checkpoint", str(run), "--output", str(out)]) == 2
    assert "already exists; pass --overwrite to replace it" in refusal(capsys)
    assert convert_main(["--checkpoint", str(run), "--output", str(out), "--format", "packed",
                         "--overwrite"]) == 0
    assert json.loads((out / MANIFEST).read_text())["format"] == "packed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "mixed", "run", "theirs"]

    def besides_hf(digest):
        return {name: sha for name, sha in digest.items() if not name.startswith("hf/")}
    assert besides_hf(tree_digest(tmp_path)) == besides_hf(before)


def test_overwrite_replaces_only_a_gguf_file_convert_wrote(run256, tmp_path, capsys):
    import gguf
    import numpy as np

    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "NOTES.txt").write_text("notes\n")
    # --output a directory: its model.gguf, beside what else it holds.
    assert convert_main(["--checkpoint", str(run256), "--output", str(folder), "--format",
                         "gguf"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["NOTES.txt", "model.gguf"]
    assert GGUF_MARK in gguf.GGUFReader(folder / "model.gguf").fields

    (folder / "notes.gguf").write_text("not a gguf\n")
    writer = gguf.GGUFWriter(folder / "other.gguf", "llama")  # another tool's GGUF
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    capsys.readouterr()
    before = tree_digest(tmp_path)
    for name in ("notes.gguf", "other.gguf"):
        assert convert_main(["--checkpoint", str(run256), "--output", str(folder / name),
                             "--format", "gguf", "--overwrite"]) == 2
        assert f"'{folder / name}' already exists and was not written by convert" \
            in refusal(capsys)
    assert tree_digest(tmp_path) == before

    assert convert_main(["--checkpoint", str(run256), "--output", str(folder / "model.gguf"),
                         "--format", "gguf"]) == 2
    assert "pass --overwrite to replace it" in refusal(capsys)
    assert convert_main(["--checkpoint", str(run256), "--output", str(folder / "model.gguf"),
                         "--format", "gguf", "--overwrite"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["NOTES.txt", "model.gguf", "notes.gguf",
                                                         "other.gguf"]


def poisoned(weights):
    """A NaN and an inf in the master weights, as a diverged run may save them."""
    weights["model.model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    weights["model.lm_head.weight"][3, 1] = float("inf")


@pytest.mark.parametrize("fmt", ["hf", "packed", "gguf"])
def test_a_checkpoint_with_nan_or_inf_weights_is_refused_and_nothing_written(fmt, llama256_dir,
                                                                             tmp_path, capsys):
    run = written_run(tmp_path / "run", llama256_dir, edit=poisoned)
    before, paths = tree_digest(tmp_path), sorted(tmp_path.rglob("*"))
    assert convert_main(["--checkpoint", str(run), "--output", str(tmp_path / "new" / "out"),
                         "--format", fmt]) == 2
    step = run / "checkpoints" / "step_0000001"
    assert refusal(capsys) == (f"error: checkpoint '{step}' holds NaN or inf in 2 of its 21 "
                               "tensors (first: model.layers.1.mlp.down_proj.weight); nothing "
                               "written: convert an earlier checkpoint")
    assert tree_digest(tmp_path) == before and sorted(tmp_path.rglob("*")) == paths


# Runs that --format gguf refuses: their options, the DeepSpeed config entries they record, and
# the formats that take them.
REFUSED_BY_GGUF = {
    # Q4_1 holds min-max groups of 32; packed no grid that bf16 rounded values off.
    "4-bit-minmax-channel-bf16": (dict(bits=4, quant_method="minmax"),
                                  {"bf16": {"enabled": True}}, {"hf"}),
    "full-precision": (dict(bits=16), None, {"hf"}),  # nothing quantized: nothing to pack
    "ternary-rows-of-32": ({}, None, {"hf", "packed"}),  # TQ2_0 rows are multiples of 256
}


@pytest.mark.parametrize("case", REFUSED_BY_GGUF)
def test_a_refusal_suggests_only_formats_that_take_the_run(case, tiny_llama_dir, tmp_path,
                                                           capsys):
    options, ds_config, taking = REFUSED_BY_GGUF[case]
    run = written_run(tmp_path / "run", tiny_llama_dir, ds_config=ds_config, **options)
    suggested = {}
    for fmt in ("gguf", "packed", "hf"):
        before, paths = tree_digest(tmp_path), sorted(tmp_path.rglob("*"))
        code = convert_main(["--checkpoint", str(run), "--output", str(tmp_path / fmt),
                             "--format", fmt])
        if fmt in taking:
            assert code == 0, capsys.readouterr().err
            continue
        assert code == 2
        line = refusal(capsys)
        suggested[fmt] = set(re.search(r"use --format (\w+)(?: or (\w+))?", line).groups()) \
            - {None}
        assert tree_digest(tmp_path) == before and sorted(tmp_path.rglob("*")) == paths
    assert "gguf" not in taking and all(s == taking for s in suggested.values()), suggested
