"""Plain helpers the tests share (pytest.ini puts tests/ on the path): tiny models from configs,
small real-text data, DeepSpeed configs, and a runner for `launch/train.py` under the DeepSpeed
launcher with real processes. Fixtures built from them are in conftest.py."""
import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tsld_ds.run.distributed import free_port  # noqa: F401  (tests import it from here)

REPO = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO / "launch" / "train.py"
# launch/train.py with fault-injecting hooks (tests/drivers/train_with_faults.py).
FAULTS_SCRIPT = REPO / "tests" / "drivers" / "train_with_faults.py"
# The shipped prompt/response examples.
INSTRUCTIONS = REPO / "tsld_ds" / "assets" / "kjv-instructions"
# The loss implementations compared end to end (tests/train/test_train.py): the fused loss in one
# vocabulary sweep, in blocks of 100 entries (online log-sum-exp), with every student block
# recomputed in backward (--gradient_checkpointing), and the naive reference.
LOSS_IMPLS = {"fused": {}, "fused_vocab_blocks": {"loss_vocab_chunk_size": 100},
              "naive": {"loss_impl": "naive"}}
CHECKPOINTED = {"fused_checkpointed": {"gradient_checkpointing": True}}
# {case: (--kd, implementations)} of the first-step gradient comparisons
GRADIENT_CASES = {"tsld": ("tsld", {**LOSS_IMPLS, **CHECKPOINTED}),
                  "l2l-checkpointed": ("l2l", {"naive": LOSS_IMPLS["naive"], **CHECKPOINTED})}
# Several commands in one launch (tests/drivers/run_many.py).
RUN_MANY_SCRIPT = REPO / "tests" / "drivers" / "run_many.py"


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    fields = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=False)
    fields.update(overrides)
    return LlamaConfig(**fields)


def save_tiny_model(path: Path, config, tokenizer, seed: int = 0, dtype=None) -> Path:
    """A randomly initialised model of `config`, stored in `dtype` (default float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.to(dtype or torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_llama_style_tokenizer(path: Path) -> Path:
    """The built-in SentencePiece model as LLaMA's tokenizer class with LLaMA's default: a BOS
    before every text (`add_bos_token=True`, the post-processor "<s> $A"). Built here, never
    downloaded."""
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor

    from tsld_ds.data import builtin_tokenizer_path

    model_file = builtin_tokenizer_path() / "tokenizer.model"
    vocab, _, merges = SentencePieceExtractor(str(model_file)).extract()
    LlamaTokenizer(vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<s>",
                   eos_token="</s>", pad_token="<pad>", add_prefix_space=False,
                   add_bos_token=True, add_eos_token=False).save_pretrained(path)
    return path


def save_opt_style_tokenizer(path: Path, corpus: Path) -> Path:
    """A byte-level BPE (GPT-2's kind, as OPT's) trained on `corpus`'s train.txt with OPT's
    special tokens (<s> 0, <pad> 1, </s> 2, <unk> 3) and OPT's default: `</s>` before every text,
    which is also its BOS. Built here with the tokenizers library, never downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train([str(corpus / "train.txt")], trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bpe.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)])
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="</s>", eos_token="</s>",
                            unk_token="<unk>", pad_token="<pad>").save_pretrained(path)
    return path


def write_small_corpus(path: Path) -> Path:
    """The first few thousand verses of the built-in corpus as train/validation text files."""
    from tsld_ds.data import builtin_corpus_dir

    src = Path(builtin_corpus_dir())
    path.mkdir(parents=True, exist_ok=True)
    train = (src / "train.txt").read_text().splitlines()[:1500]
    val = (src / "validation.txt").read_text().splitlines()[:300]
    (path / "train.txt").write_text("\n".join(train) + "\n")
    (path / "validation.txt").write_text("\n".join(val) + "\n")
    return path


def write_ds_config(path: Path, *, exact_resume: bool = False, **overrides) -> Path:
    """ds_configs/zero3.json at micro-batch 2. `exact_resume`: torch's AdamW instead of
    DeepSpeed's CPU FusedAdam, whose C++ state keeps beta^t as a running product and recomputes it
    with pow() after a checkpoint load; the resumed bias correction then differs from the
    uninterrupted run's in its last bit, which Adam amplifies (seen: 2e-5 relative in the loss 55
    steps on). torch's AdamW computes beta^t from the step every time, so a resume is bit-exact
    and the resume tests assert exact equality. (DeepSpeed's CUDA FusedAdam uses pow() too.)"""
    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    config["train_micro_batch_size_per_gpu"] = 2
    if exact_resume:
        config["optimizer"]["params"]["torch_adam"] = True
    config.update(overrides)
    path.write_text(json.dumps(config))
    return path


