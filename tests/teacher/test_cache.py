"""The teacher cache (tsld-cache, --teacher_cache): built on 2 real ranks, trained from exactly as
the engine trains (--topk 0), resumed, and refused when it does not match the run or is damaged.
The caches and runs are conftest.py's `cache_runs` and `one_rank_runs`; the refusals run the
commands' main() in this process."""
import json
import math
import shutil

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from helpers import interrupted_cache, step_losses, write_small_corpus

from tsld_ds.cache.cli import main as cache_main
from tsld_ds.errors import EXIT_USAGE
from tsld_ds.teacher import CacheIdentity
from tsld_ds.train.cli import main as train_main


def test_cache_holds_every_row_with_its_identity(cache_runs):
    from safetensors import safe_open

    out, finished = cache_runs["exact"].path, cache_runs["exact"].finished
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["topk"] == 0 and manifest["dtype"] == "float32"
    rows = manifest["identity"]["rows"]
    assert [s["first"] for s in manifest["shards"]] == list(range(0, rows, 100))
    assert sum(s["rows"] for s in manifest["shards"]) == rows
    assert not list(out.glob("*.json.tmp")) and not list(out.glob("shard-*.json"))
    with safe_open(out / manifest["shards"][0]["file"], framework="pt") as f:
        logits, target = f.get_tensor("logits"), f.get_tensor("target_logprob")
    assert logits.shape == (100, 32, manifest["vocab_size"])
    # the label log-probability is the logits' at each next token (the last position has none)
    logp = torch.log_softmax(logits, dim=-1)
    topk_cache = cache_runs["top8"].path
    top8 = json.loads((topk_cache / "manifest.json").read_text())
    assert top8["identity"] == manifest["identity"]
    assert (top8["topk"], top8["tail_samples"]) == (8, 4)
    with safe_open(topk_cache / top8["shards"][0]["file"], framework="pt") as f:
        ids, values = f.get_tensor("topk_ids"), f.get_tensor("topk_logprobs")
        torch.testing.assert_close(f.get_tensor("target_logprob")[:100], target)
    assert ids.dtype == torch.int16 and values.shape == (len(ids), 32, 12)
    expected, expected_ids = logp.topk(8, dim=-1)
    torch.testing.assert_close(values[:100, :, :8], expected)
    assert torch.equal(ids[:100, :, :8].long(), expected_ids)
    # the draws: distinct tokens outside the top 8, carrying the rest of the teacher's mass
    ids = ids.long()
    assert (ids.sort(dim=-1).values.diff(dim=-1) > 0).all()
    torch.testing.assert_close(values[:100, :, 8:].logsumexp(dim=-1),
                               logp.scatter(-1, expected_ids, -math.inf).logsumexp(dim=-1))
    assert "teacher validation perplexity" in finished.stdout


def test_exact_cache_trains_as_the_engine(cache_runs):
    """--topk 0 against the teacher's engine, 2 ranks, plain SGD: the losses of every step and
    the weights after them (start - lr·Σ gradients) agree to float round-off."""
    runs = {}
    for name in ("engine", "cache"):
        out = cache_runs[name].path
        runs[name] = (step_losses(out), get_fp32_state_dict_from_zero_checkpoint(
            str(out / "checkpoints")), json.loads((out / "summary.json").read_text()))
    (engine_losses, engine_weights, engine), (cache_losses, cache_weights, cache) = \
        runs["engine"], runs["cache"]
    assert sorted(cache_losses) == [1, 2, 3]
    for step, loss in engine_losses.items():
        assert cache_losses[step] == pytest.approx(loss, rel=1e-6), step
    for key, weight in engine_weights.items():
        torch.testing.assert_close(cache_weights[key], weight, rtol=1e-5,
                                   atol=1e-6 * weight.abs().max().item(), msg=key)
    assert cache["teacher_ppl"] == pytest.approx(engine["teacher_ppl"], rel=1e-6)
    assert cache["teacher_numel"] == engine["teacher_numel"]
    assert cache["teacher_numel_this_rank"] == 0  # no rank holds the teacher


