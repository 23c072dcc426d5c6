"""QuantLinear under real DeepSpeed ZeRO-3 on CPU (gloo, 2 ranks, one process each).

A quantized tiny LLaMA created under `deepspeed.zero.Init` must give the same loss and the same
full gradients (weights, biases, PACT scales) as the same model run as a plain module. This is
what the ZeRO-3 rules of docs/method.md §4 are for: parameters partitioned before surgery,
gathered weights released between forward and backward.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORLD_SIZE = 2
TIMEOUT_S = 300


@pytest.mark.e2e
def test_zero3_matches_plain_model(tmp_path):
    from helpers import free_port

    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(WORLD_SIZE),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    logs = [tmp_path / f"rank{rank}.log" for rank in range(WORLD_SIZE)]
    ranks = [
        subprocess.Popen(
            [sys.executable, __file__],
            env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        for rank, log in enumerate(logs)
    ]
    # A failed rank leaves the others blocked in a collective: stop them rather than wait.
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        codes = [p.poll() for p in ranks]
        if all(code == 0 for code in codes) or any(codes):
            break
        time.sleep(0.2)
    for p in ranks:
        if p.poll() is None:
            p.kill()
            p.wait()
    for rank, (p, log) in enumerate(zip(ranks, logs)):
        assert p.returncode == 0, f"rank {rank} exited {p.returncode}:\n{log.read_text()[-4000:]}"


def _worker():
    import deepspeed
    import torch
    from deepspeed.utils import safe_get_full_grad
    from transformers import LlamaConfig, LlamaForCausalLM

    from tsld_ds.quant import QuantConfig, quantize_model, quantized_modules
    from tsld_ds.run.distributed import init_distributed

    init_distributed(TIMEOUT_S)
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
    }
    model_config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    quant_config = QuantConfig(bits=2, method="pact", granularity="group", group_size=24)

    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = LlamaForCausalLM(model_config)
    quantize_model(model, quant_config)
    for name, m in quantized_modules(model):
        assert m.weight.numel() == 0, f"{name}: surgery must not gather the weight"
        assert tuple(m.weight.ds_shape) == (m.out_features, m.in_features), name
    with torch.no_grad():  # PACT scales away from their initial value, the same on every rank
        for _, m in quantized_modules(model):
            m.scale.copy_(torch.linspace(0.5, 1.5, m.scale.numel()).view_as(m.scale))

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = quantize_model(LlamaForCausalLM(model_config), quant_config)
    plain.load_state_dict(state)

    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), config=ds_config
    )
    # the same on all ranks
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    plain_loss = plain(input_ids=ids, labels=ids).loss
    plain_loss.backward()

    torch.testing.assert_close(loss, plain_loss)
    sharded = dict(engine.module.named_parameters())
    for name, p in plain.named_parameters():
        assert hasattr(sharded[name], "ds_id"), f"{name} is not a ZeRO-3 parameter"
        torch.testing.assert_close(safe_get_full_grad(sharded[name]), p.grad, msg=name)


if __name__ == "__main__":
    _worker()
