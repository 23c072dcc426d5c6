"""Command-line options of `launch/train.py`, parsed once into a `RunConfig`, and the option
groups other commands share with it (the data a run trains on, the engines it runs).

Batch size, precision, gradient accumulation and clipping come from the DeepSpeed config; every
other knob of a run is an option here, with its default shown in `--help`. Everything that can be
checked without the models is checked in `parse_args`.
"""
import argparse
import dataclasses
import json
import math
from pathlib import Path

from tsld_ds.data import BUILTIN_DATASET
from tsld_ds.errors import UsageError, exit_code_table
from tsld_ds.losses import KD_CHOICES, LOSS_IMPLS, TOKEN_SCALES, Objective
from tsld_ds.models import BUILTIN_MODEL
from tsld_ds.quant import QuantConfig
from tsld_ds.run.config import ARGS_FILE, RunConfig

BITS_CHOICES = (2, 4, 8, 16)
DEFAULT_MAX_STEPS = 300
QUANT_METHODS = ("twn", "pact", "minmax", "absmean")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/train.py",
        description="Quantization-aware training of a causal LM with token-scaled logit "
        "distillation (TSLD) on a DeepSpeed ZeRO-3 engine. Run it under the DeepSpeed launcher: "
        "`deepspeed launch/train.py --ds_config ds_configs/zero3.json [options]`.",
        epilog="exit codes:\n" + exit_code_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_options(p)
    add_data_options(p, seed_help="seed of initialisation and data order")
    add_engine_options(p, ds_help="DeepSpeed config of the student: batch, precision, "
                       "optimizer, ZeRO")
    _add_quantization_options(p)
    _add_distillation_options(p)
    _add_training_options(p)
    _add_output_options(p)
    # Set by the DeepSpeed launcher; the environment's LOCAL_RANK is what we use.
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """--model, --teacher, --tokenizer, --from_scratch, --gradient_checkpointing."""
    model = p.add_argument_group("model")
    model.add_argument("--model", default=BUILTIN_MODEL,
                       help="student: a Hugging Face model name or a local model directory "
                       "(default: the built-in tiny LLaMA pretrained on the built-in corpus)")
    model.add_argument("--teacher", default=None,
                       help="frozen full-precision teacher, a name or directory (default: "
                       "--model)")
    model.add_argument("--tokenizer", default=None,
                       help="tokenizer name or directory (default: the student's)")
    model.add_argument("--from_scratch", action="store_true",
                       help="initialise the student randomly from --model's config instead of "
                       "loading its weights (pretraining, e.g. the built-in teacher)")
    model.add_argument("--gradient_checkpointing", action="store_true",
                       help="the student keeps only each decoder block's input and recomputes "
                       "its activations in backward (transformers' non-reentrant checkpointing): "
                       "one block's activations at a time instead of every block's, for about "
                       "one more student forward per step (default: off)")


def _add_quantization_options(p: argparse.ArgumentParser) -> None:
    """--bits, --quant_method, --granularity, --group_size, --init_scale."""
    quant = p.add_argument_group("quantization")
    quant.add_argument("--bits", type=int, default=2, choices=BITS_CHOICES,
                       help="weight bits of the student's transformer-block Linears; 16 trains "
                       "in full precision, the paper's FP stage that makes a teacher (default: "
                       "%(default)s)")
    quant.add_argument("--quant_method", default=None, choices=QUANT_METHODS,
                       help="weight quantizer (default: twn for 2 bits, minmax for 4 and 8)")
    quant.add_argument("--granularity", default="channel", choices=("channel", "tensor", "group"),
                       help="one scale per output channel, per tensor, or per group of "
                       "--group_size input columns (default: %(default)s)")
    quant.add_argument("--group_size", type=int, default=None,
                       help="input columns per scale group; needed by --granularity group and "
                       "used by it only")
    quant.add_argument("--init_scale", type=float, default=None,
                       help="initial learned clip scale of --quant_method pact, and used by it "
                       f"only (default: {QuantConfig.init_scale})")