def test_topk_cache_trains_and_resumes_at_any_world_size(cache_runs, one_rank_runs):
    full = cache_runs["top8_full"].path
    summary = json.loads((full / "summary.json").read_text())
    assert summary["student_ppl_after"] < summary["student_ppl_before"]
    expected, got = step_losses(full), step_losses(cache_runs["top8_resumed"].path)
    assert got == {step: expected[step] for step in (5, 6, 7, 8)}  # bit for bit
    one_rank = step_losses(one_rank_runs["top8_one_rank"].path)
    assert sorted(one_rank) == [5, 6, 7, 8]
    assert all(math.isfinite(v) for v in one_rank.values())


def cache_refusal(argv, capsys) -> str:
    """tsld-cache's main(argv) in this process: exit 2; its error line."""
    assert cache_main([str(a) for a in argv]) == EXIT_USAGE
    return capsys.readouterr().err


def test_an_interrupted_build_resumes_at_its_missing_shards(cache_runs, one_rank_runs, tmp_path,
                                                            capsys, in_process):
    """The state a stopped build leaves (an incomplete manifest, finished shards with their
    entries beside them, one shard missing and a torn write) is completed by running it again
    (one_rank_runs' `completed`): only the missing shard is computed, and the cache equals the
    uninterrupted one. Other options are refused, before and after."""
    exact = cache_runs["exact"]
    relaid = interrupted_cache(exact.path, tmp_path / "interrupted")
    argv = [str(relaid) if a == str(exact.path) else a for a in exact.argv]
    assert "built for --rows_per_shard 100" in cache_refusal(
        [*argv, "--rows_per_shard", 50], capsys)

    completed = one_rank_runs["completed"]
    manifest = json.loads((exact.path / "manifest.json").read_text())
    shards = len(manifest["shards"])
    assert f"1 of {shards} shards of 100 rows to compute" in completed.finished.stdout
    rebuilt = json.loads((completed.path / "manifest.json").read_text())
    assert rebuilt["shards"] == manifest["shards"] and rebuilt["complete"]
    assert not list(completed.path.glob("*.tmp"))
    assert "already holds this complete teacher cache" in cache_refusal(completed.argv, capsys)
    assert "built for --topk 0 --tail_samples 0 in float32" in cache_refusal(
        [*completed.argv, "--topk", 4], capsys)


def refusal(argv, capsys) -> str:
    """A training run with --teacher_cache that must stop with exit code 2 before any model
    loads (main() in this process); returns its one error line."""
    assert train_main([str(a) for a in argv]) == EXIT_USAGE
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def with_option(argv: list, name: str, value) -> list:
    """`argv` with --NAME set to `value` (replaced where given)."""
    argv = [str(a) for a in argv]
    if f"--{name}" in argv:
        argv[argv.index(f"--{name}") + 1] = str(value)
        return argv
    return [*argv, f"--{name}", str(value)]


def test_a_cache_of_another_run_is_refused(cache_runs, tiny_llama_dir, tmp_path, capsys,
                                           in_process):
    top8 = cache_runs["top8_full"]
    topk_cache = cache_runs["top8"].path
    base = with_option(top8.argv, "output_dir", tmp_path / "refused")
    other_corpus = write_small_corpus(tmp_path / "corpus")
    (other_corpus / "train.txt").write_text(
        (other_corpus / "train.txt").read_text().replace("LORD", "Lord"))
    cases = [(with_option(base, "block_size", 16), "--block_size 32, this run 16"),
             (with_option(base, "dataset", other_corpus), "other training rows"),
             (with_option(base, "model", tiny_llama_dir), "another teacher")]
    for argv, message in cases:
        line = refusal(argv, capsys)
        assert f"--teacher_cache {topk_cache} was built for" in line and message in line, line
        assert "rebuild it with tsld-cache" in line


def test_a_damaged_or_missing_cache_is_refused_naming_the_file(cache_runs, tmp_path, capsys,
                                                                in_process):
    cache = tmp_path / "cache"
    shutil.copytree(cache_runs["top8"].path, cache)
    argv = with_option(with_option(cache_runs["top8_full"].argv, "teacher_cache", cache),
                       "output_dir", tmp_path / "refused")
    shard = cache / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte among the values
    shard.write_bytes(bytes(data))
    assert f"{shard} is corrupted" in refusal(argv, capsys)
    shard.write_bytes(bytes(data[:1000]))
    assert f"{shard} has 1000 bytes" in refusal(argv, capsys)
    (cache / "manifest.json").unlink()
    assert "holds no complete teacher cache" in refusal(argv, capsys)


