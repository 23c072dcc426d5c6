"""Where the frozen teacher's weights live when no --teacher_ds_config says: replicated on every
rank (ZeRO stage 0: no gathers, no hooks) when `tsld-estimate` puts the whole step within this
rank's memory that way, else sharded by ZeRO-3 like the student. launch/train.py and
tsld-estimate both ask here."""
from tsld_ds.capacity.estimate import GiB, ModelShape, Setup, estimate
from tsld_ds.run.ds_config import teacher_ds_config

REPLICATED = {"zero_optimization": {"stage": 0}}


def choose_teacher_config(student: ModelShape, teacher: ModelShape, ds_config: dict,
                          setup: Setup, memory_bytes: int, loss_chunk_size: int | None = None
                          ) -> tuple[dict | None, str]:
    """(the teacher's config for `teacher_ds_config`: REPLICATED, or None for its ZeRO-3 default;
    the reason, for the run log). `ds_config` is the student's, its "auto" sizes resolved."""
    if ds_config.get("zero_optimization", {}).get("offload_param"):
        return None, "ZeRO-3, offloaded like the student's parameters (offload_param)"
    planned = estimate(student, teacher, ds_config, teacher_ds_config(ds_config, REPLICATED),
                       setup, loss_chunk_size=loss_chunk_size)
    figures = (f"{planned.total_bytes / GiB:.1f} GiB per rank replicated, "
               f"of {memory_bytes / GiB:.1f}")
    if planned.total_bytes <= memory_bytes:
        return REPLICATED, f"replicated, ZeRO stage 0 (tsld-estimate: {figures})"
    return None, f"ZeRO-3 (tsld-estimate: {figures}: too much to replicate)"
