"""Peak memory that one quantized layer adds in forward + backward, against nn.Linear.

Every run is a fresh subprocess: the weight and the input are allocated, a baseline is taken,
then the layer runs forward and backward once. Added peak = CPU: peak RSS (ru_maxrss) above the
baseline; CUDA: torch.cuda.max_memory_allocated above the baseline. It includes the weight's
gradient. Repeats alternate the variants; the table gives the median of each.

    python benchmarks/quant_memory.py                        # LLaMA-2-7B's MLP weight, 512 tokens
    python benchmarks/quant_memory.py --before /tmp/base     # also an earlier checkout's layer
    python benchmarks/quant_memory.py --device cuda          # bf16 (the fused kernel quantizes)
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from loss_memory import added_peak

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
# Each a QuantConfig's keyword arguments; "linear" is the plain nn.Linear.
METHODS = {"linear": None, "twn": dict(bits=2, method="twn"),
           "absmean": dict(bits=2, method="absmean"), "minmax": dict(bits=4, method="minmax"),
           "pact": dict(bits=2, method="pact")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out_features", type=int, default=11008, help="(default: %(default)s)")
    p.add_argument("--in_features", type=int, default=4096, help="(default: %(default)s)")
    p.add_argument("--tokens", type=int, default=512, help="rows of the input (default: 512)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                   help="(default: all)")
    p.add_argument("--before", metavar="CHECKOUT",
                   help="another checkout of tsld-ds (say, an earlier commit's git worktree) whose "
                   "layers are measured in the same rounds")
    p.add_argument("--repeats", type=int, default=3, help="runs per variant (default: 3)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.out_features, args.in_features, args.tokens, args.repeats) < 1:
        p.error("--out_features, --in_features, --tokens and --repeats must be at least 1")
    if args.before and not (Path(args.before) / "tsld_ds").is_dir():
        p.error(f"--before {args.before} is not a tsld-ds checkout (no tsld_ds/ in it)")
    return args


def run_case(spec):
    """Worker: the layer, its input, the baseline, one forward and backward."""
    sys.path.insert(0, spec["repo"])
    import torch

    from tsld_ds.quant import QuantConfig, QuantLinear

    device = spec["device"]
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    linear = torch.nn.Linear(spec["in_features"], spec["out_features"], bias=False,
                             device=device, dtype=dtype)
    cfg = METHODS[spec["method"]]
    layer = linear if cfg is None else QuantLinear(linear, QuantConfig(**cfg))
    x = torch.empty(spec["tokens"], spec["in_features"], device=device, dtype=dtype).normal_()
    x.requires_grad_()
    peak, _ = added_peak(lambda: layer(x).sum().backward(), device)
    return {"peak_bytes": peak, "weight_bytes": linear.weight.nbytes}


def run_subprocess(args, method, repo):
    spec = dict(device=args.device, out_features=args.out_features, in_features=args.in_features,
                tokens=args.tokens, method=method, repo=str(repo))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker",
                           json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{method} ({repo}) failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_case(json.loads(args.worker))))
        return
    checkouts = {"now": REPO, **({"before": Path(args.before).resolve()} if args.before else {})}
    variants = [(m, name) for m in args.methods for name in checkouts
                if not (m == "linear" and name == "before")]
    runs = {v: [] for v in variants}
    for _ in range(args.repeats):
        for method, name in variants:
            runs[method, name].append(run_subprocess(args, method, checkouts[name]))
    weight = runs[variants[0]][0]["weight_bytes"]
    print(f"[{args.out_features}, {args.in_features}] weight ({weight / MIB:.0f} MiB), "
          f"{args.tokens} tokens, {args.device}; peak added by forward + backward, median of "
          f"{args.repeats}")
    print(f"{'layer':>8} {'checkout':>8} {'MiB':>7} {'x weight':>9}")
    for (method, name), results in runs.items():
        peak = statistics.median(r["peak_bytes"] for r in results)
        print(f"{method:>8} {name:>8} {peak / MIB:>7.0f} {peak / weight:>9.2f}")


if __name__ == "__main__":
    main()
