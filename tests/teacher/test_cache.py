"""The teacher cache (tsld-cache, --teacher_cache): built on 2 real ranks, trained from exactly as
the engine trains (--topk 0), resumed, and refused when it does not match the run or is damaged."""
import json
import math
import shutil

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from helpers import REPO, run_train, step_losses, train_args, write_ds_config, write_small_corpus
from tsld_ds.teacher import CacheIdentity

CACHE_SCRIPT = REPO / "launch" / "teacher_cache.py"


def cache_args(teacher_dir, corpus_dir, output_dir, ds_config, **options) -> list:
    """tsld-cache's options matching `train_args`' runs (32-token blocks, seed 7)."""
    values = {"teacher": teacher_dir, "dataset": corpus_dir, "ds_config": ds_config,
              "output_dir": output_dir, "block_size": 32, "seed": 7, **options}
    return [str(x) for name, value in values.items() for x in (f"--{name}", value)]


def build_cache(teacher_dir, corpus_dir, output_dir, ds_config, options, *, ranks=2,
                check=True):
    """Runs launch/teacher_cache.py (2 ranks by default) and returns the finished process."""
    return run_train(cache_args(teacher_dir, corpus_dir, output_dir, ds_config, **options),
                     ranks=ranks, script=CACHE_SCRIPT, check=check)


@pytest.fixture(scope="module")
def ds_config(tmp_path_factory):
    return write_ds_config(tmp_path_factory.mktemp("cache-ds") / "ds.json", exact_resume=True)


@pytest.fixture(scope="module")
def exact_cache(tmp_path_factory, tiny_teacher_dir, small_corpus_dir, ds_config):
    """The full distribution (--topk 0) of the tiny teacher on the small corpus, 2 ranks, shards
    of 100 rows."""
    out = tmp_path_factory.mktemp("cache") / "exact"
    proc = build_cache(tiny_teacher_dir, small_corpus_dir, out, ds_config,
                       {"topk": 0, "rows_per_shard": 100})
    return out, proc


@pytest.fixture(scope="module")
def topk_cache(tmp_path_factory, tiny_teacher_dir, small_corpus_dir, ds_config):
    """The top 8 and 4 draws from the rest per position."""
    out = tmp_path_factory.mktemp("cache") / "top8"
    build_cache(tiny_teacher_dir, small_corpus_dir, out, ds_config,
                {"topk": 8, "tail_samples": 4})
    return out


def test_cache_holds_every_row_with_its_identity(exact_cache, topk_cache, small_corpus_dir):
    from safetensors import safe_open

    out, proc = exact_cache
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
    assert "teacher validation perplexity" in proc.stdout


def test_exact_cache_trains_as_the_engine(exact_cache, tiny_teacher_dir, small_corpus_dir,
                                          tmp_path):
    """--topk 0 against the teacher's engine, 2 ranks, plain SGD: the losses of every step and
    the weights after them (start - lr·Σ gradients) agree to float round-off."""
    ds = write_ds_config(tmp_path / "sgd.json", gradient_clipping=0.0,
                         zero_allow_untested_optimizer=True,
                         optimizer={"type": "SGD", "params": {"lr": 0.5}})
    runs = {}
    for name, extra in (("engine", {}), ("cache", {"teacher_cache": exact_cache[0]})):
        out = tmp_path / name
        run_train(train_args(tiny_teacher_dir, small_corpus_dir, out, ds, kd="tsld", max_steps=3,
                             lr=0.5, lr_schedule="constant", no_export=True, **extra))
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


def test_topk_cache_trains_and_resumes_at_any_world_size(topk_cache, tiny_teacher_dir,
                                                          small_corpus_dir, ds_config, tmp_path):
    full = tmp_path / "full"
    options = dict(kd="tsld", teacher_cache=topk_cache, no_export=True)
    run_train(train_args(tiny_teacher_dir, small_corpus_dir, full, ds_config, max_steps=8,
                         save_every=4, **options))
    summary = json.loads((full / "summary.json").read_text())
    assert summary["student_ppl_after"] < summary["student_ppl_before"]
    resumed = tmp_path / "resumed"
    run_train(train_args(tiny_teacher_dir, small_corpus_dir, resumed, ds_config, max_steps=8,
                         resume=full / "checkpoints" / "step_0000004", **options))
    expected, got = step_losses(full), step_losses(resumed)
    assert got == {step: expected[step] for step in (5, 6, 7, 8)}  # bit for bit
    one_rank = tmp_path / "one-rank"
    run_train(train_args(tiny_teacher_dir, small_corpus_dir, one_rank, ds_config, max_steps=8,
                         resume=full / "checkpoints" / "step_0000004", **options), ranks=1)
    assert sorted(step_losses(one_rank)) == [5, 6, 7, 8]
    assert all(math.isfinite(v) for v in step_losses(one_rank).values())


