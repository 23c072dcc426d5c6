"""Per-GPU memory and per-micro-batch all-gather traffic of a QAT-KD run, before it launches.

The student's model states come from DeepSpeed's own ZeRO-3 estimator
(`estimate_zero3_model_states_mem_needs`); the rest is what tsld-ds adds around them, each
term sized from the model's config and the DeepSpeed configs. Some are held through the whole
step (model states, the teacher's shards, ZeRO-3's reduce bucket of `reduce_bucket_size`
gradient elements); the others live in one phase of it and are freed before the next, so the
peak is the held bytes plus the largest phase:

- teacher forward: the teacher's gathered parameters (the module in use and the prefetched ones,
  up to `stage3_max_live_parameters`) and one block's intermediates;
- student forward + loss: the activations kept for backward, both lm_heads gathered, the fused
  loss's two float32 [chunk, V] blocks and float32 lm_head gradient;
- backward: the activations at their peak (with checkpointing, one block recomputed), the
  student's gathered parameters, a module's full gradient before it is reduce-scattered;
- optimizer step (ZeRO-3, optimizer on the GPU): one sub-group's gradients, flattened and cast
  to float32 for the optimizer (`sub_group_size` elements, at most this rank's partition).

Activations are what autograd saves for backward, counted by running the model on the `meta`
device (no memory, exact shapes) under `saved_tensors_hooks`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
from transformers import AttentionInterface, AutoModelForCausalLM

from tsld_ds.errors import UsageError
from tsld_ds.losses.fused import default_chunk_size
from tsld_ds.models import check_causal_lm, read_config

GiB = 1 << 30
# DeepSpeed's ZeRO-3 defaults, used where a config leaves a key out.
ZERO3_DEFAULTS = {"reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7,
                  "stage3_max_live_parameters": 1e9, "sub_group_size": 1e9,
                  "contiguous_gradients": True}
# What a CUDA process holds before any tensor: context, cuBLAS/NCCL workspaces, kernels.
CUDA_RUNTIME_BYTES = 1 * GiB
# Allocator fragmentation: PyTorch's caching allocator keeps freed blocks for reuse; this share of
# the transient memory is what it typically cannot hand back to a request of another size.
FRAGMENTATION = 0.10


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model, read from its config on the meta device."""
    params: int                 # all elements
    largest_module_params: int  # DeepSpeed's "largest layer": one module's own parameters
    lm_head_params: int
    hidden_size: int            # the lm_head's input width (the final hidden states')
    vocab_size: int
    layers: int
    dtype_bytes: int
    block_activation_bytes: int  # saved for backward by one decoder block (one micro-batch)
    other_activation_bytes: int  # saved outside the blocks (embeddings, final norm)
    block_input_bytes: int       # one block's input: all that checkpointing keeps per block


@dataclass(frozen=True)
class Setup:
    """A run's shape: what `launch/train.py` would be given."""
    num_gpus: int               # per node
    num_nodes: int
    block_size: int
    micro_batch: int
    gradient_checkpointing: bool
    attn_implementation: str    # eager, sdpa or flash_attention_2
    runtime_bytes: int = CUDA_RUNTIME_BYTES

    @property
    def world(self) -> int:
        return self.num_gpus * self.num_nodes


# When a row's bytes are held: throughout the step, or in one phase (freed before the next).
HELD, TEACHER_FORWARD, LOSS, BACKWARD, STEP = "held", "teacher forward", "forward + loss", \
    "backward", "optimizer step"
PHASES = (TEACHER_FORWARD, LOSS, BACKWARD, STEP)


@dataclass(frozen=True)
class Row:
    what: str
    bytes: int
    phase: str
    note: str


@dataclass(frozen=True)
class Estimate:
    rows: list[Row]             # per GPU
    total_bytes: int            # held rows + the peak phase's rows
    peak_phase: str
    host_bytes_per_node: int    # offloaded states (DeepSpeed's host estimate) and teacher
    student_allgather_bytes: int   # received per rank per micro-batch
    student_reduce_scatter_bytes: int
    teacher_allgather_bytes: int
    teacher_allgather_internode_bytes: int
    student_states_bytes: int   # the part that cannot shrink but with more GPUs or offload
    activations_stored_bytes: int        # the student's, without checkpointing
    activations_checkpointed_bytes: int  # with it

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["total_gib"] = self.total_bytes / GiB
        return d


