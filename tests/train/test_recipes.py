"""The LLaMA-7B-class recipes in ds_configs/ run, at 2 gloo ranks on the tiny model: each file as
shipped, with only what names the hardware changed (micro-batch 2 for the tiny corpus, the
hierarchical partition = the 2 ranks of this one node)."""
import json

import pytest

from helpers import REPO, read_metrics, run_train, train_args

RECIPES = {
    "8x80gb": ("llama7b_8x80gb.json", None),
    "8x40gb-offload": ("llama7b_8x40gb_offload.json", None),
    "hpz-teacher": ("llama7b_8x80gb.json", "teacher_zero3_hpz.json"),
}


def recipe(tmp_path, name, **zero) -> str:
    config = json.loads((REPO / "ds_configs" / name).read_text())
    config["train_micro_batch_size_per_gpu"] = 2
    config["zero_optimization"].update(zero)
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize("student, teacher", RECIPES.values(), ids=RECIPES)
def test_recipe_trains_on_two_ranks(student, teacher, tiny_teacher_dir, small_corpus_dir,
                                    tmp_path):
    out = tmp_path / "run"
    options = {"max_steps": 2, "no_export": True, "eval_max_blocks": 4,
               "gradient_checkpointing": True}
    if teacher:
        options["teacher_ds_config"] = recipe(tmp_path, teacher, zero_hpz_partition_size=2)
    run_train(train_args(tiny_teacher_dir, small_corpus_dir, out, recipe(tmp_path, student),
                         **options))
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 2 and all(loss == loss for loss in losses)


def test_zero2_trains_as_zero3_does(tiny_teacher_dir, small_corpus_dir, tmp_path):
    """ds_configs/zero2.json (parameters whole on each rank) takes the same steps as zero3.json
    (sharded), to float32 round-off: the stage changes where the states live, not the math."""
    losses = {}
    for name in ("zero2.json", "zero3.json"):
        out = tmp_path / f"run-{name}"
        run_train(train_args(tiny_teacher_dir, small_corpus_dir, out, recipe(tmp_path, name),
                             max_steps=3, no_export=True, eval_max_blocks=4))
        losses[name] = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses["zero2.json"]) == 3
    assert losses["zero2.json"] == pytest.approx(losses["zero3.json"], rel=1e-5)