def train_args(model_dir, corpus_dir, output_dir, ds_config, **options) -> list:
    """launch/train.py's options for a short test run: 32-token blocks, lr 3e-3, every step
    logged, evaluation only before and after, seed 7. `options` (name=value, True for a flag)
    add to or override them."""
    values = {"model": model_dir, "dataset": corpus_dir, "ds_config": ds_config,
              "output_dir": output_dir, "block_size": 32, "lr": 3e-3, "log_every": 1,
              "eval_every": 0, "eval_max_blocks": 16, "seed": 7, **options}
    argv = []
    for name, value in values.items():
        argv += [f"--{name}"] if value is True else [f"--{name}", str(value)]
    return argv


def cache_args(teacher_dir, corpus_dir, output_dir, ds_config, **options) -> list:
    """tsld-cache's options matching `train_args`' runs (32-token blocks, seed 7)."""
    values = {"teacher": teacher_dir, "dataset": corpus_dir, "ds_config": ds_config,
              "output_dir": output_dir, "block_size": 32, "seed": 7, **options}
    return [str(x) for name, value in values.items() for x in (f"--{name}", value)]


def gt_args(model_dir, corpus_dir, output_dir, ds_config, **options) -> list:
    """Fast runs of the model alone: set-up dominates, so no teacher, tiny eval, no export."""
    return train_args(model_dir, corpus_dir, output_dir, ds_config,
                      **{"kd": "gt", "eval_max_blocks": 4, "no_export": True, **options})


def train_command(args, *, ranks: int = 2, script: Path = TRAIN_SCRIPT,
                  port: int | None = None) -> tuple[list, dict]:
    """(argv, environment) of `deepspeed --num_gpus N SCRIPT ARGS` (plain python for ranks=0);
    SCRIPT defaults to launch/train.py."""
    port = port or free_port()
    if ranks:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(port), str(script), *map(str, args)]
    else:
        cmd = [sys.executable, str(script), *map(str, args)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return cmd, env


def run_train(args, *, ranks: int = 2, timeout: int = 300, env=None, check=True,
              script: Path = TRAIN_SCRIPT, port: int | None = None):
    """Runs `train_command` to its end; fails the test on a non-zero exit when `check`."""
    assert_e2e()
    port = port or free_port()
    cmd, full_env = train_command(args, ranks=ranks, script=script, port=port)
    proc = subprocess.run(cmd, cwd=REPO, env={**full_env, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-6000:]}\n"
                             f"--- stderr ---\n{proc.stderr[-6000:]}")
    if ranks:  # DeepSpeed's CPU allreduce buffers are unlinked once every rank has mapped them
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return proc


@dataclass
class Finished:
    """What one command of `run_many` ended with, and what it printed (and its wall time)."""
    returncode: int
    stdout: str
    stderr: str
    seconds: float | None = None


def train_command_entry(args, *, fault: str | None = None, expect: int = 0) -> dict:
    """A launch/train.py run for `run_many` that must exit `expect`, with train_with_faults.py's
    fault SPEC if given."""
    return {"command": "train", "argv": [str(a) for a in args], "fault": fault, "expect": expect}


def cache_command_entry(args, *, expect: int = 0) -> dict:
    """A launch/teacher_cache.py build for `run_many` that must exit `expect`."""
    return {"command": "cache", "argv": [str(a) for a in args], "expect": expect}


def run_many(commands: list[dict], plan_dir: Path, *, ranks: int = 2, timeout: int = 900,
             check: bool = True) -> list[Finished]:
    """`commands` (`train_command_entry`, `cache_command_entry`) one after the other in a single
    launch of `ranks` ranks (tests/drivers/run_many.py; 0: one plain process); each one's exit
    code and output. With `check`, a command that exits otherwise than it expects fails the test
    with its output."""
    plan_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_dir / "plan.json"
    plan.write_text(json.dumps({"commands": commands}, indent=1))
    proc = run_train([plan], ranks=ranks, timeout=timeout, script=RUN_MANY_SCRIPT)
    ended = json.loads(plan.with_suffix(".codes.json").read_text())
    stdouts, stderrs = _split(proc.stdout, len(commands)), _split(proc.stderr, len(commands))
    finished = [Finished(end["code"], out, err, end["seconds"])
                for end, out, err in zip(ended, stdouts, stderrs)]
    for i, (command, done) in enumerate(zip(commands, finished)):
        if check and done.returncode != command["expect"]:
            raise AssertionError(f"command {i} of {plan} exited {done.returncode}: "
                                 f"{' '.join(command['argv'])}\n--- stdout ---\n"
                                 f"{done.stdout[-6000:]}\n--- stderr ---\n{done.stderr[-6000:]}")
    return finished


