"""Where a caller can act on a run from outside it: `train()` takes a `TrainHooks` and calls it at
these points. The defaults do nothing; the fault-injection tests pass a subclass that injects
NaN losses or kills a rank mid-save, and benchmarks/step_overhead.py one that times each phase of a
step."""


class TrainHooks:
    def run_built(self, run) -> None:
        """Both engines are built (`tsld_ds.train.build.Run`); no step has run."""

    def loss_terms(self, terms: dict) -> dict:
        """A micro-batch's loss terms, before the NaN/inf check; returns the terms to go on with."""
        return terms

    def checkpoint_files_written(self, step: int) -> None:
        """This rank's files of checkpoint `step` are on disk; the checkpoint is not committed."""