def check_estimable(config, what: str, name_or_path: str) -> None:
    """Refuse a model the estimator cannot size, from its config: one that is not a causal LM
    (`tsld_ds.models.check_causal_lm`), or a decoder without attention heads (a state-space
    model such as Mamba), whose blocks the activation count does not model."""
    check_causal_lm(config, what, name_or_path)
    if not getattr(config.get_text_config(), "num_attention_heads", None):
        raise UsageError(f"the estimator models attention decoders; {what} '{name_or_path}' is a "
                         f"{config.model_type}")


def model_shape(name_or_path: str, dtype: torch.dtype, micro_batch: int, block_size: int,
                attn_implementation: str, what: str = "--model") -> ModelShape:
    config = read_config(name_or_path, what)
    check_estimable(config, what, name_or_path)
    # What eager attention saves for backward, or (sdpa, flash) what fused kernels save.
    traced = "eager" if attn_implementation == "eager" else _FLASH_SAVES
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                     attn_implementation=traced)
    except (ValueError, KeyError) as e:
        raise UsageError(f"{what} '{name_or_path}' is not a causal LM transformers can build: "
                         f"{e}") from None
    # DeepSpeed's `model_to_params`, less its data_ptr() dedup (every meta pointer is 0):
    # parameters() already yields a tied weight once.
    params = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    blocks, other = _saved_activation_bytes(model, micro_batch, block_size)
    head = model.get_output_embeddings().weight
    element = torch.finfo(dtype).bits // 8
    return ModelShape(params=params, largest_module_params=largest,
                      lm_head_params=head.numel(), hidden_size=head.shape[1],
                      vocab_size=head.shape[0], layers=len(blocks), dtype_bytes=element,
                      block_activation_bytes=max(blocks), other_activation_bytes=other,
                      block_input_bytes=micro_batch * block_size * config.hidden_size * element)


class _FusedAttentionSaves(torch.autograd.Function):
    """Keeps for backward what flash and memory-efficient attention kernels keep (query, key and
    value as given, the output, a float32 log-sum-exp per head and position): for counting on
    the meta device, where sdpa would take its math path and keep [L, L] scores."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = torch.empty_like(query)
        ctx.save_for_backward(query, key, value, out,
                              query.new_empty(query.shape[:3], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("only for counting saved tensors")


def _fused_attention_saves(module, query, key, value, attention_mask, **kwargs):
    return _FusedAttentionSaves.apply(query, key, value).transpose(1, 2).contiguous(), None


_FLASH_SAVES = "tsld_fused_attention_saves"
AttentionInterface.register(_FLASH_SAVES, _fused_attention_saves)


def _decoder_blocks(model) -> list[torch.nn.Module]:
    """The repeated blocks: the longest ModuleList in the model."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise UsageError(f"{type(model).__name__} has no list of decoder blocks")
    return list(max(lists, key=len))


def _saved_activation_bytes(model, micro_batch: int, block_size: int):
    """Bytes autograd saves for backward in one micro-batch's forward, per decoder block and
    outside them, from a forward on the meta device: each saved tensor once (a view as its
    base), parameters not at all."""
    parameters = {id(p) for p in model.parameters()}
    saved: dict[int, torch.Tensor] = {}
    owner: dict[int, int] = {}
    current = [-1]
    blocks = _decoder_blocks(model)
    for index, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda *_, i=index: current.__setitem__(0, i))
        block.register_forward_hook(lambda *_: current.__setitem__(0, -1))

    def pack(tensor):
        base = tensor if tensor._base is None else tensor._base
        if id(base) not in parameters:
            saved.setdefault(id(base), base)   # the dict keeps it alive: ids stay unique
            owner.setdefault(id(base), current[0])
        return tensor

    ids = torch.zeros(micro_batch, block_size, dtype=torch.long, device="meta")
    # A ready additive 4-D mask: transformers then builds none (building one reads values, which
    # meta tensors lack), and adding it saves nothing, as the causal mask it builds in training.
    mask = torch.zeros(micro_batch, 1, block_size, block_size, device="meta",
                       dtype=next(model.parameters()).dtype)
    positions = torch.arange(block_size, device="meta").expand(micro_batch, -1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         use_cache=False)
    per_block = [0] * len(blocks)
    other = 0
    for key, tensor in saved.items():
        size = tensor.numel() * tensor.element_size()
        if owner[key] >= 0:
            per_block[owner[key]] += size
        else:
            other += size
    return per_block, other