def _add_distillation_options(p: argparse.ArgumentParser) -> None:
    """--kd and its temperature and token scale, --teacher_cache, the fused loss's options."""
    loss = p.add_argument_group("distillation")
    loss.add_argument("--kd", default="tsld", choices=KD_CHOICES,
                      help="training objective: gt (cross-entropy only), logit (teacher soft CE), "
                      "logit_gt, l2l (logit + layer-to-layer MSE), tsld (gt + token-scaled logit "
                      "distillation, the paper's method), tsld_nogt (the TSLD term alone) "
                      "(default: %(default)s)")
    loss.add_argument("--kd_temperature", type=float, default=10.0,
                      help="temperature tau of the token-scale softmax over teacher CE "
                      "(default: %(default)s)")
    loss.add_argument("--token_scale", default=None, choices=TOKEN_SCALES,
                      help="token weights of --kd tsld: confidence, the paper's softmax(CE/tau) "
                      "over each sequence (default); ablations: uniform (1/tokens, logit KD with "
                      "TSLD's per-sequence sum), inverse (softmax(-CE/tau): confident tokens "
                      "up-weighted)")
    loss.add_argument("--teacher_cache", default=None,
                      help="train from the teacher's outputs that tsld-cache computed once for "
                      "this teacher, tokenizer, dataset and --block_size (a directory), instead "
                      "of running the teacher every step; exact for a --topk 0 cache (default: "
                      "the teacher runs in its own engine)")
    loss.add_argument("--loss_impl", default="fused", choices=LOSS_IMPLS,
                      help="fused: chunked over tokens and vocabulary with the lm_head, never "
                      "materialising [tokens, vocab] logits; naive: the full-logit reference "
                      "(default: %(default)s)")
    loss.add_argument("--loss_chunk_size", type=int, default=None,
                      help="tokens per chunk of the fused loss (default: chosen from the "
                      "vocabulary and hidden sizes)")
    loss.add_argument("--loss_vocab_chunk_size", type=int, default=None,
                      help="vocabulary entries per block of the fused loss: an online "
                      "log-sum-exp and one extra lm_head matmul (default: the whole vocabulary)")


def _add_training_options(p: argparse.ArgumentParser) -> None:
    """The optimizer, the schedule and the budget."""
    train = p.add_argument_group("training")
    train.add_argument("--lr", type=float, default=1e-4,
                       help="peak learning rate (default: %(default)s)")
    train.add_argument("--optimizer", default="deepspeed", choices=("deepspeed", "adamw_8bit"),
                       help="deepspeed: the DeepSpeed config's optimizer; adamw_8bit: "
                       "bitsandbytes' 8-bit AdamW (GPU extra), with the config's betas/eps/decay "
                       "(default: %(default)s)")
    train.add_argument("--lr_schedule", default="linear", choices=("linear", "cosine", "constant"),
                       help="decay after warm-up, to 0 at the end of the run (default: "
                       "%(default)s)")
    train.add_argument("--warmup_steps", type=int, default=0,
                       help="linear warm-up steps (default: %(default)s)")
    train.add_argument("--epochs", type=float, default=None,
                       help="passes over the training blocks")
    train.add_argument("--max_steps", type=int, default=None,
                       help="optimizer steps to run; overrides --epochs (default: "
                       f"{DEFAULT_MAX_STEPS} when --epochs is not given, a few minutes for the "
                       "built-in model on 2 CPU cores)")
    train.add_argument("--max_nonfinite_batches", type=int, default=5,
                       help="a micro-batch whose loss is NaN/inf on any rank is skipped on every "
                       "rank (no backward, no update); after this many in a row the run saves a "
                       "checkpoint and stops, naming the bad loss terms; 1 stops at the first "
                       "(default: %(default)s)")


