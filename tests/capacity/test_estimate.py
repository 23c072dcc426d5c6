"""tsld_ds/capacity/estimate.py: the meta-device activation count against a real forward, the
shipped configs against their published sizes, and the estimate's arithmetic."""
import dataclasses
import json

import pytest
import torch
from helpers import REPO, tiny_llama_config
from transformers import AutoModelForCausalLM, OPTConfig

from tsld_ds.capacity.cli import SHIPPED_CONFIGS
from tsld_ds.capacity.estimate import Setup, estimate, model_shape
from tsld_ds.run.ds_config import resolve_zero_sizes, teacher_ds_config

# Parameter counts of the published checkpoints these configs come from.
PUBLISHED_PARAMS = {"llama-1b": 1_100_048_384, "llama-2-7b": 6_738_415_616,
                    "llama-3-8b": 8_030_261_248, "opt-6.7b": 6_658_473_984,
                    "llama-2-70b": 68_976_648_192, "llama-3-70b": 70_553_706_496}


def saved_bytes_of_real_forward(model, micro_batch, block_size):
    """Bytes autograd saves in a real CPU forward: each storage once, parameters not at all."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, model.config.vocab_size, (micro_batch, block_size))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    del out
    return sum(storages.values())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("config", [
    tiny_llama_config(97, hidden_size=48, intermediate_size=80, num_hidden_layers=3),
    OPTConfig(vocab_size=97, hidden_size=48, ffn_dim=80, num_hidden_layers=3,
              num_attention_heads=4, word_embed_proj_dim=48, max_position_embeddings=64,
              dropout=0.0),
], ids=["llama", "opt"])
def test_meta_activation_count_matches_a_real_forward(tmp_path, config, attn):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).train()
    model.save_pretrained(tmp_path)
    micro_batch, block_size = 3, 37
    shape = model_shape(str(tmp_path), torch.float32, micro_batch, block_size, attn)
    counted = shape.layers * shape.block_activation_bytes + shape.other_activation_bytes
    real = saved_bytes_of_real_forward(model, micro_batch, block_size)
    assert shape.layers == 3
    assert counted == pytest.approx(real, rel=0.05)
    assert shape.block_input_bytes == micro_batch * block_size * 48 * 4


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_shipped_configs_have_the_published_sizes(name):
    shape = model_shape(str(SHIPPED_CONFIGS / name), torch.bfloat16, 1, 16, "sdpa")
    assert shape.params == PUBLISHED_PARAMS[name]


@pytest.fixture(scope="module")
def llama7b():
    return model_shape(str(SHIPPED_CONFIGS / "llama-2-7b"), torch.bfloat16, 1, 2048, "sdpa")


def setup(gpus=8, nodes=1, checkpointing=True):
    return Setup(num_gpus=gpus, num_nodes=nodes, block_size=2048, micro_batch=1,
                 gradient_checkpointing=checkpointing, attn_implementation="sdpa")


BF16 = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3}}
# what launch/train.py derives for a sharded teacher: ZeRO-3, bf16, gathers sized from its shape
TEACHER = resolve_zero_sizes(teacher_ds_config(BF16), str(SHIPPED_CONFIGS / "llama-2-7b"), 8)


def row(result, what):
    return next(r.bytes for r in result.rows if r.what == what)


def test_model_states_shard_and_the_total_adds_up(llama7b):
    one, eight = (estimate(llama7b, llama7b, BF16, TEACHER, setup(gpus)) for gpus in (1, 8))
    # DeepSpeed's 18 bytes a parameter (16-bit weights, fp32 gradients, master and Adam).
    assert row(one, "student model states") == 18 * llama7b.params
    assert row(eight, "student model states") == pytest.approx(18 * llama7b.params / 8, abs=8)
    assert row(eight, "teacher parameters") == 2 * llama7b.params // 8
    assert eight.total_bytes == sum(r.bytes for r in eight.rows
                                    if r.phase in ("held", eight.peak_phase))
    llama7b_fp32 = dataclasses.replace(llama7b, dtype_bytes=4)
    fp32 = estimate(llama7b_fp32, llama7b_fp32, {"zero_optimization": {"stage": 3}},
                    {"zero_optimization": {"stage": 3}}, setup(8))
    assert row(fp32, "student model states") == pytest.approx(20 * llama7b.params / 8, abs=8)


def test_gathered_parameters_reach_max_live_not_one_prefetch_bucket(llama7b):
    # DeepSpeed prefetches a bucket at every module's forward until max live is reached.
    zero = {"stage": 3, "stage3_prefetch_bucket_size": 5e7, "stage3_max_live_parameters": 1e9}
    result = estimate(llama7b, llama7b, {**BF16, "zero_optimization": zero},
                      {**TEACHER, "zero_optimization": {**TEACHER["zero_optimization"], **zero}},
                      setup(8))
    expected = 2 * (int(1e9) + llama7b.largest_module_params)
    assert row(result, "student gathered parameters") == expected
    assert row(result, "teacher gathered parameters") == expected
    # the shipped "auto" limit: two of a block's largest weights, and the module in use
    auto = TEACHER["zero_optimization"]["stage3_max_live_parameters"]
    assert auto == 2 * 4096 * 11008
    assert row(estimate(llama7b, llama7b, BF16, TEACHER, setup(8)),
               "teacher gathered parameters") == 2 * (auto + llama7b.largest_module_params)


def test_checkpointing_keeps_block_inputs_only(llama7b):
    plain, checkpointed = (estimate(llama7b, None, BF16, None, setup(checkpointing=c))
                           for c in (False, True))
    layers, block = llama7b.layers, llama7b.block_activation_bytes
    assert row(plain, "student activations kept") == \
        layers * block + llama7b.other_activation_bytes
    assert row(plain, "student activations in backward") == \
        row(plain, "student activations kept") + block
    assert row(checkpointed, "student activations kept") == \
        layers * llama7b.block_input_bytes + llama7b.other_activation_bytes
    assert row(checkpointed, "student activations in backward") == \
        row(checkpointed, "student activations kept") + 2 * block
    # LLaMA-2-7B, 2048 tokens, the peak in backward (at 1 GPU and DeepSpeed's sub_group_size the
    # optimizer step's 6 GB would be the peak of both)
    small_groups = {**BF16, "zero_optimization": {"stage": 3, "sub_group_size": 1e8}}
    assert estimate(llama7b, None, small_groups, None, setup(checkpointing=False)).total_bytes \
        - estimate(llama7b, None, small_groups, None, setup()).total_bytes > 10 * 2**30
    for result in (plain, checkpointed):   # both figures, whichever the run uses
        assert result.activations_stored_bytes == row(plain, "student activations in backward")
        assert result.activations_checkpointed_bytes == \
            row(checkpointed, "student activations in backward")
    on_host = estimate(llama7b, None, {**BF16, "activation_checkpointing": {
        "cpu_checkpointing": True}}, None, setup())
    assert row(checkpointed, "student activations kept") - \
        row(on_host, "student activations kept") == layers * llama7b.block_input_bytes


def test_the_step_flattens_one_sub_group_of_gradients_to_float32(llama7b):
    step = "gradients flattened for the step"
    one = estimate(llama7b, None, BF16, None, setup(1))   # DeepSpeed's sub_group_size, 1e9
    # bf16 gradients flattened (2 bytes), then cast to float32 (4): a group closes at 1e9 elements
    # or more, by at most one parameter's partition
    assert 6 * 1e9 <= row(one, step) < 6 * (1e9 + llama7b.largest_module_params)
    assert one.peak_phase == "optimizer step"
    eight = estimate(llama7b, None, BF16, None, setup(8))   # the partition is below 1e9
    assert row(eight, step) == 6 * -(-llama7b.params // 8)
    shipped_size = json.loads((REPO / "ds_configs" / "zero3_bf16.json").read_text())[
        "zero_optimization"]["sub_group_size"]
    shipped = estimate(llama7b, None, {**BF16, "zero_optimization": {
        "stage": 3, "sub_group_size": shipped_size}}, None, setup(1))
    assert row(shipped, step) < 6 * (1e8 + llama7b.largest_module_params)
    assert shipped.peak_phase == "backward"
    fp32 = dataclasses.replace(llama7b, dtype_bytes=4)   # already float32: no cast
    assert row(estimate(fp32, None, {"zero_optimization": {"stage": 3}}, None, setup(8)), step) \
        == 4 * -(-llama7b.params // 8)
    for no_step_copy in ({"stage": 2}, {"stage": 3, "offload_optimizer": {"device": "cpu"}}):
        no_step_copy = {**BF16, "zero_optimization": no_step_copy}
        assert step not in [r.what for r in estimate(llama7b, None, no_step_copy, None,
                                                     setup(8)).rows]


def test_teacher_traffic_and_hierarchical_partitioning(llama7b):
    two_nodes = estimate(llama7b, llama7b, BF16, TEACHER, setup(8, 2))
    full = 2 * llama7b.params
    assert two_nodes.teacher_allgather_bytes == full * 15 // 16
    assert two_nodes.teacher_allgather_internode_bytes == full * 8 // 16
    hpz = {"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 8},
           "bf16": {"enabled": True}}
    with_hpz = estimate(llama7b, llama7b, BF16, {**hpz, "bf16": {"enabled": True}},
                        setup(8, 2))
    assert with_hpz.teacher_allgather_internode_bytes == 0
    assert row(with_hpz, "teacher parameters") == full // 16 + full // 8
    # a given config without a stage is DeepSpeed's stage 0: replicated
    replicated = estimate(llama7b, llama7b, BF16, {"bf16": {"enabled": True}}, setup(8, 2))
    assert row(replicated, "teacher parameters") == full
    assert replicated.teacher_allgather_bytes == 0


def test_optimizer_offload_moves_states_to_the_host(llama7b):
    offload = {"bf16": {"enabled": True},
               "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    result = estimate(llama7b, llama7b, offload, TEACHER, setup(8))
    assert row(result, "student model states") == pytest.approx(2 * llama7b.params / 8, abs=8)
    # DeepSpeed's host estimate with the parameters on the GPUs: 16 bytes a parameter, times
    # its default buffer factor 1.5.
    assert result.host_bytes_per_node == 24 * llama7b.params
    assert row(result, "student reduce bucket") > 0   # allocated with the optimizer offloaded
    teacher_offload = {"bf16": {"enabled": True}, "zero_optimization": {
        "stage": 3, "offload_param": {"device": "cpu"}, "zero_hpz_partition_size": 8}}
    result = estimate(llama7b, llama7b, offload, teacher_offload, setup(8, 2))
    assert row(result, "teacher parameters") == 0   # no hpZ copy on the GPUs either
    assert result.host_bytes_per_node == 24 * llama7b.params // 2 + 2 * llama7b.params // 2
