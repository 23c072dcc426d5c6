"""lm-evaluation-harness tasks (PIQA, ARC, OpenBookQA, GSM8K...) through its Hugging Face adaptor,
on the already loaded model — so packed models run with their packed Linears too."""
import importlib.util

from tsld_ds.errors import UsageError


def check_harness() -> None:
    """Refuse --tasks without lm-eval installed; called before any model loads."""
    if importlib.util.find_spec("lm_eval") is None:
        raise UsageError("--tasks needs lm-evaluation-harness: pip install lm-eval")


def run_tasks(model, tokenizer, tasks: list[str], *, batch_size: int = 8,
              limit: int | None = None, num_fewshot: int | None = None,
              include_path: str | None = None) -> dict:
    """{task: {metric: value}} as lm-eval reports them. `include_path`: a directory of task
    YAMLs of one's own, beside lm-eval's."""
    check_harness()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    adaptor = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        results = simple_evaluate(model=adaptor, tasks=tasks, limit=limit,
                                  num_fewshot=num_fewshot,
                                  task_manager=TaskManager(include_path=include_path))
    except KeyError as e:
        raise UsageError(f"--tasks: unknown lm-eval task {e}") from None
    return results["results"]
