"""benchmarks/kernel_speed.py's parts that run without a GPU: its options, the interleaved timing
loop, the verdicts against the targets, and the one line it prints where there is no CUDA."""
import pytest
import torch

from benchmarks import kernel_speed


def test_options_default_to_the_targets_cases_and_refuse_bad_sizes(capsys):
    args = kernel_speed.parse_args([])
    assert args.tokens == [1, 16, 256] and args.shapes == [(4096, 4096), (4096, 11008)]
    for bad in (["--tokens", "1,x"], ["--shapes", "4096"], ["--tokens", "0"], ["--reps", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            kernel_speed.parse_args(bad)
        assert exit_info.value.code == 2
    assert "--tokens and --shapes need positive sizes" in capsys.readouterr().err


def test_the_calls_compared_take_turns_and_report_medians():
    order, clock = [], iter(range(100))

    def measure(fn, args):
        fn(*args)
        elapsed = next(clock)
        return lambda: elapsed

    calls = {"baseline": (lambda x: order.append(("baseline", x)), [(0,), (1,)]),
             "kernel": (lambda x: order.append(("kernel", x)), [(0,), (1,), (2,)])}
    ms = kernel_speed.interleaved_medians(calls, warmup=1, reps=3, measure=measure,
                                          synchronize=lambda: None)
    assert order == [("baseline", 0), ("kernel", 0),  # warm-up
                     ("baseline", 0), ("kernel", 0), ("baseline", 1), ("kernel", 1),
                     ("baseline", 0), ("kernel", 2)]
    assert ms == {"baseline": 2, "kernel": 3}  # medians of 0, 2, 4 and 1, 3, 5


def test_verdicts_compare_the_worst_speedups_with_their_targets():
    results = kernel_speed.verdicts({"W2A16 M=1": 5.2, "W4A16 M=1": 2.9})
    assert results == [("W2A16 M=1", 5.2, 5.0, True), ("W4A16 M=1", 2.9, 3.0, False)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_it_says_so_in_one_line(capsys):
    assert kernel_speed.main([]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "needs CUDA" in out