def zero_config(ds_config: dict) -> dict:
    zero = dict(ZERO3_DEFAULTS)
    zero.update(ds_config.get("zero_optimization", {}))
    return zero


def _offloads(zero: dict, key: str) -> bool:
    return zero.get(key, {}).get("device", "none") in ("cpu", "nvme")


@dataclass
class _TeacherFigures:
    """What the teacher adds: its rows, host bytes, all-gather traffic, and whether ZeRO-3
    partitions it (its lm_head then gathered for the loss)."""
    rows: list
    host_bytes: int = 0
    allgather_bytes: int = 0
    internode_bytes: int = 0
    sharded: bool = False


def estimate(student: ModelShape, teacher: ModelShape | None, ds_config: dict,
             teacher_config: dict | None, setup: Setup, loss_chunk_size: int | None = None
             ) -> Estimate:
    """Per-GPU memory at the step's peak: what is held throughout (states, shards, buckets, the
    runtime) plus the largest of the phases' transients (each freed before the next phase), plus
    fragmentation of that transient; and the traffic of one micro-batch."""
    zero = zero_config(ds_config)
    if _offloads(zero, "offload_param") and not _offloads(zero, "offload_optimizer"):
        raise UsageError("offload_param without offload_optimizer is not estimated: offload "
                         "both (ds_configs/zero3_offload.json) or the optimizer alone")
    sharded = zero.get("stage", 0) == 3
    rows, states, host_bytes = _student_states(student, zero, setup)
    t = _teacher_figures(teacher, teacher_config, setup) if teacher is not None \
        else _TeacherFigures(rows=[])
    rows += t.rows
    on_host = ds_config.get("activation_checkpointing", {}).get("cpu_checkpointing", False)
    stored, checkpointed = (activation_bytes(student, c, on_host) for c in (False, True))
    rows += _loss_rows(student, teacher if t.sharded else None, teacher, setup, sharded,
                       on_host, loss_chunk_size)
    rows += _backward_rows(student, zero, setup, sharded, stored, checkpointed)

    phase_bytes = {phase: sum(r.bytes for r in rows if r.phase == phase) for phase in PHASES}
    peak_phase = max(phase_bytes, key=phase_bytes.get)
    rows.append(Row("allocator fragmentation", int(FRAGMENTATION * phase_bytes[peak_phase]),
                    HELD, f"{FRAGMENTATION:.0%} of the largest phase's transients"))
    rows.append(Row("runtime", setup.runtime_bytes, HELD,
                    "CUDA context, libraries' workspaces"))
    total = sum(r.bytes for r in rows if r.phase == HELD) + phase_bytes[peak_phase]

    world, s = setup.world, student.dtype_bytes
    # ZeRO-3: forward, (recompute,) backward; ZeRO-2: the updated parameters after the step
    gathers = (3 if setup.gradient_checkpointing else 2) if sharded else 1
    return Estimate(rows=rows, total_bytes=total, peak_phase=peak_phase,
                    host_bytes_per_node=host_bytes + t.host_bytes,
                    student_allgather_bytes=gathers * student.params * s * (world - 1) // world,
                    student_reduce_scatter_bytes=student.params * s * (world - 1) // world,
                    teacher_allgather_bytes=t.allgather_bytes,
                    teacher_allgather_internode_bytes=t.internode_bytes,
                    student_states_bytes=states,
                    activations_stored_bytes=stored,
                    activations_checkpointed_bytes=checkpointed)