def test_an_interrupted_build_resumes_at_its_missing_shards(exact_cache, tiny_teacher_dir,
                                                            small_corpus_dir, ds_config,
                                                            tmp_path):
    """The state a stopped build leaves (an incomplete manifest, finished shards with their
    entries beside them, one shard missing and a torn write) is completed by running it again:
    only the missing shard is computed, and the cache equals the uninterrupted one."""
    out = tmp_path / "cache"
    shutil.copytree(exact_cache[0], out)
    manifest = json.loads((out / "manifest.json").read_text())
    for i, entry in enumerate(manifest["shards"]):
        (out / f"shard-{i:05d}.json").write_text(json.dumps(entry))
    (out / manifest["shards"][1]["file"]).unlink()
    (out / "shard-00001.safetensors.tmp").write_bytes(b"torn")
    (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False, "shards": []}))
    relaid = build_cache(tiny_teacher_dir, small_corpus_dir, out, ds_config,
                         {"topk": 0, "rows_per_shard": 50}, ranks=0, check=False)
    assert relaid.returncode == 2 and "built for --rows_per_shard 100" in relaid.stderr
    proc = build_cache(tiny_teacher_dir, small_corpus_dir, out, ds_config,
                       {"topk": 0, "rows_per_shard": 100}, ranks=1)
    shards = len(manifest["shards"])
    assert f"1 of {shards} shards of 100 rows to compute" in proc.stdout
    rebuilt = json.loads((out / "manifest.json").read_text())
    assert rebuilt["shards"] == manifest["shards"] and rebuilt["complete"]
    assert not list(out.glob("*.tmp"))
    again = build_cache(tiny_teacher_dir, small_corpus_dir, out, ds_config,
                        {"topk": 0, "rows_per_shard": 100}, ranks=0, check=False)
    assert again.returncode == 2 and "already holds this complete teacher cache" in again.stderr
    other = build_cache(tiny_teacher_dir, small_corpus_dir, out, ds_config, {"topk": 4},
                        ranks=0, check=False)
    assert other.returncode == 2 and "built for --topk 0 --tail_samples 0 in float32" in \
        other.stderr


def refusal(tmp_path, model, corpus, cache, ds_config, **options):
    """A 1-process training run with --teacher_cache that must stop with exit code 2 before any
    model loads; returns its one error line."""
    proc = run_train(train_args(model, corpus, tmp_path / "refused", ds_config, kd="tsld",
                                teacher_cache=cache, **options), ranks=0, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_a_cache_of_another_run_is_refused(topk_cache, tiny_teacher_dir, tiny_llama_dir,
                                           small_corpus_dir, ds_config, tmp_path):
    other_corpus = write_small_corpus(tmp_path / "corpus")
    (other_corpus / "train.txt").write_text(
        (other_corpus / "train.txt").read_text().replace("LORD", "Lord"))
    cases = [(dict(model=tiny_teacher_dir, block_size=16), "--block_size 32, this run 16"),
             (dict(model=tiny_teacher_dir, corpus=other_corpus), "other training rows"),
             (dict(model=tiny_llama_dir), "another teacher")]
    for case, message in cases:
        corpus = case.pop("corpus", small_corpus_dir)
        line = refusal(tmp_path, case.pop("model"), corpus, topk_cache, ds_config, **case)
        assert f"--teacher_cache {topk_cache} was built for" in line and message in line, line
        assert "rebuild it with tsld-cache" in line


def test_a_damaged_or_missing_cache_is_refused_naming_the_file(topk_cache, tiny_teacher_dir,
                                                                small_corpus_dir, ds_config,
                                                                tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(topk_cache, cache)
    shard = cache / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte among the values
    shard.write_bytes(bytes(data))
    line = refusal(tmp_path, tiny_teacher_dir, small_corpus_dir, cache, ds_config)
    assert f"{shard} is corrupted" in line
    shard.write_bytes(bytes(data[:1000]))
    assert f"{shard} has 1000 bytes" in refusal(tmp_path, tiny_teacher_dir, small_corpus_dir,
                                                cache, ds_config)
    (cache / "manifest.json").unlink()
    assert "holds no complete teacher cache" in refusal(tmp_path, tiny_teacher_dir,
                                                        small_corpus_dir, cache, ds_config)


def test_a_manifest_whose_shards_leave_a_gap_is_refused(topk_cache, tmp_path):
    from tsld_ds.errors import UsageError
    from tsld_ds.teacher import TeacherCache

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
    from tsld_ds.train.args import parse_args

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
    from tsld_ds.teacher.cache_cli import parse_args

    assert parse_args(["--output_dir", "out", "--topk", "0"]).tail_samples == 0  # no tail

    with pytest.raises(SystemExit) as stopped:
        parse_args(["--output_dir", "out", *options])
    assert stopped.value.code == 2 and message in capsys.readouterr().err
