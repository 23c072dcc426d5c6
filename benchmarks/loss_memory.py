"""Forward+backward time and peak memory added by the distillation loss: naive vs fused.

Every run is a fresh subprocess: after a tiny warm-up, the inputs (student final hidden states
and lm_head, teacher logits, labels) are allocated, a baseline is taken, then the loss runs
forward and backward once. Added peak = CPU: peak RSS (ru_maxrss) above the baseline; CUDA:
torch.cuda.max_memory_allocated above the baseline. It includes the gradients the loss produces.
Repeats alternate fused and naive runs, so that load from other processes hits both alike; the
table gives the fastest time and the median peak of each.

    python benchmarks/loss_memory.py                       # CPU, fp32, H=512, N=2048, both V
    python benchmarks/loss_memory.py --cases 8192x32000,8192x128256 --memory-budget-gb 12
    python benchmarks/loss_memory.py --device cuda         # bf16, H=4096, N up to 16384
    python benchmarks/loss_memory.py --vocab-chunk-size 16384  # fused in vocabulary blocks too
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DEFAULT_CASES = {
    "cpu": "2048x32000,2048x128256",
    "cuda": "2048x32000,2048x128256,8192x32000,8192x128256,16384x32000,16384x128256",
}
# Naive added peak in [N, V] float32 blocks (logits, log-softmaxes, teacher probabilities and
# their gradients): measured 6.0 on CPU for kd=tsld. Only used to skip cases over the budget.
NAIVE_BLOCKS = 7
MIB = 1 << 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--cases", help="comma-separated NxV with N = B*L tokens (default: per device)")
    p.add_argument("--hidden", type=int, help="H (default 512 on CPU, 4096 on CUDA)")
    p.add_argument("--seq-len", type=int, default=512, help="L; B = N / L")
    p.add_argument("--kd", default="tsld", choices=["gt", "logit", "logit_gt", "tsld"])
    p.add_argument("--teacher", choices=["logits", "hidden"], default="logits",
                   help="teacher as logits [B, L, V] (an input) or as hidden states + lm_head")
    p.add_argument("--chunk-size", type=int, help="fused: tokens per chunk (default: automatic)")
    p.add_argument("--vocab-chunk-size", type=int,
                   help="fused: vocabulary entries per block (default: the whole vocabulary)")
    p.add_argument("--repeats", type=int, default=3, help="runs per case and implementation")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default)")
    p.add_argument("--memory-budget-gb", type=float, default=12.0,
                   help="skip naive cases whose estimated added peak exceeds this")
    p.add_argument("--json", help="also write every case's figures to this JSON file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_case(spec):
    """Worker: build the inputs, take the baseline, run the loss; returns the measurements."""
    import torch

    from tsld_ds.losses import Objective, TeacherOutput

    device, tokens, vocab, hidden = spec["device"], spec["tokens"], spec["vocab"], spec["hidden"]
    objective = Objective.from_kd(spec["kd"], impl=spec["impl"], chunk_size=spec["chunk_size"],
                                  vocab_chunk_size=spec["vocab_chunk_size"])
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    seq_len = min(spec["seq_len"], tokens)
    batch = tokens // seq_len
    torch.manual_seed(0)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])

    def randn(*shape, std):  # in place: a transient copy would raise the baseline's high-water
        return torch.randn(*shape, device=device, dtype=dtype).mul_(std)

    def make_inputs(batch, seq_len, vocab, hidden):
        student_hidden = randn(batch, seq_len, hidden, std=1.0).requires_grad_()
        lm_head_weight = randn(vocab, hidden, std=hidden**-0.5).requires_grad_()
        labels = torch.randint(0, vocab, (batch, seq_len), device=device)
        labels[:, :8] = -100  # a prompt that is not scored
        inputs = dict(student_hidden=student_hidden, lm_head_weight=lm_head_weight, labels=labels,
                      teacher=None)
        if objective.needs_teacher and spec["teacher"] == "logits":
            inputs.update(teacher=TeacherOutput(logits=randn(batch, seq_len, vocab, std=2.0)))
        elif objective.needs_teacher:
            inputs.update(teacher=TeacherOutput(
                hidden=randn(batch, seq_len, hidden, std=1.0),
                weight=randn(vocab, hidden, std=hidden**-0.5)))
        return inputs

    def forward_backward(inputs):
        objective(**inputs)["loss"].backward()
        if device == "cuda":
            torch.cuda.synchronize()
        inputs["student_hidden"].grad = inputs["lm_head_weight"].grad = None

    # Warm up on a tiny problem so that lazily loaded kernels do not count as the loss's memory.
    forward_backward(make_inputs(2, 16, 64, 32))
    inputs = make_inputs(batch, seq_len, vocab, hidden)

    peak, seconds = added_peak(lambda: forward_backward(inputs), device)
    return {"peak_bytes": peak, "seconds": seconds, "threads": torch.get_num_threads()}


def added_peak(fn, device: str) -> tuple:
    """(bytes, seconds) of one call of `fn`: the peak memory it adds above what is allocated
    before it (CUDA: max_memory_allocated; CPU: the process's peak RSS, ru_maxrss, so run it in
    a fresh process whose earlier high-water mark is below the baseline) and its time."""
    import torch
    if device == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device == "cuda":
        return torch.cuda.max_memory_allocated() - baseline, seconds
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline, seconds


def run_subprocess(args, impl, tokens, vocab, hidden):
    spec = dict(device=args.device, impl=impl, tokens=tokens, vocab=vocab, hidden=hidden,
                seq_len=args.seq_len, kd=args.kd, teacher=args.teacher,
                chunk_size=args.chunk_size, vocab_chunk_size=args.vocab_chunk_size,
                threads=args.threads)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} N={tokens} V={vocab} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(args, impls, tokens, vocab, hidden):
    """{impl: (median added peak in MiB, fastest seconds)}, repeats interleaved across impls."""
    runs = {impl: [] for impl in impls}
    for _ in range(args.repeats):
        for impl in impls:
            runs[impl].append(run_subprocess(args, impl, tokens, vocab, hidden))
    return {impl: (statistics.median(r["peak_bytes"] for r in results) / MIB,
                   min(r["seconds"] for r in results))
            for impl, results in runs.items()}


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_case(json.loads(args.worker))))
        return
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device here")
    hidden = args.hidden or (512 if args.device == "cpu" else 4096)
    cases = [tuple(int(x) for x in case.split("x"))
             for case in (args.cases or DEFAULT_CASES[args.device]).split(",")]
    header = (f"| {'N':>6} | {'V':>6} | {'H':>4} | {'naive MiB':>9} | {'fused MiB':>9} | "
              f"{'mem ×':>5} | {'naive s':>7} | {'fused s':>7} | {'time ×':>6} |")
    threads = args.threads or "default"
    print(f"device={args.device} kd={args.kd} teacher={args.teacher} threads={threads} "
          f"chunk={args.chunk_size or 'auto'} vocab_chunk={args.vocab_chunk_size or 'all'} "
          f"repeats={args.repeats}: median added peak memory above the inputs, "
          "fastest forward+backward time")
    print(header)
    print("|" + "|".join("-" * len(col) for col in header.split("|")[1:-1]) + "|")
    figures = []
    for tokens, vocab in cases:
        estimate_gb = NAIVE_BLOCKS * tokens * vocab * 4 / 1e9
        run_naive = estimate_gb <= args.memory_budget_gb
        impls = ["fused", "naive"] if run_naive else ["fused"]
        results = measure(args, impls, tokens, vocab, hidden)
        figures.append({"tokens": tokens, "vocab": vocab, "hidden": hidden, "kd": args.kd,
                        "teacher": args.teacher, "device": args.device,
                        **{f"{impl}_added_peak_mib": mib for impl, (mib, _) in results.items()},
                        **{f"{impl}_seconds": sec for impl, (_, sec) in results.items()}})
        fused_mib, fused_s = results["fused"]
        row = f"| {tokens:>6} | {vocab:>6} | {hidden:>4} | "
        if run_naive:
            naive_mib, naive_s = results["naive"]
            # A case small enough to stay under the process's earlier high-water mark adds 0.
            ratio = f"{naive_mib / fused_mib:>5.1f}" if fused_mib > 0 else f"{'-':>5}"
            row += (f"{naive_mib:>9.0f} | {fused_mib:>9.0f} | {ratio} | "
                    f"{naive_s:>7.2f} | {fused_s:>7.2f} | {naive_s / fused_s:>6.2f} |")
        else:
            row += (f"{'skipped':>9} | {fused_mib:>9.0f} | {'-':>5} | {'-':>7} | {fused_s:>7.2f} | "
                    f"{'-':>6} | naive skipped: est. {estimate_gb:.1f} GB > budget "
                    f"{args.memory_budget_gb:g} GB")
        print(row, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