def _student_states(student: ModelShape, zero: dict, setup: Setup) -> tuple[list, int, int]:
    """The student's held rows, its model states' bytes, and the host bytes of an offload."""
    world, s = setup.world, student.dtype_bytes
    offload_optimizer, offload_params = _offloads(zero, "offload_optimizer"), \
        _offloads(zero, "offload_param")
    # Model states: DeepSpeed's estimate (ZeRO-3: less its largest-layer allowance; the phases
    # size the gathered parameters from the config). Its per-parameter counts assume 16-bit
    # parameters; float32 compute keeps 4-byte ones, 2 more bytes a parameter on the GPU.
    sharded = zero.get("stage", 0) == 3
    if sharded:
        host, gpu, largest_layer = estimate_zero3_model_states_mem_needs(
            student.params, student.largest_module_params, num_gpus_per_node=setup.num_gpus,
            num_nodes=setup.num_nodes, cpu_offload=offload_optimizer or offload_params,
            cpu_offload_params=offload_params, zero_init=True)
        states = gpu - largest_layer
        note = f"parameters, gradients and Adam states, 1/{world} each (DeepSpeed's ZeRO-3 " \
            "estimate)"
    else:
        host, states = estimate_zero2_model_states_mem_needs(
            student.params, num_gpus_per_node=setup.num_gpus, num_nodes=setup.num_nodes,
            cpu_offload=offload_optimizer)
        note = f"parameters whole, gradients and Adam states 1/{world} each (DeepSpeed's ZeRO-2 " \
            "estimate)"
    if s == 4 and not offload_params:
        states += 2 * student.params // (world if sharded else 1)
    if offload_optimizer or offload_params:
        note += "; offloaded to the host: " + ", ".join(
            k for k, on in (("optimizer", offload_optimizer), ("parameters", offload_params))
            if on)
    rows = [Row("student model states", states, HELD, note)]
    if zero["contiguous_gradients"]:
        rows.append(Row("student reduce bucket", int(zero["reduce_bucket_size"]) * s,
                        HELD, f"reduce_bucket_size {zero['reduce_bucket_size']:.3g} gradient "
                        "elements, allocated once"))
    return rows, states, host if offload_optimizer else 0   # DeepSpeed's per-node host figure


def _teacher_figures(teacher: ModelShape, teacher_config: dict | None,
                     setup: Setup) -> _TeacherFigures:
    """The teacher's shards (replicated, ZeRO-3, hpZ, offloaded), its gathers and forward."""
    world = setup.world
    t_zero = zero_config(teacher_config)
    t = teacher.dtype_bytes
    stage = t_zero.get("stage", 0)   # DeepSpeed's default
    figures = _TeacherFigures(rows=[], sharded=stage == 3)
    t_offload = _offloads(t_zero, "offload_param")
    shards = 0 if t_offload else teacher.params * t // (world if figures.sharded else 1)
    hpz = int(t_zero.get("zero_hpz_partition_size", 1)) \
        if figures.sharded and not t_offload else 1
    if hpz > 1:
        shards += teacher.params * t // hpz   # the secondary copy inside the node
    if t_offload:
        figures.host_bytes = teacher.params * t // setup.num_nodes
    figures.rows.append(Row("teacher parameters", shards, HELD,
                            ("offloaded to the host" if t_offload else
                             f"ZeRO-3, 1/{world}" if figures.sharded
                             else f"stage {stage}, replicated")
                            + (f" + a secondary 1/{hpz} copy in the node (hpZ)" if hpz > 1
                               else "")))
    if figures.sharded:
        figures.rows.append(Row("teacher gathered parameters",
                                _gathered(teacher, t_zero) * t, TEACHER_FORWARD,
                                f"prefetched up to max live "
                                f"({t_zero['stage3_max_live_parameters']:.3g}) + the module in "
                                "use"))
        figures.allgather_bytes = teacher.params * t * (world - 1) // world
        if hpz <= 1 and setup.num_nodes > 1:
            figures.internode_bytes = teacher.params * t * (world - setup.num_gpus) // world
    figures.rows.append(Row("teacher forward", teacher.block_activation_bytes, TEACHER_FORWARD,
                            "one block's intermediates at a time (no_grad)"))
    return figures


