"""GPU timings of the tsld_ds Triton kernels against their PyTorch counterparts.

- Fused quantize (tsld_ds.ops.fused_quantize) vs the reference tsld_ds.quant.quantize_weight, for
  4096x4096 and 11008x4096 weights.
- Packed W2A16 (ternary, one scale per row) and W4A16 (asymmetric, groups of 128) matmul
  (tsld_ds.ops.packed_matmul) vs torch.matmul in bf16, for M = 1, 16, 256 tokens and
  (N, K) = (4096, 4096), (4096, 11008) by default.

The calls compared take turns (interleaved: baseline, kernel, baseline, kernel, ...), so that
clock and temperature drift hit both alike; each time is the median over --reps runs, after
--warmup runs, of CUDA events recorded around one call. The inputs rotate over enough copies that
the L2 cache cannot serve them, and a GPU-side spin before each call keeps the CPU's launch
overhead out of the measurement (kernel time, as under CUDA graphs). Achieved bandwidth counts the
bytes a call must move (inputs once, output once) and is compared with the device-to-device copy
bandwidth measured in the same run. Speedups are baseline / kernel within this run.

Targets on an H100: fused quantize >= 3x the reference; at M = 1, W2A16 >= 5x and W4A16 >= 3x
bf16 (the Marlin class).

    python benchmarks/kernel_speed.py
    python benchmarks/kernel_speed.py --only matmul --reps 500
    python benchmarks/kernel_speed.py --check      # exit status 1 when a target is missed
    python benchmarks/kernel_speed.py --tokens 1,16,256 --shapes 4096x4096,4096x11008 --json k.json
"""
import argparse
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

QUANT_SHAPES = [(4096, 4096), (11008, 4096)]
MATMUL_SHAPES = [(4096, 4096), (4096, 11008)]
TOKENS = [1, 16, 256]
TARGETS = {"fused quantize": 3.0, "W2A16 M=1": 5.0, "W4A16 M=1": 3.0}
ROTATION_BYTES = 3  # rotated inputs span this many times the L2 cache
MAX_COPIES = 256
SPIN_CYCLES = 1_000_000  # ~0.5 ms: longer than Python takes to enqueue one call
HEADER = ["case", "shape", "M", "baseline us", "kernel us", "speedup", "kernel GB/s",
          "of copy BW"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["quantize", "matmul"], help="run one of the two benchmarks")
    p.add_argument("--reps", type=int, default=200, help="timed runs per case (median reported)")
    p.add_argument("--warmup", type=int, default=20, help="untimed runs per case")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)),
                   help="matmul: comma-separated M (tokens) (default: %(default)s)")
    p.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in MATMUL_SHAPES),
                   help="matmul: comma-separated NxK weight shapes, out x in features "
                   "(default: %(default)s)")
    p.add_argument("--json", help="also write the table and the speedups to this JSON file")
    args = p.parse_args(argv)
    try:
        args.tokens = [int(m) for m in args.tokens.split(",")]
        args.shapes = [tuple(int(d) for d in shape.split("x")) for shape in args.shapes.split(",")]
    except ValueError:
        p.error(f"--tokens {args.tokens!r} / --shapes {args.shapes!r}: expected 1,16 / 4096x4096")
    if any(m < 1 for m in args.tokens) or any(len(s) != 2 or min(s) < 1 for s in args.shapes):
        p.error("--tokens and --shapes need positive sizes, shapes as NxK")
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be positive and --warmup not negative")
    return args


def interleaved_medians(calls: dict, warmup: int, reps: int, measure, synchronize) -> dict:
    """{name: median ms} of calls {name: (fn, inputs)}, where fn(*inputs[i % len(inputs)]) is the
    i-th run, the calls taking turns run by run. measure(fn, args) runs one call and returns a
    function that gives its time once synchronize() has returned."""
    for i in range(warmup):
        for fn, inputs in calls.values():
            fn(*inputs[i % len(inputs)])
    pending = {name: [] for name in calls}
    for i in range(reps):
        for name, (fn, inputs) in calls.items():
            pending[name].append(measure(fn, inputs[i % len(inputs)]))
    synchronize()
    return {name: statistics.median(ms() for ms in runs) for name, runs in pending.items()}