def test_a_manifest_whose_shards_leave_a_gap_is_refused(cache_runs, tmp_path):
    from tsld_ds.errors import UsageError
    from tsld_ds.teacher import TeacherCache

    topk_cache = cache_runs["top8"].path
    manifest = json.loads((topk_cache / "manifest.json").read_text())
    identity = CacheIdentity(**manifest["identity"])
    cache = tmp_path / "cache"
    shutil.copytree(topk_cache, cache)
    entry = manifest["shards"][0]
    halved = {**entry, "first": 1, "rows": entry["rows"] - 1}
    (cache / "manifest.json").write_text(json.dumps({**manifest, "shards": [halved]}))
    with pytest.raises(UsageError, match="row 0 is missing"):
        TeacherCache.open(cache, identity)
    (cache / "manifest.json").write_text(json.dumps({**manifest, "shards": [
        {**entry, "rows": entry["rows"] - 1}]}))
    with pytest.raises(UsageError, match=f"hold {entry['rows'] - 1} of {identity.rows} rows"):
        TeacherCache.open(cache, identity)
    assert TeacherCache.open(topk_cache, identity).topk == 8


@pytest.mark.parametrize("options,message", [
    ({"kd": "gt"}, "--kd gt uses none"),
    ({"kd": "l2l"}, "--kd l2l needs the teacher's layers"),
    ({"teacher_ds_config": "ds.json"}, "with --teacher_cache no teacher runs"),
])
def test_options_a_cache_cannot_serve_are_refused(options, message, tmp_path, capsys):
    from tsld_ds.run.options import parse_args

    with pytest.raises(SystemExit) as stopped:
        parse_args(["--teacher_cache", str(tmp_path), *[x for k, v in options.items()
                                                        for x in (f"--{k}", v)]])
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_identity_mismatch_names_what_to_fix():
    base = CacheIdentity(teacher="t", teacher_sha256="a", tokenizer_sha256="b", dataset="d",
                         rows_sha256="c", rows=10, block_size=32)
    fields = dict(vars(base))
    assert base.mismatch(base) is None
    assert "--block_size 32, this run 64" in base.mismatch(
        CacheIdentity(**{**fields, "block_size": 64, "rows_sha256": "x"}))
    assert base.mismatch(CacheIdentity(**{**fields, "tokenizer_sha256": "x"})) == \
        "another tokenizer"
    assert "another teacher (t; this run's is u" in base.mismatch(
        CacheIdentity(**{**fields, "teacher": "u", "teacher_sha256": "x"}))


@pytest.mark.parametrize("options,message", [
    (["--topk", "-1"], "--topk must be 0"),
    (["--tail_samples", "-2"], "--tail_samples must be 0 or more"),
    (["--topk", "0", "--tail_samples", "4"], "--tail_samples needs --topk K"),
])
def test_bad_cache_options_are_refused_in_one_line(options, message, capsys):
    from tsld_ds.cache.cli import parse_args

    assert parse_args(["--output_dir", "out", "--topk", "0"]).tail_samples == 0  # no tail

    with pytest.raises(SystemExit) as stopped:
        parse_args(["--output_dir", "out", *options])
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_a_mismatch_names_what_differs_not_two_equal_sides():
    from dataclasses import replace

    from tsld_ds.teacher import CacheIdentity

    cache = CacheIdentity(teacher="t", teacher_sha256="a", tokenizer_sha256="k", dataset="d",
                          rows_sha256="r", rows=100, block_size=32)
    assert cache.mismatch(cache) is None
    assert cache.mismatch(replace(cache, rows_sha256="s")) == (
        "other training rows: 100 rows of d as this run's, with other tokens (the data changed "
        "since, or another --seed split it)")
    assert cache.mismatch(replace(cache, rows_sha256="s", rows=90)) == (
        "other training rows (dataset d, 100 rows; this run: d, 90 rows)")
    assert cache.mismatch(replace(cache, teacher_sha256="b")) == (
        "another teacher: t holds other weights than it did then")
    assert cache.mismatch(replace(cache, teacher="u", teacher_sha256="b")) == (
        "another teacher (t; this run's is u)")
    assert cache.mismatch(replace(cache, block_size=64)) == "--block_size 32, this run 64"
