"""Shared fixtures: tiny models built from configs (never downloaded), small real-text data, and
the trained runs that several test modules read, each set trained in one launch (`run_many`).
The plain helpers they use are in helpers.py.

Two lanes: tests that start a launcher or a training process carry the `e2e` marker, given here
to every test that uses one of E2E_FIXTURES; `pytest -m "not e2e"` runs the others."""
import os
import sys
from dataclasses import dataclass
from pathlib import Path

# Tests never download: set before huggingface_hub and datasets are imported (they read these
# once), so that a name that is not a local path fails at once instead of after retries.
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
# DeepSpeed JIT-compiles its CPU Adam on first use into TORCH_EXTENSIONS_DIR: once per venv (a
# directory shared by venvs of other paths would be rebuilt by each in turn).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))

import helpers  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import (  # noqa: E402
    GRADIENT_CASES,
    INSTRUCTIONS,
    LOSS_IMPLS,
    REPO,
    Finished,
    cache_args,
    cache_command_entry,
    copied_run,
    gt_args,
    interrupted_cache,
    moved,
    run_many,
    save_llama_style_tokenizer,
    save_opt_style_tokenizer,
    save_tiny_model,
    step_losses,
    tiny_llama_config,
    train_args,
    train_command_entry,
    write_ds_config,
    write_small_corpus,
)

# Without a GPU the Triton kernels' tests (tests/ops) run them on CPU tensors in Triton's
# interpreter. Triton reads the switch when a kernel is defined, so it is set before any test
# module imports one; on a GPU they run compiled.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Fixtures that train: a test using one (directly or through another fixture) is end-to-end.
E2E_FIXTURES = {"shared_runs", "sweep_runs", "continued_runs", "one_rank_runs", "cache_runs",
                "killed_run"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        if E2E_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(helpers.E2E_MARKER)
    # The tests that start no process first, while what the others need builds beside them.
    items.sort(key=lambda item: item.get_closest_marker(helpers.E2E_MARKER) is not None)


def pytest_collection_finish(session):
    """Starts in the background what the selected tests will wait for (helpers.Background)."""
    if any(item.get_closest_marker(helpers.E2E_MARKER) for item in session.items):
        helpers.Background.start("deepspeed-ops")
    if any(item.path.name == "test_kernels_compile.py" for item in session.items):
        helpers.Background.start("compile-kernels")


def pytest_sessionfinish(session):
    helpers.Background.finish()


@pytest.hookimpl(tryfirst=True)  # before the test's fixtures, session-scoped ones included
def pytest_runtest_setup(item):
    """helpers.run_train refuses to start processes for a test without the e2e marker."""
    helpers._current_test_is_e2e[0] = item.get_closest_marker(helpers.E2E_MARKER) is not None


@pytest.fixture
def in_process():
    """A command's main() run in this process (refusals before or just after its process group
    starts, at world size 1): the environment, torch's thread count and generators, the signal
    handlers and any process group it left are put back afterwards."""
    import random
    import signal

    import numpy as np
    import torch
    import torch.distributed as dist

    environ = dict(os.environ)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)
    threads = torch.get_num_threads()
    generators = random.getstate(), np.random.get_state(), torch.get_rng_state()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM,
                                                       signal.SIGUSR1)}
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(environ)
    torch.set_num_threads(threads)
    random.setstate(generators[0])
    np.random.set_state(generators[1])
    torch.set_rng_state(generators[2])
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="device of the tests that take the `device` fixture (the loss tests): "
                     "benchmarks/gpu_check.py runs them with --device cuda")


