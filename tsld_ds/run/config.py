"""A training run's configuration: launch/train.py's command line parsed once, checked and frozen
(`tsld_ds.run.options.parse_args`), saved as OUTPUT_DIR/args.json and read back by whatever reads
the run later (resume, tsld-convert, tsld-eval).

Batch size, precision, gradient accumulation and clipping are the DeepSpeed config's
(`ds_config`); everything else a run does is a field here.
"""
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tsld_ds.errors import UsageError
from tsld_ds.losses import Objective
from tsld_ds.models import model_identity
from tsld_ds.quant import QuantConfig

ARGS_FILE = "args.json"


@dataclass(frozen=True)
class RunConfig:
    # model
    model: str
    teacher: str | None
    tokenizer: str | None
    from_scratch: bool
    attn_implementation: str | None
    gradient_checkpointing: bool
    # data
    dataset: str
    dataset_config: str | None
    text_column: str | None
    block_size: int
    # quantization
    bits: int
    quant_method: str | None
    granularity: str
    group_size: int | None
    init_scale: float | None   # None: QuantConfig's default
    # distillation
    kd: str
    kd_temperature: float
    token_scale: str
    teacher_cache: str | None
    loss_impl: str
    loss_chunk_size: int | None
    loss_vocab_chunk_size: int | None
    # engines and training
    ds_config: str
    teacher_ds_config: str | None
    dist_timeout: float
    lr: float
    optimizer: str
    lr_schedule: str
    warmup_steps: int
    epochs: float | None
    max_steps: int | None
    max_nonfinite_batches: int
    seed: int
    # evaluation, logging, checkpoints, outputs
    eval_every: int
    eval_max_blocks: int | None
    eval_train_blocks: int
    log_every: int
    save_every: int
    keep_checkpoints: int | None
    output_dir: str
    overwrite_output_dir: bool
    resume: str | None
    no_export: bool
    export_dtype: str | None

    @property
    def teacher_name(self) -> str:
        """The teacher's model: --teacher, else the student's own --model."""
        return self.teacher or self.model

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer or self.model

    @property
    def objective(self) -> Objective:
        """The training objective; ValueError for a combination it refuses."""
        return Objective.from_kd(self.kd, temperature=self.kd_temperature,
                                 token_scale=self.token_scale, impl=self.loss_impl,
                                 chunk_size=self.loss_chunk_size,
                                 vocab_chunk_size=self.loss_vocab_chunk_size)

    @property
    def quant_config(self) -> QuantConfig | None:
        """The student's weight quantizer; None at --bits 16 (full precision)."""
        if self.bits == 16:
            return None
        try:
            group_size = -1 if self.group_size is None else self.group_size  # QuantConfig's none
            init_scale = {} if self.init_scale is None else {"init_scale": self.init_scale}
            return QuantConfig(bits=self.bits, method=self.quant_method,
                               granularity=self.granularity, group_size=group_size,
                               **init_scale)
        except ValueError as e:
            raise UsageError(str(e)) from None

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def as_json(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, output_dir) -> None:
        (Path(output_dir) / ARGS_FILE).write_text(json.dumps(self.as_json(), indent=2))


def saved_run_options(run_dir) -> dict | None:
    """The options a run directory's args.json holds (None when it holds no run)."""
    file = Path(run_dir) / ARGS_FILE
    return json.loads(file.read_text()) if file.is_file() else None


# The options a checkpoint is bound to: they define the model, its quantizer and the objective.
# `--resume` holds a checkpoint to the values it was written with; launch/convert.py rebuilds the
# student from them. Models are compared by content (`model_identity`), not path: a model staged
# to node-local storage for each job is the same model; tokenizers by their files' contents.
DEFINING_OPTIONS = ("model", "teacher", "tokenizer", "bits", "quant_method", "granularity",
                    "group_size", "init_scale", "kd", "kd_temperature", "token_scale")
_MODELS = ("model", "teacher")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                    "special_tokens_map.json")
# Compared only when both objectives have them (a different --kd is reported as such).
_USED_BY_THE_OBJECTIVE = ("teacher", "kd_temperature", "token_scale")


def _tokenizer_identity(name_or_path: str) -> str:
    """SHA-256 over a local tokenizer directory's files; a hub name is its own identity."""
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        return name_or_path
    digest = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        if (path / name).is_file():
            digest.update(name.encode() + (path / name).read_bytes())
    return digest.hexdigest()


def defining_options(config: RunConfig) -> dict:
    """`config`'s values of DEFINING_OPTIONS, resolved: the teacher and tokenizer that default to
    --model, the quantizer's own defaults (None at --bits 16), None for what the objective does
    not use; with each model's and the tokenizer's identity (`NAME_sha256`)."""
    objective, quant = config.objective, config.quant_config
    quant_fields = quant.to_dict() if quant is not None else {}
    tsld = objective.soft == "tsld"
    options = {
        "model": config.model,
        "teacher": config.teacher_name if objective.needs_teacher else None,
        "tokenizer": config.tokenizer_name,
        "bits": config.bits, "quant_method": quant_fields.get("method"),
        "granularity": quant_fields.get("granularity"),
        "group_size": quant_fields.get("group_size"),
        "init_scale": quant_fields.get("init_scale") if quant_fields.get("method") == "pact"
        else None,
        "kd": config.kd, "kd_temperature": config.kd_temperature if tsld else None,
        "token_scale": config.token_scale if tsld else None,
    }
    for name in _MODELS:
        if options[name] is not None:
            options[f"{name}_sha256"] = model_identity(options[name])
    options["tokenizer_sha256"] = _tokenizer_identity(options["tokenizer"])
    return options


def differing_options(saved: dict, now: dict) -> list[str]:
    """'--NAME SAVED (checkpoint) vs NOW' for each defining option that differs between a
    checkpoint's `saved` options and a run's (`defining_options`); models and tokenizers differ
    when their contents do, wherever they are. A checkpoint written before identities were
    recorded is held to its options as given."""
    differing = []
    for name in DEFINING_OPTIONS:
        key = f"{name}_sha256" if f"{name}_sha256" in saved else name
        if None in (saved.get(name), now[name]) and name in _USED_BY_THE_OBJECTIVE:
            continue  # one of the objectives has no such term: --kd says it
        if saved.get(key) != now.get(key):
            what = " (another model or tokenizer)" if key != name else ""
            differing.append(f"--{name} {saved.get(name)} (checkpoint) vs {now[name]}{what}")
    return differing