def _loss_rows(student: ModelShape, gathered_teacher: ModelShape | None,
               teacher: ModelShape | None, setup: Setup, sharded: bool, on_host: bool,
               loss_chunk_size: int | None) -> list:
    """The loss phase: the kept activations, the lm_heads ZeRO-3 gathers for it (the teacher's
    when it is partitioned: `gathered_teacher`), the teacher's hidden states, the fused loss's
    buffers."""
    s, tokens = student.dtype_bytes, setup.micro_batch * setup.block_size
    kept = kept_activation_bytes(student, setup.gradient_checkpointing, on_host)
    where = f", micro-batch {setup.micro_batch} x {setup.block_size}, " \
        f"{setup.attn_implementation}"
    if setup.gradient_checkpointing:
        place = " on the host" if on_host else ""
        rows = [Row("student activations kept", kept, LOSS,
                    f"{student.layers} blocks' inputs{place}{where}")]
    else:
        rows = [Row("student activations kept", kept, LOSS,
                    f"{student.layers} blocks' saved tensors{where}")]
    # An lm_head is gathered apart from its shards only under ZeRO-3; the teacher's final hidden
    # states wait for the loss.
    heads = (student.lm_head_params * s if sharded else 0) + \
        (gathered_teacher.lm_head_params * gathered_teacher.dtype_bytes
         if gathered_teacher is not None else 0)
    if heads:
        rows.append(Row("lm_heads gathered for the loss", heads, LOSS,
                        " and ".join(w for w, on in (("the student's", sharded),
                                                     ("the teacher's",
                                                      gathered_teacher is not None)) if on)))
    if teacher is not None:
        rows.append(Row("teacher hidden states", tokens * teacher.hidden_size * teacher.dtype_bytes,
                        LOSS, "the teacher's final hidden states, read by the loss"))
    chunk = min(loss_chunk_size or default_chunk_size(student.vocab_size, student.hidden_size),
                tokens)
    # The lm_head gradient accumulates in float32 and is returned in the model's dtype.
    loss = (2 * chunk * student.vocab_size * 4 + student.lm_head_params * 4
            + (student.lm_head_params * s if s != 4 else 0) + tokens * student.hidden_size * s)
    rows.append(Row("fused loss buffers", loss, LOSS,
                    f"2 float32 [{chunk}, {student.vocab_size}] blocks, the float32 lm_head "
                    "gradient (and its copy in the model's dtype), the hidden states' gradient"))
    return rows


def _backward_rows(student: ModelShape, zero: dict, setup: Setup, sharded: bool, stored: int,
                   checkpointed: int) -> list:
    """Backward (activations, gathered parameters, a module's gradients) and the optimizer
    step's flattened gradients."""
    s = student.dtype_bytes
    rows = [Row("student activations in backward",
                checkpointed if setup.gradient_checkpointing else stored, BACKWARD,
                ("the kept inputs, one block recomputed" if setup.gradient_checkpointing
                 else "every block's saved tensors") + " and one block's gradients")]
    if sharded:
        rows.append(Row("student gathered parameters", _gathered(student, zero) * s, BACKWARD,
                        f"prefetched up to max live "
                        f"({zero['stage3_max_live_parameters']:.3g}) + the module in use"))
    rows.append(Row("student module gradients", student.largest_module_params * s, BACKWARD,
                    "the largest module's full gradient before it is reduce-scattered"))
    if sharded and not _offloads(zero, "offload_optimizer"):
        # A sub-group closes once it reaches sub_group_size: up to one more parameter's partition.
        partition = -(-student.params // setup.world)
        group = min(partition, int(zero["sub_group_size"]) - 1
                    + -(-student.largest_module_params // setup.world))
        rows.append(Row("gradients flattened for the step", group * (4 + (s if s != 4 else 0)),
                        STEP, f"one sub-group's gradients (sub_group_size "
                        f"{zero['sub_group_size']:.3g}) as one float32 tensor"))
    return rows


def _gathered(model: ModelShape, zero: dict) -> int:
    """Elements ZeRO-3 holds gathered at once: the prefetched ones and the module in use. Every
    module's forward, containers included, prefetches another `stage3_prefetch_bucket_size`
    (at least one parameter) while fewer than `stage3_max_live_parameters` are gathered or in
    flight, so the look-ahead reaches max live, not one bucket (measured on the 7B-width slice,
    docs/benchmarks.md); the module in use is gathered whatever the limit."""
    return min(int(zero["stage3_max_live_parameters"]) + model.largest_module_params,
               model.params)


def kept_activation_bytes(student: ModelShape, checkpointed: bool, inputs_on_host: bool) -> int:
    """The student's activations held from its forward into backward: every block's saved
    tensors, or (checkpointed) every block's input unless it waits on the host."""
    if checkpointed:
        inputs = 0 if inputs_on_host else student.layers * student.block_input_bytes
        return inputs + student.other_activation_bytes
    return student.layers * student.block_activation_bytes + student.other_activation_bytes


def activation_bytes(student: ModelShape, checkpointed: bool, inputs_on_host: bool) -> int:
    """The student's activations at their peak in backward: those kept, plus (checkpointed) one
    recomputed block's saved tensors, plus one block's worth of gradients flowing back."""
    recomputed = student.block_activation_bytes if checkpointed else 0
    return kept_activation_bytes(student, checkpointed, inputs_on_host) + recomputed \
        + student.block_activation_bytes
