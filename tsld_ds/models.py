"""Loading causal LMs and tokenizers, partitioned under ZeRO-3 from the start.

With a ZeRO-3 config active (`HfDeepSpeedConfig`), `from_pretrained` creates the model inside
`deepspeed.zero.Init` and only rank 0 reads the checkpoint's values, so no rank ever holds a full
copy of the model.
"""
import contextlib
import functools
import hashlib
import os
import re
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
)
from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from tsld_ds.errors import UsageError
from tsld_ds.files import sha256_file

ASSETS = Path(__file__).resolve().parent / "assets"
BUILTIN_MODEL = str(ASSETS / "tiny-llama-kjv")

# Output-layer transforms that a plain `hidden @ lm_head.T` would miss; the fused loss reads the
# lm_head weight directly, so such models are refused rather than silently trained wrong.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def check_model_source(name_or_path: str, what: str, marker: str = "config.json") -> None:
    """Refuse a local path that does not exist, or a directory without `marker` (config.json
    for a model, tokenizer_config.json for a tokenizer), before anything heavy starts."""
    path = os.path.expanduser(name_or_path)
    if os.path.exists(path):
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, marker)):
            raise UsageError(f"{what} directory '{name_or_path}' has no {marker}: "
                             "it is not a Hugging Face directory of that kind")
        return
    # Hub ids are "name" or "org/name"; anything else that does not exist is a mistyped path.
    if name_or_path.startswith((".", "~")) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name_or_path):
        raise UsageError(f"{what} path '{name_or_path}' does not exist")


def read_config(name_or_path: str, what: str):
    """A model's config (transformers' AutoConfig), or one clear line naming `what` it was."""
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot read the config of {what} '{name_or_path}': {first}; pass a "
                         "local model directory, a shipped config name or a Hugging Face id "
                         "that this machine can reach") from None


def check_causal_lm(config, what: str, name_or_path: str) -> None:
    """Refuse, from its config alone, a model that is not a causal LM: a model type transformers
    has no causal-LM class for (T5), `architectures` that name none (BertForMaskedLM), or an
    encoder whose causal-LM class would attend both ways (a BERT-like without is_decoder)."""
    model_type = config.model_type
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UsageError(f"{what} '{name_or_path}' is a {model_type} model, which transformers "
                         "has no causal LM class for; tsld-ds takes causal LMs")
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(_is_causal_lm_class(a) for a in architectures):
        raise UsageError(f"{what} '{name_or_path}' is a {', '.join(architectures)}, not a causal "
                         "LM (a *ForCausalLM or *LMHeadModel); tsld-ds takes causal LMs")
    # Encoders pretrained as masked LMs have a causal-LM class that is causal only as a decoder.
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", True):
        raise UsageError(f"{what} '{name_or_path}' is a {model_type} encoder (is_decoder is "
                         "false: it attends both ways), not a causal LM; tsld-ds takes causal LMs")


def _is_causal_lm_class(name: str) -> bool:
    # The suffixes also take spellings older than the mapping's (LLaMAForCausalLM).
    return name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() or \
        name.endswith(("ForCausalLM", "LMHeadModel"))


# The files that make a model what it is: its config and its weights.
MODEL_FILES = ("config.json", "*.safetensors", "*.bin")


def model_identity(name_or_path: str) -> str:
    """The one notion of "the same model": SHA-256 over a model's config and weight files, names
    and contents, wherever it lies (a copy staged to node-local storage is the same model). A hub
    name is resolved to its local snapshot, downloading what is missing, as loading it would.
    Computed once per process for files that have not changed since."""
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(name_or_path, allow_patterns=[*MODEL_FILES,
                                                                    "*.index.json"]))
    files = [f for pattern in MODEL_FILES for f in sorted(path.glob(pattern)) if f.is_file()]
    return _content_digest(tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns)
                                 for f in files))


@functools.lru_cache(maxsize=None)
def _content_digest(files: tuple) -> str:
    digest = hashlib.sha256()
    for file, _, _ in files:
        digest.update(Path(file).name.encode() + bytes.fromhex(sha256_file(file)))
    return digest.hexdigest()


def check_gradient_checkpointing(name_or_path: str, what: str) -> None:
    """Refuse --gradient_checkpointing for a model class transformers cannot checkpoint, from its
    config alone (a config that cannot be read is left for the model's loading to report)."""
    try:
        config = AutoConfig.from_pretrained(name_or_path)
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except (OSError, ValueError, KeyError):
        return
    if not model_class.supports_gradient_checkpointing:
        raise UsageError(f"{what} '{name_or_path}' ({model_class.__name__}) does not support "
                         "gradient checkpointing; drop --gradient_checkpointing")


def check_same_vocabulary(student: str, teacher: str) -> None:
    """Refuse a teacher that predicts another vocabulary than the student, from the configs
    alone, before either model loads (configs that cannot be read are left to the loading; the
    loaded lm_heads are compared again)."""
    try:
        sizes = [AutoConfig.from_pretrained(name).vocab_size for name in (student, teacher)]
    except (OSError, ValueError, AttributeError):
        return
    if sizes[0] != sizes[1]:
        raise UsageError(f"teacher '{teacher}' predicts {sizes[1]} tokens but student "
                         f"'{student}' {sizes[0]}: their vocabularies differ")