def cuda_timer(torch):
    """(measure, synchronize) for interleaved_medians with CUDA events."""

    def measure(fn, args):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(SPIN_CYCLES)  # the call below is enqueued before the GPU reaches it
        start.record()
        fn(*args)
        end.record()
        return lambda: start.elapsed_time(end)

    return measure, torch.cuda.synchronize


def copies_for(torch, nbytes):
    """How many copies of an input of `nbytes` make the rotation overflow the L2 cache."""
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(2, min(MAX_COPIES, math.ceil(ROTATION_BYTES * l2 / max(nbytes, 1)) + 1))


def copy_bandwidth(torch, args):
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written)."""
    nbytes = 1 << 30
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = interleaved_medians({"copy": (lambda: dst.copy_(src), [()])}, args.warmup, args.reps,
                             *cuda_timer(torch))["copy"]
    return 2 * nbytes / ms / 1e6


def nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def row(case, shape, m, base_ms, kernel_ms, moved_bytes, copy_gbs):
    gbs = moved_bytes / kernel_ms / 1e6
    return [case, shape, m, f"{base_ms * 1e3:.1f}", f"{kernel_ms * 1e3:.1f}",
            f"{base_ms / kernel_ms:.2f}x", f"{gbs:.0f}", f"{100 * gbs / copy_gbs:.0f}%"]


def bench_quantize(torch, args, copy_gbs, rows):
    from tsld_ds.ops import fused_quantize
    from tsld_ds.quant import QuantConfig, quantize_weight

    configs = [("TWN 2-bit / row", QuantConfig(bits=2)),
               ("min-max 4-bit / g128", QuantConfig(bits=4, granularity="group", group_size=128))]
    speedups = []
    for dtype in (torch.float32, torch.bfloat16):
        for shape in QUANT_SHAPES:
            size = shape[0] * shape[1] * torch.finfo(dtype).bits // 8
            weights = [(torch.randn(shape, device="cuda", dtype=dtype),)
                       for _ in range(copies_for(torch, size))]
            for name, cfg in configs:
                with torch.no_grad():
                    ms = interleaved_medians(
                        {"reference": (lambda w: quantize_weight(w, cfg), weights),
                         "kernel": (lambda w: fused_quantize(w, cfg), weights)},
                        args.warmup, args.reps, *cuda_timer(torch))
                speedups.append(ms["reference"] / ms["kernel"])
                rows.append(row(f"quantize {name}", f"{str(dtype)[6:]} {shape[0]}x{shape[1]}", "",
                                ms["reference"], ms["kernel"], 2 * size, copy_gbs))
            del weights
    return {"fused quantize": min(speedups)}


def packed_copies(torch, n, k, bits, copies):
    """`copies` random packed weights on the GPU: ternary per row, or 4-bit asymmetric g128."""
    from tsld_ds.packed.format import pack_weight

    group = None if bits == 2 else 128
    groups = 1 if group is None else -(-k // group)
    out = []
    for _ in range(copies):
        lo, hi = (-1, 2) if bits == 2 else (-8, 8)
        codes = torch.randint(lo, hi, (n, k), device="cuda", dtype=torch.int8)
        scale = torch.rand(n, groups, device="cuda") * 0.02
        zero = None if bits == 2 else torch.randint(-8, 8, (n, groups), device="cuda",
                                                    dtype=torch.int8)
        pw = pack_weight(codes, scale, bits, zero_point=zero, group_size=group)
        out.append((pw.weight_packed, pw.weight_scale, pw.weight_zero_point))
    return out, group


def bench_matmul(torch, args, copy_gbs, rows):
    from tsld_ds.ops import packed_matmul

    at_one_token = {}
    for n, k in args.shapes:
        dense = [(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02,)
                 for _ in range(copies_for(torch, n * k * 2))]
        packed = {bits: packed_copies(torch, n, k, bits, copies_for(torch, n * k * bits // 8))
                  for bits in (2, 4)}
        for m in args.tokens:
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                  for _ in range(min(64, copies_for(torch, m * k * 2)))]

            def with_x(weights):  # every weight copy, each with an activation copy
                return [(xs[i % len(xs)], *w) for i, w in enumerate(weights)]

            calls = {"bf16": (lambda x, w: torch.matmul(x, w.t()), with_x(dense))}
            for bits, (weights, group) in packed.items():
                def run(x, weight_packed, scale, zero, bits=bits, group=group):
                    return packed_matmul(x, weight_packed, scale, zero, bits=bits,
                                         group_size=group)

                if run(*with_x(weights)[0]) is None:
                    raise RuntimeError("the packed matmul kernel does not apply here")
                calls[f"W{bits}A16"] = (run, with_x(weights))
            with torch.no_grad():
                ms = interleaved_medians(calls, args.warmup, args.reps, *cuda_timer(torch))
            for bits, (weights, _) in packed.items():
                name = f"W{bits}A16"
                if m == 1:
                    at_one_token.setdefault(f"{name} M=1", []).append(ms["bf16"] / ms[name])
                moved = nbytes(xs[0], *weights[0]) + m * n * 2
                rows.append(row(f"matmul {name}", f"N={n} K={k}", str(m), ms["bf16"], ms[name],
                                moved, copy_gbs))
        del dense, packed
    return {key: min(values) for key, values in at_one_token.items()}


def print_table(rows):
    widths = [max(len(str(r[i])) for r in rows + [HEADER]) for i in range(len(HEADER))]
    for line in [HEADER] + rows:
        print("  ".join(str(cell).rjust(w) if i > 1 else str(cell).ljust(w)
                        for i, (cell, w) in enumerate(zip(line, widths))))


def verdicts(achieved: dict) -> list:
    """[(key, worst speedup, target, met)] for each target measured."""
    return [(key, value, TARGETS[key], value >= TARGETS[key]) for key, value in achieved.items()]


def main(argv=None):
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/kernel_speed.py: needs CUDA (the Triton kernels run on a GPU only); "
              "nothing timed on this machine")
        return 0
    from tsld_ds.ops import kernels_info, kernels_summary

    print(kernels_summary())
    if kernels_info()["backend"] != "triton":
        print("The Triton kernels do not run here, so there is nothing to compare.")
        return 1
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth(torch, args)
    print(f"device-to-device copy bandwidth: {copy_gbs:.0f} GB/s "
          f"({torch.cuda.get_device_name()}); times are medians of {args.reps} interleaved runs\n")
    rows, achieved = [], {}
    if args.only in (None, "quantize"):
        achieved.update(bench_quantize(torch, args, copy_gbs, rows))
    if args.only in (None, "matmul"):
        achieved.update(bench_matmul(torch, args, copy_gbs, rows))
    print_table(rows)
    print("\nbaseline: the PyTorch reference quantizer, or torch.matmul in bf16")
    results = verdicts(achieved)
    for key, value, target, met in results:
        print(f"{'PASS' if met else 'MISS'}  {key}: worst speedup {value:.2f}x "
              f"(target {target:.0f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_gbs": copy_gbs,
                       "rows": [dict(zip(HEADER, r)) for r in rows],
                       "worst_speedups": achieved,
                       "targets": {k: TARGETS[k] for k in achieved}}, f, indent=2)
    return 1 if args.check and not all(met for *_, met in results) else 0


if __name__ == "__main__":
    sys.exit(main())
