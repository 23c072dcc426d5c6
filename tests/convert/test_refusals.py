"""launch/convert.py's refusals, in this process, on run directories written without training
(helpers.written_run): each is exit 2 with one line, and leaves the run and every output as they
were."""
import pytest
from helpers import tree_digest, written_run

from tsld_ds.convert.cli import main as convert_main


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