@functools.lru_cache(maxsize=4)
def meta_model(name_or_path: str, what: str) -> torch.nn.Module:
    """The model `name_or_path`'s config describes, on the meta device: its modules and shapes
    without memory or weights, in about a second at 7B; built once per process for the checks
    that read it (not to be modified)."""
    config = read_config(name_or_path, what)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def check_weights_match_config(name_or_path: str, what: str) -> None:
    """Refuse a local model whose weight files hold other shapes than its config gives (a config
    edited or copied from another model), from the safetensors headers, before it loads."""
    files = sorted(Path(name_or_path).expanduser().glob("*.safetensors"))
    if not files:
        return  # a hub name, or .bin weights: left to the loading
    stored = {}
    for file in files:
        with safe_open(file, "pt") as f:  # reads the header only
            stored.update((name, list(f.get_slice(name).get_shape())) for name in f.keys())
    expected = {name: list(p.shape) for name, p in
                meta_model(name_or_path, what).state_dict().items()}
    for name in sorted(stored.keys() & expected.keys()):
        if stored[name] != expected[name]:
            raise UsageError(f"{what} '{name_or_path}': its weights do not match its config.json "
                             f"({name} is {stored[name]} in the weight files, "
                             f"{expected[name]} by the config)")


def check_block_size(name_or_path: str, block_size: int, *, warn: bool = True) -> None:
    """Refuse a --block_size beyond a model's learned position embeddings (they have no row for
    it: an IndexError deep in the forward); with rotary positions, warn (they extend, but the
    model was not trained that long). Reads the config only; a config that cannot be read is
    left for the model's loading to report."""
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError):
        return
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int) or block_size <= positions:
        return
    rotary = any("rope" in key or "rotary" in key for key in config.to_dict())
    if not rotary:
        raise UsageError(f"--block_size {block_size} is longer than the {positions} positions "
                         f"'{name_or_path}' has learned embeddings for; use --block_size "
                         f"{positions} or less")
    if warn:
        print(f"warning: --block_size {block_size} is longer than the {positions} positions "
              f"'{name_or_path}' was trained on (rotary positions extend, untrained)",
              file=sys.stderr)


def torch_dtype_of(ds_config: dict) -> torch.dtype:
    if ds_config.get("bf16", {}).get("enabled", False):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled", False):
        return torch.float16
    return torch.float32


@contextlib.contextmanager
def zero3_loading(ds_config: dict):
    """Makes transformers build models partitioned (zero.Init) when the config is ZeRO-3."""
    if ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
        yield
        return
    handle = HfDeepSpeedConfig(ds_config)  # transformers keeps only a weak reference: hold it
    try:
        yield handle
    finally:
        unset_hf_deepspeed_config()


def load_causal_lm(name_or_path: str, ds_config: dict, *, from_scratch: bool = False,
                   attn_implementation: str | None = None, what: str = "model"):
    dtype = torch_dtype_of(ds_config)
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        with zero3_loading(ds_config):
            if from_scratch:
                config = AutoConfig.from_pretrained(name_or_path)
                model = AutoModelForCausalLM.from_config(config, **kwargs)
            else:
                model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load {what} '{name_or_path}': {e}") from e
    check_plain_lm_head(model, f"{what} '{name_or_path}'")
    return model


def check_plain_lm_head(model, what: str) -> None:
    """Logits must be `hidden @ lm_head.T (+ bias)`: the fused losses and perplexity compute
    them that way from the final hidden states."""
    for attr in _LOGIT_TRANSFORMS:
        if getattr(model.config, attr, None) not in (None, 1, 1.0):
            raise UsageError(f"{what} transforms its logits ({attr}="
                             f"{getattr(model.config, attr)}), which tsld-ds does not support")
    if model.get_output_embeddings() is None:
        raise UsageError(f"{what} has no output embedding (lm_head)")


def has_tokenizer(name_or_path: str) -> bool:
    """Whether a local model directory holds a tokenizer (a hub name is taken to)."""
    path = Path(name_or_path).expanduser()
    return not path.is_dir() or (path / "tokenizer_config.json").is_file()


def load_tokenizer(name_or_path: str):
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load the tokenizer of '{name_or_path}': "
                         f"{' '.join(str(e).split())}") from e  # one line: some span several
    if tokenizer.eos_token_id is None:
        raise UsageError(f"tokenizer of '{name_or_path}' has no EOS token to separate documents")
    return tokenizer


def model_body(model):
    """The decoder stack without the lm_head: returns final (normed) hidden states."""
    return model.base_model


def param_shape(param: torch.nn.Parameter) -> torch.Size:
    """A parameter's full shape, also when ZeRO-3 has partitioned it away (0 local elements)."""
    return getattr(param, "ds_shape", param.shape)


def vocab_size_of(model) -> int:
    """Rows of the lm_head: the logits' last dimension (may exceed the tokenizer's vocabulary)."""
    return param_shape(model.get_output_embeddings().weight)[0]