def _split(text: str, count: int) -> list[str]:
    """run_many.py's output cut at its `=== command I ===` lines (every rank prints one: a
    command's part runs from the first to the next command's first)."""
    starts = [text.index(f"=== command {i} ===") for i in range(count)] + [len(text)]
    return [text[a:b] for a, b in zip(starts, starts[1:])]


# The marker of tests that start a launcher or a training process (`pytest -m "not e2e"` is the
# inner loop). conftest.py records whether the running test has it; run_train refuses otherwise.
E2E_MARKER = "e2e"
_current_test_is_e2e = [False]


def assert_e2e() -> None:
    if not _current_test_is_e2e[0]:
        raise AssertionError(f"this test starts a training process: mark it "
                             f"@pytest.mark.{E2E_MARKER}, or use a fixture that is marked so "
                             "(conftest.E2E_FIXTURES)")


def copied_run(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def written_run(run_dir: Path, model_dir: Path, *, edit=None, ds_config: dict | None = None,
                **options) -> Path:
    """A run directory as launch/train.py leaves one, without training (no launcher, no engine):
    its args.json (`train_args` over `model_dir`, `options` added) and one checkpoint written
    here in the layout of a one-rank ZeRO-3 save (DeepSpeed's model-states and optimizer-states
    files, which `deepspeed.utils.zero_to_fp32` consolidates, with our run_options.json and
    manifest.json). Its master weights are the student's as training starts: `model_dir`'s,
    quantized as `options` say; `edit({engine name: fp32 tensor})` may change them first.
    `ds_config`: entries of the DeepSpeed config it records (`{"bf16": {"enabled": True}}`: a run
    that computed in bf16)."""
    from collections import OrderedDict

    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    from tsld_ds.quant import quantize_model
    from tsld_ds.run import checkpoint as ckpt
    from tsld_ds.run.config import defining_options
    from tsld_ds.run.options import parse_args
    from tsld_ds.train.student import DistillationStudent

    run_dir.mkdir(parents=True)
    config = parse_args(map(str, train_args(model_dir, run_dir / "unused-dataset", run_dir,
                                            run_dir / "unused-ds-config.json", **options)))
    config.save(run_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if config.quant_config is not None:
        quantize_model(model, config.quant_config)
    student = DistillationStudent(model, config.objective)
    weights = {name: p.detach().clone() for name, p in student.named_parameters()}
    if edit is not None:
        edit(weights)
    # ZeRO-3 saves a tied parameter once, under its first name; the others name it.
    shared, first = {}, {}
    for name, parameter in student.named_parameters(remove_duplicate=False):
        if first.setdefault(id(parameter), name) != name:
            shared[name] = first[id(parameter)]
    step = run_dir / "checkpoints" / ckpt.tag_for_step(1)
    step.mkdir(parents=True)
    ds_config = {"zero_optimization": {"stage": 3}, **(ds_config or {})}
    torch.save({"module": {}, "buffer_names": [], "dp_world_size": 1, "mp_world_size": 1,
                "param_shapes": [OrderedDict((n, t.shape) for n, t in weights.items())],
                "frozen_param_shapes": OrderedDict(), "frozen_param_fragments": OrderedDict(),
                "shared_params": shared, "ds_config": ds_config,
                "ds_version": deepspeed.__version__, "global_steps": 1, "step": 1},
               step / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    flat = torch.cat([t.flatten() for t in weights.values()])
    torch.save({"optimizer_state_dict": {"zero_stage": 3, "partition_count": 1,
                                         "fp32_flat_groups": [flat]},
                "ds_config": ds_config, "ds_version": deepspeed.__version__},
               step / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (step / ckpt.OPTIONS_FILE).write_text(json.dumps(defining_options(config)))
    (step / ckpt.MANIFEST_FILE).write_text(json.dumps(ckpt._manifest(step)))
    (step.parent / ckpt.LATEST).write_text(step.name + "\n")
    return run_dir


def moved(argv: list, run: Path, copy: Path) -> list:
    """`argv` with the output directory `run` replaced by `copy`."""
    return [str(copy) if str(a) == str(run) else str(a) for a in argv]


def interrupted_cache(cache: Path, target: Path) -> Path:
    """A copy of complete `cache` as a stopped build leaves it: an incomplete manifest, finished
    shards with their entries beside them, the second shard missing and its write torn."""
    import json

    copied_run(cache, target)
    manifest = json.loads((target / "manifest.json").read_text())
    for i, entry in enumerate(manifest["shards"]):
        (target / f"shard-{i:05d}.json").write_text(json.dumps(entry))
    (target / manifest["shards"][1]["file"]).unlink()
    (target / "shard-00001.safetensors.tmp").write_bytes(b"torn")
    (target / "manifest.json").write_text(json.dumps({**manifest, "complete": False,
                                                      "shards": []}))
    return target


def _without_interpreter() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


# Commands whose results tests wait for, each (argv, environment or None for this one's): the
# DeepSpeed ops the end-to-end runs load, built once per venv; the Triton kernels' compiles for
# sm_80 and sm_90 (Triton compiles only where its interpreter is off).
BACKGROUND_COMMANDS = {
    "deepspeed-ops": ([sys.executable, REPO / "tests" / "drivers" / "build_deepspeed_ops.py"],
                      None),
    "compile-kernels": ([sys.executable, REPO / "tests" / "ops" / "compile_kernels.py"],
                        _without_interpreter),
}


class Background:
    """BACKGROUND_COMMANDS started as soon as the selected tests are known (tests/conftest.py),
    to run beside the tests before the ones that need them: `result(name)` waits for one, or
    runs it then if it was not started."""
    started: dict = {}

    @classmethod
    def start(cls, name: str) -> None:
        argv, env = BACKGROUND_COMMANDS[name]
        cls.started[name] = subprocess.Popen(
            [str(a) for a in argv], cwd=REPO, env=env() if env else None, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)

    @classmethod
    def result(cls, name: str, timeout: float = 1800) -> subprocess.CompletedProcess:
        if name not in cls.started:
            cls.start(name)
        process = cls.started[name]
        stdout, stderr = process.communicate(timeout=timeout)
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

    @classmethod
    def finish(cls) -> None:
        """Waits for every command: a JIT build stopped halfway would leave its lock behind, and
        the next session's ranks would wait on it for good."""
        for process in cls.started.values():
            process.communicate()


def tree_digest(path: Path) -> dict:
    """{relative file path: SHA-256} of everything under `path`: equal before and after means
    nothing there was lost or changed."""
    import hashlib

    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(Path(path).rglob("*")) if f.is_file()}


@contextlib.contextmanager
def small_filesystem(path: Path, size: str):
    """A tmpfs of `size` (e.g. "8m") mounted at `path` for the block: a disk that fills up.
    Skips the test where mounting is not allowed (it needs root)."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (root needed): {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(output_dir) if "loss" in r}


# --- loss inputs (tests/losses/) ---------------------------------------------------------------

def make_loss_inputs(batch, length, vocab, hidden, *, device, dtype, bias, teacher_form,
                     scale=1.0, seed=0):
    """Student hidden/lm_head, labels with an ignored run and (B > 1) an all-ignored sequence, and
    the teacher as logits or as hidden states + lm_head (of a different width), on `device`
    (drawn on the CPU, so every device gets the same numbers)."""
    import torch

    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        drawn = torch.randn(*shape, generator=gen, dtype=torch.float64, device="cpu")
        return (drawn * std).to(device=device, dtype=dtype)

    labels = torch.randint(0, vocab, (batch, length), generator=gen, device="cpu").to(device)
    labels[0, 1:3] = -100
    if batch > 1:
        labels[-1] = -100
    inputs = dict(
        student_hidden=randn(batch, length, hidden, std=scale).requires_grad_(),
        lm_head_weight=randn(vocab, hidden).requires_grad_(),
        lm_head_bias=randn(vocab).requires_grad_() if bias else None,
        labels=labels,
    )
    teacher = dict(
        teacher_hidden=randn(batch, length, hidden + 2, std=scale),
        teacher_weight=randn(vocab, hidden + 2),
        teacher_bias=randn(vocab) if bias else None,
    )
    if teacher_form == "logits":
        teacher = dict(teacher_logits=teacher_logits_of(teacher))
    return {**inputs, **teacher}


def teacher_logits_of(inputs):
    import torch.nn.functional as F

    if "teacher_logits" in inputs:
        return inputs["teacher_logits"]
    return F.linear(inputs["teacher_hidden"], inputs["teacher_weight"], inputs["teacher_bias"])


def student_inputs(inputs):
    return inputs["student_hidden"], inputs["lm_head_weight"], inputs["labels"]


def teacher_of(inputs):
    from tsld_ds.losses import TeacherOutput

    return TeacherOutput(logits=inputs.get("teacher_logits"), hidden=inputs.get("teacher_hidden"),
                         weight=inputs.get("teacher_weight"), bias=inputs.get("teacher_bias"))