@pytest.fixture(scope="session")
def device(request):
    device = torch.device(request.config.getoption("--device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.fail("--device cuda: no CUDA device here")
    return device


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one intra-op thread (restored afterwards)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def builtin_tokenizer():
    from transformers import AutoTokenizer

    from tsld_ds.data import builtin_tokenizer_path

    return AutoTokenizer.from_pretrained(builtin_tokenizer_path())


@pytest.fixture(scope="session")
def llama_style_tokenizer(tmp_path_factory):
    """LLaMA's convention, built locally: the built-in vocabulary, a BOS before every text."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        save_llama_style_tokenizer(tmp_path_factory.mktemp("llama-style-tokenizer")))


@pytest.fixture(scope="session")
def opt_style_tokenizer(tmp_path_factory, small_corpus_dir):
    """OPT's convention, built locally: a byte-level BPE, `</s>` before every text."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(save_opt_style_tokenizer(
        tmp_path_factory.mktemp("opt-style-tokenizer"), small_corpus_dir))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, builtin_tokenizer):
    """A 2-layer LLaMA with the built-in tokenizer (random weights: a teacher for mechanics)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    return save_tiny_model(path, tiny_llama_config(len(builtin_tokenizer)), builtin_tokenizer)


@pytest.fixture(scope="session")
def no_checkpointing_dir(tmp_path_factory):
    """The config of a registered LLaMA subclass whose class cannot checkpoint its blocks."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    class PlainConfig(LlamaConfig):
        model_type = "tsld-test-no-checkpointing"

    class PlainForCausalLM(LlamaForCausalLM):
        config_class = PlainConfig
        supports_gradient_checkpointing = False

    AutoConfig.register(PlainConfig.model_type, PlainConfig)
    AutoModelForCausalLM.register(PlainConfig, PlainForCausalLM)
    path = tmp_path_factory.mktemp("no-checkpointing")
    PlainConfig(**tiny_llama_config(64).to_diff_dict()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama256_dir(tmp_path_factory, builtin_tokenizer):
    """A 2-layer LLaMA whose every Linear row is a multiple of 256 long (GGUF TQ2_0 blocks),
    stored in bf16 as the built-in model is (its config says so; training runs it in fp32)."""
    import torch

    path = tmp_path_factory.mktemp("llama256")
    config = tiny_llama_config(len(builtin_tokenizer), hidden_size=256, intermediate_size=512)
    return save_tiny_model(path, config, builtin_tokenizer, dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, builtin_tokenizer):
    """A 2-layer GPT-2 (Conv1D layers, tied embeddings) with the built-in tokenizer."""
    from transformers import GPT2Config

    path = tmp_path_factory.mktemp("tiny-gpt2")
    config = GPT2Config(vocab_size=len(builtin_tokenizer), n_embd=32, n_layer=2, n_head=4,
                        n_positions=128, bos_token_id=builtin_tokenizer.bos_token_id,
                        eos_token_id=builtin_tokenizer.eos_token_id)
    return save_tiny_model(path, config, builtin_tokenizer)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, builtin_tokenizer, small_corpus_dir):
    """The tiny LLaMA pretrained for a few hundred steps on the small corpus: a teacher whose
    predictions carry signal, so distillation losses have something to fall towards."""
    import torch
    from transformers import AutoModelForCausalLM

    from tsld_ds.data import load_text_splits, tokenize_and_pack

    torch.manual_seed(0)
    train_text, _ = load_text_splits(str(small_corpus_dir))
    blocks = torch.tensor(tokenize_and_pack(train_text, builtin_tokenizer, 32)["input_ids"],
                          dtype=torch.long)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(len(builtin_tokenizer)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(200):
        batch = blocks[torch.randint(len(blocks), (16,))]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    path = tmp_path_factory.mktemp("tiny-teacher")
    model.save_pretrained(path)
    builtin_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def small_corpus_dir(tmp_path_factory):
    """The first few thousand verses of the built-in corpus as train/validation text files."""
    return write_small_corpus(tmp_path_factory.mktemp("corpus"))


# --- trained runs -------------------------------------------------------------------------------
# Each fixture below trains a set of runs in one 2-rank launch (one_rank_runs: 1 rank) and maps a
# name to a `Trained` run. A test that changes a run works on a copy (`copied_run`).

@dataclass
class Trained:
    path: Path          # its --output_dir
    argv: list          # its launch/train.py options
    finished: Finished  # its exit code and output


def train_all(tmp_path_factory, name: str, runs: dict, *, ranks: int = 2) -> dict:
    """`runs` ({name: command entry}) by `run_many` in one launch: {name: Trained}."""
    done = run_many(list(runs.values()), tmp_path_factory.mktemp(f"{name}-plan"), ranks=ranks)
    return {key: Trained(output_dir(entry["argv"]), entry["argv"], finished)
            for (key, entry), finished in zip(runs.items(), done)}


def output_dir(argv: list) -> Path:
    return Path(argv[argv.index("--output_dir") + 1])


@pytest.fixture(scope="session")
def exact_ds_config(tmp_path_factory):
    """ds_configs/zero3.json at micro-batch 2 with torch's AdamW (resumes exactly)."""
    return write_ds_config(tmp_path_factory.mktemp("ds") / "exact.json", exact_resume=True)


@pytest.fixture(scope="session")
def ds_config(tmp_path_factory):
    """ds_configs/zero3.json at micro-batch 2 (DeepSpeed's CPU FusedAdam)."""
    return write_ds_config(tmp_path_factory.mktemp("ds") / "zero3.json")


@pytest.fixture(scope="session")
def shared_runs(tmp_path_factory, tiny_teacher_dir, llama256_dir, tiny_gpt2_dir,
                small_corpus_dir, exact_ds_config, ds_config):
    """The runs most end-to-end tests read, on 2 ranks:

    tsld         the paper's method: the tiny teacher ternarized (TWN per channel) and trained
                 with --kd tsld against itself (replicated) for 20 steps, an exact-resume config;
                 checkpoints at steps 6, 12, 18 and 20, the newest 3 kept; the hf/ export
    llama256     4 steps of --kd gt of `llama256_dir` (rows of 256: GGUF TQ2_0 blocks),
                 checkpoints at steps 2 and 4, the hf/ export
    llama256_w4  2 steps of 4-bit min-max in groups of 32 (llama.cpp's Q4_1 blocks)
    gpt2         2 steps of the tiny GPT-2 (Conv1D layers, tied embeddings), the hf/ export"""
    root, corpus = tmp_path_factory.mktemp("shared-runs"), small_corpus_dir
    runs = {
        "tsld": train_args(tiny_teacher_dir, corpus, root / "tsld", exact_ds_config, kd="tsld",
                           max_steps=20, save_every=6, keep_checkpoints=3, eval_max_blocks=8),
        "llama256": train_args(llama256_dir, corpus, root / "llama256", ds_config, kd="gt",
                               eval_max_blocks=8, max_steps=4, save_every=2),
        "llama256_w4": train_args(llama256_dir, corpus, root / "llama256-w4", ds_config,
                                  kd="gt", bits=4, quant_method="minmax", granularity="group",
                                  group_size=32, eval_max_blocks=4, max_steps=2, no_export=True),
        "gpt2": train_args(tiny_gpt2_dir, corpus, root / "gpt2", ds_config, kd="gt",
                           eval_max_blocks=8, max_steps=2),
    }
    return train_all(tmp_path_factory, "shared-runs",
                     {name: train_command_entry(argv) for name, argv in runs.items()})


@pytest.fixture(scope="session")
def tsld_run(shared_runs):
    return shared_runs["tsld"].path


@pytest.fixture(scope="session")
def llama256_run(shared_runs):
    return shared_runs["llama256"].path


@pytest.fixture(scope="session")
def llama256_w4_run(shared_runs):
    return shared_runs["llama256_w4"].path


@pytest.fixture(scope="session")
def gpt2_run(shared_runs):
    return shared_runs["gpt2"].path


SHARDED_TEACHER = str(REPO / "ds_configs" / "teacher_zero3.json")
# sweep_runs' `gt` is the uninterrupted reference of the multi-node and SLURM runs: they take its
# options (`gt_reference_args`) into other output directories.
GT_REFERENCE_STEPS = 60


def gt_reference_args(model_dir, corpus_dir, output_dir, ds_config, **options) -> list:
    return gt_args(model_dir, corpus_dir, output_dir, ds_config,
                   **{"max_steps": GT_REFERENCE_STEPS, **options})


@pytest.fixture(scope="session")
def sweep_runs(tmp_path_factory, tiny_teacher_dir, small_corpus_dir, exact_ds_config,
               ds_config):
    """Runs from the tiny teacher, each of its own options, on 2 ranks:

    gt             --kd gt for 60 steps with the exact-resume config, no export: also the
                   uninterrupted reference of the multi-node and SLURM runs
    logit          --kd logit for 20 steps, its teacher ZeRO-3-partitioned (teacher_zero3.json)
    logit_gt       --kd logit_gt for 20 steps (the teacher as the run places it: replicated)
    l2l            --kd l2l for 20 steps
    instruction    the shipped prompt/response examples, --kd tsld, 3 steps
    nonfinite      --kd gt for 8 steps whose rank 1 sees NaN in its micro-batches 3, 5 and 6
                   (train_with_faults.py) with --max_nonfinite_batches 2: it stops, exit 1
    nan_weights    --kd gt, a checkpoint every step, whose weights turn NaN in step 3's update
                   (rank 1's optimizer copy): step 3 is not saved, the run stops, exit 1
    setup_stopped  --kd tsld, a SIGTERM on rank 1 once the data is loaded: exit 75 before the
                   models load
    diverged       --kd gt at --lr 1e30: exit 1, no summary.json, no export
    sgd/CASE/IMPL  1 step of plain SGD at lr 1 without clipping, each GRADIENT_CASES' loss
                   implementation
    adamw/IMPL     3 steps of --kd tsld with AdamW and clipping, each of LOSS_IMPLS
    recipe/NAME    ds_configs/ as shipped (`recipe`), --kd tsld: the LLaMA-7B recipes 8x80gb,
                   8x40gb-offload and hpz-teacher (the teacher in teacher_zero3_hpz.json) for 2
                   steps with --gradient_checkpointing; zero2 (with its hf/ export) and zero3
                   for 3 steps"""
    root, teacher, corpus = tmp_path_factory.mktemp("sweep-runs"), tiny_teacher_dir, \
        small_corpus_dir
    runs = {
        "gt": train_command_entry(gt_reference_args(teacher, corpus, root / "gt",
                                                    exact_ds_config)),
        "logit": train_command_entry(train_args(teacher, corpus, root / "logit", ds_config,
                                                kd="logit", max_steps=20,
                                                teacher_ds_config=SHARDED_TEACHER)),
        "logit_gt": train_command_entry(train_args(teacher, corpus, root / "logit_gt",
                                                   ds_config, kd="logit_gt", max_steps=20)),
        "l2l": train_command_entry(train_args(teacher, corpus, root / "l2l", ds_config,
                                              kd="l2l", max_steps=20)),
        "instruction": train_command_entry(train_args(teacher, INSTRUCTIONS,
                                                      root / "instruction", ds_config,
                                                      kd="tsld", max_length=40, max_steps=3,
                                                      eval_max_blocks=8)),
        "nonfinite": train_command_entry(gt_args(teacher, corpus, root / "nonfinite", ds_config,
                                                 max_steps=8, max_nonfinite_batches=2),
                                         fault="nan:gt:3,5,6", expect=1),
        "nan_weights": train_command_entry(gt_args(teacher, corpus, root / "nan_weights",
                                                   ds_config, max_steps=6, save_every=1,
                                                   max_nonfinite_batches=2),
                                           fault="nan_weights:3", expect=1),
        "setup_stopped": train_command_entry(train_args(teacher, corpus,
                                                        root / "setup_stopped", ds_config,
                                                        max_steps=6),
                                             fault="term_in_setup", expect=75),
        "diverged": train_command_entry(gt_args(teacher, corpus, root / "diverged", ds_config,
                                                max_steps=3, lr=1e30), expect=1),
    }
    sgd = write_ds_config(root / "sgd.json", gradient_clipping=0.0,
                          zero_allow_untested_optimizer=True,
                          optimizer={"type": "SGD", "params": {"lr": 1.0}})
    for case, (kd, impls) in GRADIENT_CASES.items():
        for impl, options in impls.items():
            runs[f"sgd/{case}/{impl}"] = train_command_entry(train_args(
                teacher, corpus, root / f"sgd-{case}-{impl}", sgd, kd=kd, max_steps=1, lr=1.0,
                lr_schedule="constant", no_export=True, **options))
    for impl, options in LOSS_IMPLS.items():
        runs[f"adamw/{impl}"] = train_command_entry(train_args(
            teacher, corpus, root / f"adamw-{impl}", ds_config, kd="tsld", max_steps=3,
            no_export=True, **options))
    sevenb = dict(max_steps=2, no_export=True, eval_max_blocks=4, gradient_checkpointing=True)
    recipes = {
        "8x80gb": (recipe(root, "llama7b_8x80gb.json"), sevenb),
        "8x40gb-offload": (recipe(root, "llama7b_8x40gb_offload.json"), sevenb),
        "hpz-teacher": (recipe(root, "llama7b_8x80gb.json"), {
            **sevenb, "teacher_ds_config": recipe(root, "teacher_zero3_hpz.json",
                                                  zero_hpz_partition_size=2)}),
        "zero2": (recipe(root, "zero2.json"), dict(max_steps=3, eval_max_blocks=4)),
        "zero3": (recipe(root, "zero3.json"), dict(max_steps=3, eval_max_blocks=4,
                                                   no_export=True)),
    }
    for name, (config, options) in recipes.items():
        runs[f"recipe/{name}"] = train_command_entry(train_args(
            teacher, corpus, root / f"recipe-{name}", config, **options))
    return train_all(tmp_path_factory, "sweep-runs", runs)


@pytest.fixture(scope="session")
def killed_run(tmp_path_factory, tiny_teacher_dir, small_corpus_dir, exact_ds_config):
    """6 steps of --kd gt on 2 ranks, a checkpoint every 2 steps, whose rank 1 kills itself
    while checkpoint 4 is written (train_with_faults.py); with the losses it had logged. A kill
    ends its launch, so this run has one of its own."""
    out = tmp_path_factory.mktemp("killed-run") / "run"
    argv = gt_args(tiny_teacher_dir, small_corpus_dir, out, exact_ds_config, max_steps=6,
                   save_every=2)
    proc = helpers.run_train(argv, env={"TSLD_INJECT_FAULT": "kill_in_save:4"}, check=False,
                             script=helpers.FAULTS_SCRIPT)
    return Trained(out, [str(a) for a in argv],
                   Finished(proc.returncode, proc.stdout, proc.stderr)), step_losses(out)


@pytest.fixture(scope="session")
def continued_runs(tmp_path_factory, shared_runs, killed_run, tiny_teacher_dir,
                   small_corpus_dir, exact_ds_config):
    """Runs that continue earlier ones, on 2 ranks:

    elsewhere   `tsld` resumed from its step 12 to 20 into a new directory, with the model (and
                so the teacher) a copy staged elsewhere
    longer      a copy of `tsld` resumed from its last step (20) to 24
    afresh      a copy of `tsld` started over for 1 step (--overwrite_output_dir)
    after_kill  a copy of `killed_run` resumed (--resume latest)"""
    root = tmp_path_factory.mktemp("continued-runs")
    tsld, killed = shared_runs["tsld"], killed_run[0]
    staged = copied_run(tiny_teacher_dir, root / "staged-model")
    longer, afresh, after_kill = (copied_run(run.path, root / name) for run, name in
                                  ((tsld, "longer"), (tsld, "afresh"), (killed, "after-kill")))
    runs = {
        "elsewhere": train_args(staged, small_corpus_dir, root / "elsewhere", exact_ds_config,
                                kd="tsld", max_steps=20, eval_max_blocks=8, no_export=True,
                                resume=tsld.path / "checkpoints" / "step_0000012"),
        "longer": moved(tsld.argv, tsld.path, longer) + ["--max_steps", 24, "--resume",
                                                          "latest"],
        "afresh": moved(tsld.argv, tsld.path, afresh) + ["--max_steps", 1,
                                                          "--overwrite_output_dir"],
        "after_kill": moved(killed.argv, killed.path, after_kill) + ["--resume", "latest"],
    }
    return train_all(tmp_path_factory, "continued-runs",
                     {name: train_command_entry(argv) for name, argv in runs.items()})


@pytest.fixture(scope="session")
def sgd_ds_config(tmp_path_factory):
    """Plain SGD without clipping: one step moves the weights by exactly -lr x the gradient."""
    return write_ds_config(tmp_path_factory.mktemp("ds") / "sgd.json", gradient_clipping=0.0,
                           zero_allow_untested_optimizer=True,
                           optimizer={"type": "SGD", "params": {"lr": 0.5}})


@pytest.fixture(scope="session")
def cache_runs(tmp_path_factory, tiny_teacher_dir, small_corpus_dir, exact_ds_config,
               sgd_ds_config):
    """Teacher caches of the tiny teacher on the small corpus and runs that train from them, on 2
    ranks:

    exact         tsld-cache --topk 0 (the full distribution), shards of 100 rows
    top8          tsld-cache --topk 8 --tail_samples 4
    engine        3 steps of --kd tsld with plain SGD (lr 0.5, constant), the teacher running
    cache         the same from `exact`
    top8_full     8 steps of --kd tsld from `top8`, a checkpoint at step 4
    top8_resumed  `top8_full` resumed from its step 4"""
    root, teacher, corpus = tmp_path_factory.mktemp("cache-runs"), tiny_teacher_dir, \
        small_corpus_dir
    sgd = dict(kd="tsld", max_steps=3, lr=0.5, lr_schedule="constant", no_export=True)
    top8 = dict(kd="tsld", teacher_cache=root / "top8", no_export=True, max_steps=8)
    entries = {
        "exact": cache_command_entry(cache_args(teacher, corpus, root / "exact", exact_ds_config,
                                                topk=0, rows_per_shard=100)),
        "top8": cache_command_entry(cache_args(teacher, corpus, root / "top8", exact_ds_config,
                                               topk=8, tail_samples=4)),
        "engine": train_command_entry(train_args(teacher, corpus, root / "engine", sgd_ds_config,
                                                 **sgd)),
        "cache": train_command_entry(train_args(teacher, corpus, root / "cache", sgd_ds_config,
                                                teacher_cache=root / "exact", **sgd)),
        "top8_full": train_command_entry(train_args(teacher, corpus, root / "top8-full",
                                                    exact_ds_config, save_every=4, **top8)),
        "top8_resumed": train_command_entry(train_args(
            teacher, corpus, root / "top8-resumed", exact_ds_config,
            resume=root / "top8-full" / "checkpoints" / "step_0000004", **top8)),
    }
    return train_all(tmp_path_factory, "cache-runs", entries)


@pytest.fixture(scope="session")
def one_rank_runs(tmp_path_factory, shared_runs, cache_runs, tiny_teacher_dir, llama256_dir,
                  small_corpus_dir, exact_ds_config):
    """Runs of one rank, in one launch:

    universal       a copy of `tsld` resumed from its step 18 (saved by 2 ranks) to 20 at world
                    size 1 through DeepSpeed's universal checkpoint (written beside it), 2
                    micro-batches accumulated: the same global batch
    top8_one_rank   (a copy of) cache_runs' `top8_full` resumed from its step 4 at world size 1
    completed       an interrupted copy of cache_runs' `exact` (`interrupted_cache`) built again
    bf16            1 step of 4-bit min-max in groups of 32 of `llama256_dir` trained in bf16"""
    root = tmp_path_factory.mktemp("one-rank-runs")
    tsld, top8_full = shared_runs["tsld"], cache_runs["top8_full"]
    accumulating = write_ds_config(root / "accumulating.json", exact_resume=True,
                                   gradient_accumulation_steps=2)
    entries = {
        "universal": train_command_entry(train_args(
            tiny_teacher_dir, small_corpus_dir, root / "universal", accumulating, kd="tsld",
            max_steps=20, eval_max_blocks=8, no_export=True,
            resume=copied_run(tsld.path, root / "tsld") / "checkpoints" / "step_0000018")),
        "top8_one_rank": train_command_entry(train_args(
            tiny_teacher_dir, small_corpus_dir, root / "top8-one-rank", exact_ds_config,
            kd="tsld", teacher_cache=cache_runs["top8"].path, no_export=True, max_steps=8,
            resume=copied_run(top8_full.path, root / "top8-full") / "checkpoints"
            / "step_0000004")),
        "completed": cache_command_entry(moved(
            cache_runs["exact"].argv, cache_runs["exact"].path,
            interrupted_cache(cache_runs["exact"].path, root / "completed"))),
        "bf16": train_command_entry(train_args(
            llama256_dir, small_corpus_dir, root / "bf16",
            write_ds_config(root / "bf16.json", bf16={"enabled": True}), kd="gt", bits=4,
            quant_method="minmax", granularity="group", group_size=32, max_steps=1,
            eval_max_blocks=2, no_export=True)),
    }
    return train_all(tmp_path_factory, "one-rank-runs", entries, ranks=1)


def recipe(root: Path, name: str, **zero) -> Path:
    """ds_configs/NAME as shipped, but for what names the hardware: micro-batch 2 for the tiny
    corpus, and `zero` (the hierarchical partition = the 2 ranks of this one node)."""
    import json

    config = json.loads((REPO / "ds_configs" / name).read_text())
    config["train_micro_batch_size_per_gpu"] = 2
    config["zero_optimization"].update(zero)
    path = root / name
    path.write_text(json.dumps(config))
    return path