def _add_output_options(p: argparse.ArgumentParser) -> None:
    """Evaluation, logging, checkpoints, the output directory, resuming and the export."""
    out = p.add_argument_group("evaluation, logging and checkpoints")
    out.add_argument("--eval_every", type=int, default=100,
                     help="validation perplexity every N steps; 0: only before and after "
                     "(default: %(default)s)")
    out.add_argument("--eval_max_blocks", type=int, default=None,
                     help="evaluate on at most this many validation blocks (default: all)")
    out.add_argument("--eval_train_blocks", type=int, default=0,
                     help="also the student's perplexity on the first N training blocks at "
                     "each evaluation, logged as train_ppl: the training curve of objectives "
                     "whose loss is not the CE, to see overfitting (default: %(default)s, none)")
    out.add_argument("--log_every", type=int, default=10,
                     help="metrics line every N steps (default: %(default)s)")
    out.add_argument("--save_every", type=int, default=0,
                     help="checkpoint every N steps; 0: only at the end (default: %(default)s)")
    out.add_argument("--keep_checkpoints", type=int, default=None,
                     help="keep the newest N checkpoints, deleting older ones once a new one is "
                     "complete; the one `latest` names is never deleted (default: keep all)")
    out.add_argument("--output_dir", default="runs/default",
                     help="checkpoints, metrics.jsonl, summary.json and the final HF model "
                     "(default: %(default)s)")
    out.add_argument("--overwrite_output_dir", action="store_true",
                     help="start a new run in an --output_dir that holds one: its checkpoints, "
                     "metrics, summary and hf/ are deleted when the new run starts, before "
                     "any model loads (nothing else in the directory is touched)")
    out.add_argument("--resume", default=None,
                     help="checkpoint to resume from: a checkpoint directory, or 'latest' (the "
                     "newest complete checkpoint in --output_dir). The options that define the "
                     "model, quantizer and objective must be the checkpoint's; a different "
                     "--max_steps or --epochs continues on the new schedule from the saved step")
    out.add_argument("--no_export", action="store_true",
                     help="skip writing the final Hugging Face model to OUTPUT_DIR/hf")
    out.add_argument("--export_dtype", default=None, choices=("fp32", "bf16", "fp16"),
                     help="dtype of the final Hugging Face model (default: the training dtype)")

def add_data_options(p: argparse.ArgumentParser, *, seed_help: str) -> None:
    """--dataset, --dataset_config, --text_column, --block_size, --seed: the rows a run trains
    on, shared by launch/train.py and tsld-cache."""
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default=BUILTIN_DATASET,
                      help="a Hugging Face dataset name, a local directory, or a .txt/.jsonl/.json "
                      "file: text (packed into blocks) or instruction examples with 'prompt' and "
                      "'response' or chat 'messages' (one per row, trained on the responses "
                      "only) (default: the built-in King James Bible corpus)")
    data.add_argument("--dataset_config", default=None,
                      help="the dataset's configuration name, e.g. wikitext-2-raw-v1")
    data.add_argument("--text_column", default=None,
                      help="column holding the text (default: 'text', else the only string "
                      "column)")
    data.add_argument("--block_size", "--max_length", type=int, default=128,
                      help="tokens per training row, at most the model's positions: text is cut "
                      "into blocks of this size, instruction examples are truncated (the log "
                      "counts them) and padded to it; the paper uses 512 (default: %(default)s)")
    data.add_argument("--seed", type=int, default=42,
                      help=f"{seed_help}; it also picks the validation split of a dataset "
                      "without one (default: %(default)s)")


def add_engine_options(p: argparse.ArgumentParser, *, ds_help: str) -> None:
    """--ds_config, --teacher_ds_config, --attn_implementation, --dist_timeout: the DeepSpeed
    engines a run starts, shared by launch/train.py and tsld-cache."""
    engines = p.add_argument_group("engines")
    engines.add_argument("--ds_config", default="ds_configs/zero3.json",
                         help=f"{ds_help} (default: %(default)s)")
    engines.add_argument("--teacher_ds_config", default=None,
                         help="DeepSpeed config of the teacher's inference engine (default: "
                         "derived from --ds_config: ZeRO-3, same precision and micro-batch, no "
                         "optimizer)")
    engines.add_argument("--attn_implementation", default=None,
                         choices=("eager", "sdpa", "flash_attention_2"),
                         help="attention kernel (default: transformers' choice; eager is forced "
                         "for --kd l2l, which needs attention scores)")
    engines.add_argument("--dist_timeout", type=float, default=1800,
                         help="seconds a collective may wait for the other ranks before the run "
                         "fails, so that a dead rank stops the others instead of hanging them "
                         "(default: %(default)s)")


