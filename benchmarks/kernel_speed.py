"""GPU timings of the tsld_ds kernels against their PyTorch counterparts.

- Fused quantize (tsld_ds.ops.fused_quantize) vs the reference tsld_ds.quant.quantize_weight, for
  4096x4096 and 11008x4096 weights.
- Packed W2A16 (ternary, one scale per row) and W4A16 (asymmetric, groups of 128) matmul
  (tsld_ds.ops.packed_linear) vs torch.matmul in bf16, for M = 1, 4, 16, 128 tokens and
  (N, K) = (4096, 4096), (11008, 4096), (4096, 11008).

Each time is the median over --reps runs, after --warmup runs, of CUDA events recorded around one
call; the inputs rotate over enough copies that the L2 cache cannot serve them, and a GPU-side
spin before each run keeps the CPU's launch overhead out of the measurement (kernel time, as under
CUDA graphs). Achieved bandwidth
counts the bytes a call must move (inputs once, output once) and is compared with the measured
device-to-device copy bandwidth. Speedups are computed within this run.

Targets on an H100: fused quantize >= 3x the reference; at M = 1, W2A16 >= 5x and W4A16 >= 3x
bf16.

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
MATMUL_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
TOKENS = [1, 4, 16, 128]
TARGETS = {"fused quantize": 3.0, "W2A16 M=1": 5.0, "W4A16 M=1": 3.0}
ROTATION_BYTES = 3  # rotated inputs span this many times the L2 cache
MAX_COPIES = 256
SPIN_CYCLES = 1_000_000  # ~0.5 ms: longer than Python takes to enqueue one call


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
    return args


def median_ms(torch, fn, inputs, warmup, reps):
    """Median time of fn(*inputs[i % len(inputs)]) in milliseconds, by CUDA events."""
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for i, (start, end) in enumerate(events):
        args = inputs[i % len(inputs)]
        torch.cuda._sleep(SPIN_CYCLES)  # the call below is enqueued before the GPU reaches it
        start.record()
        fn(*args)
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def copies_for(torch, nbytes):
    """How many copies of an input of `nbytes` make the rotation overflow the L2 cache."""
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(2, min(MAX_COPIES, math.ceil(ROTATION_BYTES * l2 / max(nbytes, 1)) + 1))


def copy_bandwidth(torch, warmup, reps):
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written)."""
    nbytes = 1 << 30
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(torch, lambda: dst.copy_(src), [()], warmup, reps)
    return 2 * nbytes / ms / 1e6


def nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


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
                    ref = median_ms(torch, lambda w: quantize_weight(w, cfg), weights,
                                    args.warmup, args.reps)
                    fused = median_ms(torch, lambda w: fused_quantize(w, cfg), weights,
                                      args.warmup, args.reps)
                gbs = 2 * size / fused / 1e6  # read the weight, write the quantized weight
                speedups.append(ref / fused)
                rows.append([f"quantize {name}", f"{str(dtype)[6:]} {shape[0]}x{shape[1]}", "",
                             f"{ref * 1e3:.1f}", f"{fused * 1e3:.1f}", f"{ref / fused:.2f}x",
                             f"{gbs:.0f}", f"{100 * gbs / copy_gbs:.0f}%"])
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
    from tsld_ds.ops import packed_linear

    at_one_token = {}
    for n, k in args.shapes:
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
                 for _ in range(copies_for(torch, n * k * 2))]
        xs = {m: [torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                  for _ in range(min(64, copies_for(torch, m * k * 2)))] for m in args.tokens}

        def pairs(m, weights):  # every weight copy, each with an activation copy
            return [(xs[m][i % len(xs[m])], *w) for i, w in enumerate(weights)]

        with torch.no_grad():
            base = {m: median_ms(torch, lambda x, w: torch.matmul(x, w.t()),
                                 pairs(m, [(w,) for w in dense]), args.warmup, args.reps)
                    for m in args.tokens}
        del dense
        for bits in (2, 4):
            name = f"W{bits}A16"
            copies = copies_for(torch, n * -(-k * bits // 32) * 4)
            weights, group = packed_copies(torch, n, k, bits, copies)

            def run(x, packed, scale, zero):
                return packed_linear(x, packed, scale, zero, bits=bits, group_size=group)

            for m in args.tokens:
                with torch.no_grad():
                    fast = median_ms(torch, run, pairs(m, weights), args.warmup, args.reps)
                gbs = (nbytes(xs[m][0], *weights[0]) + m * n * 2) / fast / 1e6
                if m == 1:
                    at_one_token.setdefault(f"{name} M=1", []).append(base[m] / fast)
                rows.append([f"matmul {name}", f"N={n} K={k}", str(m), f"{base[m] * 1e3:.1f}",
                             f"{fast * 1e3:.1f}", f"{base[m] / fast:.2f}x", f"{gbs:.0f}",
                             f"{100 * gbs / copy_gbs:.0f}%"])
            del weights
    return {key: min(values) for key, values in at_one_token.items()}


HEADER = ["case", "shape", "M", "baseline us", "kernel us", "speedup", "kernel GB/s",
          "of copy BW"]


def print_table(rows):
    header = HEADER
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(str(cell).rjust(w) if i > 1 else str(cell).ljust(w)
                        for i, (cell, w) in enumerate(zip(row, widths))))


def main(argv=None):
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/kernel_speed.py: no CUDA device here; the kernels only run on a GPU (the "
              "PyTorch references are what CPU machines use). Nothing to time.")
        return 0
    from tsld_ds.ops import kernels_info, kernels_summary

    print(kernels_summary())
    if kernels_info()["backend"] != "cuda":
        print("The kernels did not load, so there is nothing to compare.")
        return 1
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth(torch, args.warmup, args.reps)
    print(f"device-to-device copy bandwidth: {copy_gbs:.0f} GB/s "
          f"({torch.cuda.get_device_name()}); times are medians of {args.reps} runs\n")
    rows, achieved = [], {}
    if args.only in (None, "quantize"):
        achieved.update(bench_quantize(torch, args, copy_gbs, rows))
    if args.only in (None, "matmul"):
        achieved.update(bench_matmul(torch, args, copy_gbs, rows))
    print_table(rows)
    print("\nbaseline: the PyTorch reference quantizer, or torch.matmul in bf16")
    missed = False
    for key, value in achieved.items():
        ok = value >= TARGETS[key]
        missed |= not ok
        verdict = "PASS" if ok else "MISS"
        print(f"{verdict}  {key}: worst speedup {value:.2f}x (target {TARGETS[key]:.0f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_gbs": copy_gbs,
                       "rows": [dict(zip(HEADER, row)) for row in rows],
                       "worst_speedups": achieved,
                       "targets": {k: TARGETS[k] for k in achieved}}, f, indent=2)
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
