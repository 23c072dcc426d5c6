"""Shared fixtures: tiny models built from configs (never downloaded), small real-text data, and
a runner for `launch/train.py` under the DeepSpeed launcher with real processes."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO / "launch" / "train.py"


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="device of the tests that take the `device` fixture (the loss tests): "
                     "benchmarks/gpu_check.py runs them with --device cuda")


@pytest.fixture(scope="session")
def device(request):
    import torch

    device = torch.device(request.config.getoption("--device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.fail("--device cuda: no CUDA device here")
    return device


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    fields = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=False)
    fields.update(overrides)
    return LlamaConfig(**fields)


def save_tiny_model(path: Path, config, tokenizer, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


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
def tiny_llama_dir(tmp_path_factory, builtin_tokenizer):
    """A 2-layer LLaMA with the built-in tokenizer (random weights: a teacher for mechanics)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    return save_tiny_model(path, tiny_llama_config(len(builtin_tokenizer)), builtin_tokenizer)


@pytest.fixture(scope="session")
def llama256_dir(tmp_path_factory, builtin_tokenizer):
    """A 2-layer LLaMA whose every Linear row is a multiple of 256 long (GGUF TQ2_0 blocks)."""
    path = tmp_path_factory.mktemp("llama256")
    config = tiny_llama_config(len(builtin_tokenizer), hidden_size=256, intermediate_size=512)
    return save_tiny_model(path, config, builtin_tokenizer)


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
    from tsld_ds.data import builtin_corpus_dir

    src = Path(builtin_corpus_dir())
    path = tmp_path_factory.mktemp("corpus")
    train = (src / "train.txt").read_text().splitlines()[:1500]
    val = (src / "validation.txt").read_text().splitlines()[:300]
    (path / "train.txt").write_text("\n".join(train) + "\n")
    (path / "validation.txt").write_text("\n".join(val) + "\n")
    return path


def short_run_args(model_dir, corpus_dir, output_dir, ds_config, *extra) -> list:
    """A few-step QAT run's options, shared by the conversion, eval and resume tests."""
    return ["--model", model_dir, "--dataset", corpus_dir, "--ds_config", ds_config,
            "--output_dir", output_dir, "--block_size", 32, "--lr", 3e-3, "--log_every", 1,
            "--eval_every", 0, "--eval_max_blocks", 8, "--seed", 7, "--kd", "gt", *extra]


@pytest.fixture(scope="session")
def llama256_run(tmp_path_factory, llama256_dir, small_corpus_dir):
    """4 steps of ternary QAT of `llama256_dir` on 2 ranks (micro batch 2, no accumulation),
    checkpoints at steps 2 and 4 and the final hf/ export."""
    root = tmp_path_factory.mktemp("llama256-run")
    ds = write_ds_config(root / "ds.json")
    run_train(short_run_args(llama256_dir, small_corpus_dir, root / "run", ds,
                             "--max_steps", 4, "--save_every", 2))
    return root / "run"


@pytest.fixture(scope="session")
def gpt2_run(tmp_path_factory, tiny_gpt2_dir, small_corpus_dir):
    """2 steps of ternary QAT of the tiny GPT-2 on 2 ranks, without the hf/ export."""
    root = tmp_path_factory.mktemp("gpt2-run")
    ds = write_ds_config(root / "ds.json")
    run_train(short_run_args(tiny_gpt2_dir, small_corpus_dir, root / "run", ds,
                             "--max_steps", 2, "--no_export"))
    return root / "run"


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


def run_train(args, *, ranks: int = 2, timeout: int = 300, env=None, check=True):
    """`deepspeed --num_gpus N launch/train.py ARGS` (or plain python for ranks=0)."""
    port = free_port()
    if ranks:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(port), str(TRAIN_SCRIPT), *map(str, args)]
    else:
        cmd = [sys.executable, str(TRAIN_SCRIPT), *map(str, args)]
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-6000:]}\n"
                             f"--- stderr ---\n{proc.stderr[-6000:]}")
    if ranks:  # DeepSpeed's CPU allreduce buffers are unlinked once every rank has mapped them
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return proc


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(output_dir) if "loss" in r}