def read_run_config(run_dir) -> RunConfig:
    """A run's configuration: its args.json over the parser's defaults (a run written before an
    option was added takes its default)."""
    values = vars(build_parser().parse_args([]))
    values.update(json.loads((Path(run_dir) / ARGS_FILE).read_text()))
    return to_config(values)


def defaults() -> RunConfig:
    """launch/train.py's configuration when no option is given."""
    return parse_args([])


def to_config(values: dict) -> RunConfig:
    """The RunConfig of parsed options: the launcher's --local_rank, and options an older
    args.json holds that runs no longer have, left out."""
    names = {f.name for f in dataclasses.fields(RunConfig)}
    return RunConfig(**{k: v for k, v in values.items() if k in names})


# Options that must be positive, and those that may also be 0 (None means "not given").
_POSITIVE = ("block_size", "max_steps", "epochs", "lr", "kd_temperature", "init_scale",
             "loss_chunk_size", "loss_vocab_chunk_size", "dist_timeout", "max_nonfinite_batches",
             "eval_max_blocks", "log_every", "keep_checkpoints", "group_size")
_NOT_NEGATIVE = ("warmup_steps", "eval_every", "save_every", "eval_train_blocks")
# torch.manual_seed and NumPy's generator take seeds in 0..2^32-1.
MAX_SEED = 2**32 - 1


def parse_args(argv=None) -> RunConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, value in vars(args).items():  # argparse's float() takes "inf" and "nan"
        if isinstance(value, float) and not math.isfinite(value):
            parser.error(f"--{name} must be a finite number, got {value}")
    for name in _POSITIVE:
        value = getattr(args, name)
        if value is not None and not value > 0:
            parser.error(f"--{name} must be positive, got {value}")
    for name in _NOT_NEGATIVE:
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be 0 or more, got {getattr(args, name)}")
    if not 0 <= args.seed <= MAX_SEED:
        parser.error(f"--seed must be in 0..{MAX_SEED}, got {args.seed}")
    if args.block_size < 2:
        parser.error("--block_size must be at least 2 (one input and one next token)")
    if args.max_steps is None and args.epochs is None:
        args.max_steps = DEFAULT_MAX_STEPS
    if args.resume is not None and args.overwrite_output_dir:
        parser.error("--resume continues a run and --overwrite_output_dir starts a new one; "
                     "pass one of them")
    if args.bits == 16 and args.quant_method is not None:
        parser.error("--quant_method applies to 2, 4 and 8 bits; --bits 16 trains in full "
                     "precision")
    if args.init_scale is not None and args.quant_method != "pact":
        method = f"--quant_method {args.quant_method}" if args.quant_method else "the default " \
            "quantizer"
        parser.error(f"--init_scale is the initial clip scale of --quant_method pact; {method} "
                     "has none")
    if args.granularity == "group" and args.group_size is None and args.bits != 16:
        parser.error("--granularity group needs --group_size (input columns per scale)")
    if args.token_scale is not None and Objective.from_kd(args.kd).soft != "tsld":
        parser.error(f"--token_scale weighs the TSLD term; it needs --kd tsld or tsld_nogt, "
                     f"not --kd {args.kd}")
    args.token_scale = args.token_scale or "confidence"
    config = to_config(vars(args))
    objective = config.objective  # what could refuse it, argparse and the checks above have
    if args.teacher_cache is not None:
        if not objective.needs_teacher:
            parser.error(f"--teacher_cache holds a teacher's outputs; --kd {args.kd} uses none")
        if objective.layers:
            parser.error("--kd l2l needs the teacher's layers, which a --teacher_cache does not "
                         "hold; run the teacher (drop --teacher_cache)")
        if args.teacher_ds_config is not None:
            parser.error("--teacher_ds_config configures the teacher's engine; with "
                         "--teacher_cache no teacher runs")
    if args.from_scratch and objective.needs_teacher and args.teacher is None:
        parser.error("--from_scratch with distillation needs a separate --teacher "
                     "(a randomly initialised model cannot teach itself)")
    try:
        config.quant_config
    except UsageError as e:
        parser.error(str(e))
    return config
