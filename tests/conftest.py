"""Shared fixtures: tiny models built from configs (never downloaded), small real-text data, and
short trained runs that several test modules read. The plain helpers they use are in helpers.py."""
import os

import pytest
import torch

from helpers import (run_train, save_tiny_model, tiny_llama_config, train_args, write_ds_config,
                     write_small_corpus)

# Without a GPU the Triton kernels' tests (tests/ops) run them on CPU tensors in Triton's
# interpreter. Triton reads the switch when a kernel is defined, so it is set before any test
# module imports one; on a GPU they run compiled.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


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


@pytest.fixture(scope="session")
def llama256_run(tmp_path_factory, llama256_dir, small_corpus_dir):
    """4 steps of ternary QAT of `llama256_dir` on 2 ranks (micro batch 2, no accumulation),
    checkpoints at steps 2 and 4 and the final hf/ export."""
    root = tmp_path_factory.mktemp("llama256-run")
    ds = write_ds_config(root / "ds.json")
    run_train(train_args(llama256_dir, small_corpus_dir, root / "run", ds, kd="gt",
                         eval_max_blocks=8, max_steps=4, save_every=2))
    return root / "run"


@pytest.fixture(scope="session")
def llama256_w4_run(tmp_path_factory, llama256_dir, small_corpus_dir):
    """2 steps of 4-bit min-max QAT in groups of 32 (llama.cpp's Q4_1 blocks) of `llama256_dir`
    on 2 ranks, with its final checkpoint."""
    root = tmp_path_factory.mktemp("llama256-w4-run")
    ds = write_ds_config(root / "ds.json")
    run_train(train_args(llama256_dir, small_corpus_dir, root / "run", ds, kd="gt", bits=4,
                         quant_method="minmax", granularity="group", group_size=32,
                         eval_max_blocks=4, max_steps=2, no_export=True))
    return root / "run"


@pytest.fixture(scope="session")
def gpt2_run(tmp_path_factory, tiny_gpt2_dir, small_corpus_dir):
    """2 steps of ternary QAT of the tiny GPT-2 (tied embeddings) on 2 ranks, and the final hf/
    export."""
    root = tmp_path_factory.mktemp("gpt2-run")
    ds = write_ds_config(root / "ds.json")
    run_train(train_args(tiny_gpt2_dir, small_corpus_dir, root / "run", ds, kd="gt",
                         eval_max_blocks=8, max_steps=2))
    return root / "run"
