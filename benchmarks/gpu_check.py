"""One prepared check of tsld-ds on one GPU, meant to finish in at most 6 minutes on an H100/H200
(so that it can run twice in a short GPU slot). Every stage is a subprocess with a time limit; a
failed stage is recorded and the next one runs.

    python3 benchmarks/gpu_check.py --out gpu_check            # on the GPU machine
    python3 benchmarks/gpu_check.py --stages losses,llama_1b   # rerun some stages only
    python3 benchmarks/gpu_check.py --dry-run --out /tmp/gc    # every stage at tiny sizes on a CPU

Stages, in order:
  kernels       the Triton kernels' tests (tests/ops/: every kernel against its PyTorch
                reference, values and gradients, bf16 without the interpreter's upcast; the layers
                through the kernels on CUDA) compiled on the GPU, and compute-sanitizer memcheck
                on a small launch of every kernel when the tool is present; --dry-run runs only
                tests/ops/test_dispatch.py, whose CUDA tests skip (CI runs the rest in Triton's
                interpreter)
  losses        tests/losses/ --device cuda: the fused losses and the objective against the float64
                reference, values and gradients, in fp64, fp32 and bf16
  default       the built-in default QAT for 50 steps on 1 GPU through the DeepSpeed launcher, with
                ds_configs/zero3.json (fp32) and ds_configs/zero3_bf16.json; both summaries
  loss_memory   benchmarks/loss_memory.py --device cuda at N=8192, V=128256, H=4096 in bf16: fused
                vs naive added peak memory and time, one process per case
  kernel_bench  benchmarks/kernel_speed.py: fused quantize vs the PyTorch quantizer; W2A16 and
                W4A16 vs bf16 matmul at M = 1, 16, 256 for 4096x4096 and 4096x11008 weights
  llama_1b      a randomly initialised LLaMA of 1.1B parameters
                (tsld_ds/assets/model_configs/llama-1b) QAT-KD for 20 steps at block 2048 in bf16:
                tokens/s and MFU = (6 N_student + 2 N_teacher) tokens/s / the GPU's dense bf16 peak;
                the GPU's peak memory in use (nvidia-smi) beside tsld-estimate's total for it

It writes OUT/report.json (each stage's status, seconds, commands and figures) and OUT/log.txt
(everything the stages printed), and exits 1 when a stage failed. `--dry-run` runs the same stages
at tiny sizes on the CPU (default in fp32 only), skipping what needs CUDA and saying so; the test
suite runs it but for the stages that run pytest themselves.

Setting up a GPU machine without a network: docs/gpu-machine.md
"""
import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tsld_ds.run.distributed import free_port  # noqa: E402

STAGES = ("kernels", "losses", "default", "loss_memory", "kernel_bench", "llama_1b")
LLAMA_1B_CONFIG = REPO / "tsld_ds" / "assets" / "model_configs" / "llama-1b"
# --dry-run's stand-in for the 1.1B model: the same config, a few thousand times smaller.
TINY_LLAMA = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=4096)
# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from the vendor's data sheets, by
# device-name fragment; the first match wins, so the more specific names come first.
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.4), ("H200", 989.4),
                    ("H100", 989.4), ("H800", 989.4), ("A100", 312.0), ("A800", 312.0),
                    ("L40S", 362.1), ("L4", 121.0))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check",
                   help="directory for report.json, log.txt and the runs (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true",
                   help="the same stages at tiny sizes on the CPU; what needs CUDA is skipped")
    p.add_argument("--stages", default=",".join(STAGES),
                   help="comma-separated stages to run, in the order above (default: all)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense bf16 peak for MFU (default: from the device name)")
    p.add_argument("--make-model", nargs=2, metavar=("DIR", "SIZE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown or not args.stages:
        p.error(f"--stages: unknown {unknown or 'empty list'}; choose from {', '.join(STAGES)}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        p.error(f"--peak-tflops must be positive, got {args.peak_tflops}")
    return args


class Check:
    """Runs the stages' commands, keeps the log and the report."""

    def __init__(self, out: Path, dry_run: bool):
        self.out, self.dry_run = out, dry_run
        out.mkdir(parents=True, exist_ok=True)
        self.log = open(out / "log.txt", "a", buffering=1)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                    "PYTHONPATH": os.pathsep.join(
                        [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
        if dry_run:
            self.env["OMP_NUM_THREADS"] = "1"

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")

    def run(self, name: str, cmd: list, timeout: float) -> subprocess.CompletedProcess:
        """`cmd` with its output into the log (and the last lines onto the terminal)."""
        cmd = [str(c) for c in cmd]
        self.say(f"$ {' '.join(cmd)}")
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as e:
            output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) \
                else (e.stdout or "")
            self.log.write(output)
            raise StageFailed(f"{name}: timed out after {timeout:.0f} s") from None
        self.log.write(proc.stdout + proc.stderr)
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-12:]
        print("\n".join(f"    {line}" for line in tail), flush=True)
        return proc


class StageFailed(Exception):
    pass


class Skipped(Exception):
    pass


def pytest_counts(output: str) -> dict:
    """{'passed': n, 'failed': n, 'skipped': n, ...} from pytest's closing line."""
    counts = {}
    for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", output):
        counts["errors" if word.startswith("error") else word] = int(number)
    return counts


def run_pytest(check: Check, name: str, argv: list, timeout: float) -> dict:
    proc = check.run(name, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            *argv], timeout)
    counts = pytest_counts(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "")
    if proc.returncode not in (0, 5) or counts.get("failed") or counts.get("errors"):
        raise StageFailed(f"{name}: pytest exited {proc.returncode} ({counts})")
    return counts


KERNEL_TESTS = ["tests/ops/test_quantize_kernels.py", "tests/ops/test_packed_matmul_kernels.py",
                "tests/ops/test_dispatch.py"]


def stage_kernels(check: Check, args) -> dict:
    if not check.dry_run:
        check.env.pop("TRITON_INTERPRET", None)  # compiled, bf16 as the GPU rounds it
    probe = "import json, tsld_ds; print(json.dumps(tsld_ds.kernels_info()))"
    proc = check.run("kernels", [sys.executable, "-c", probe], 300)
    if proc.returncode != 0:
        raise StageFailed("kernels: kernels_info() failed")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    tests = ["tests/ops/test_dispatch.py"] if check.dry_run else KERNEL_TESTS
    counts = run_pytest(check, "kernels", [*tests, "-rs"], 300)
    figures = {"kernels_info": info, "tests": counts}
    if check.dry_run:
        raise Skipped(f"needs CUDA: the kernels run compiled on a GPU only ({info['reason']}); "
                      f"{counts.get('skipped', 0)} CUDA tests skipped", figures)
    if info["backend"] != "triton":
        raise StageFailed(f"kernels: the Triton kernels do not run: {info['reason']}")
    return figures


def stage_losses(check: Check, args) -> dict:
    device = "cpu" if check.dry_run else "cuda"
    argv = ["tests/losses/", "--device", device]
    if check.dry_run:  # the CPU suite runs all of them; here the fp32 and bf16 cases suffice
        argv += ["-k", "float32 or bf16"]
    return {"device": device, "tests": run_pytest(check, "losses", argv, 240)}


def train(check: Check, name: str, options: list, output_dir: Path, timeout: float) -> dict:
    """launch/train.py on one GPU (one CPU rank in a dry run) under the DeepSpeed launcher;
    returns its summary.json with the logged tokens/s of each metrics window."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1",
           "--master_port", free_port(), "launch/train.py", *options,
           "--output_dir", output_dir, "--overwrite_output_dir"]
    proc = check.run(name, cmd, timeout)
    summary_file = output_dir / "summary.json"
    if proc.returncode != 0 or not summary_file.is_file():
        raise StageFailed(f"{name}: launch/train.py exited {proc.returncode}")
    summary = json.loads(summary_file.read_text())
    metrics = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().split("\n")
               if line.strip()]
    summary["window_tokens_per_s"] = [r["tokens_per_s"] for r in metrics if "tokens_per_s" in r]
    return summary


DEFAULT_CONFIGS = {"fp32": "ds_configs/zero3.json", "bf16": "ds_configs/zero3_bf16.json"}


def stage_default(check: Check, args) -> dict:
    options = ["--max_steps", 2, "--eval_max_blocks", 4] if check.dry_run else ["--max_steps", 50]
    # A dry run trains in fp32 only: on the CPU bf16 is the same code in another dtype, and the
    # test suite trains in bf16 elsewhere.
    precisions = ["fp32"] if check.dry_run else list(DEFAULT_CONFIGS)
    figures = {}
    for precision, config in ((p, DEFAULT_CONFIGS[p]) for p in precisions):
        summary = train(check, f"default {precision}", ["--ds_config", config, *options],
                        check.out / "runs" / f"default-{precision}", 600)
        figures[precision] = summary
        check.say(f"default {precision}: teacher ppl {summary.get('teacher_ppl'):.3f}, student "
                  f"ppl {summary['student_ppl_before']:.3f} -> {summary['student_ppl_after']:.3f}"
                  f" in {summary['steps']} steps, {summary['tokens_per_s']:.0f} tokens/s")
    return figures


def stage_loss_memory(check: Check, args) -> dict:
    result = check.out / "loss_memory.json"
    if check.dry_run:
        options = ["--device", "cpu", "--cases", "512x4096", "--hidden", 64, "--repeats", 1]
    else:
        options = ["--device", "cuda", "--cases", "8192x128256", "--hidden", 4096,
                   "--repeats", 1, "--memory-budget-gb", 60]
    proc = check.run("loss_memory", [sys.executable, "benchmarks/loss_memory.py", *options,
                                     "--json", result], 300)
    if proc.returncode != 0:
        raise StageFailed(f"loss_memory: exited {proc.returncode}")
    rows = json.loads(result.read_text())
    for row in rows:
        if "naive_added_peak_mib" in row:
            row["memory_ratio"] = row["naive_added_peak_mib"] / row["fused_added_peak_mib"]
            row["speedup"] = row["naive_seconds"] / row["fused_seconds"]
    return {"cases": rows}


def stage_kernel_bench(check: Check, args) -> dict:
    if check.dry_run:
        raise Skipped("needs CUDA: the kernels only run on a GPU", {})
    result = check.out / "kernel_bench.json"
    proc = check.run("kernel_bench", [sys.executable, "benchmarks/kernel_speed.py", "--reps", 100,
                                      "--tokens", "1,16,256", "--shapes",
                                      "4096x4096,4096x11008", "--json", result], 300)
    if proc.returncode != 0 or not result.is_file():
        raise StageFailed(f"kernel_bench: exited {proc.returncode}")
    return json.loads(result.read_text())


def make_model(directory: str, size: str) -> None:
    """Worker: the llama-1b config (or its tiny stand-in), randomly initialised, saved in bf16
    with the built-in tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tsld_ds.data import builtin_tokenizer_path

    config = AutoConfig.from_pretrained(LLAMA_1B_CONFIG)
    if size == "tiny":
        for key, value in TINY_LLAMA.items():
            setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(builtin_tokenizer_path()).save_pretrained(directory)
    print(json.dumps({"parameters": sum(p.numel() for p in model.parameters())}))


def bf16_peak_tflops(args) -> tuple:
    """(peak TFLOP/s or None, device name)."""
    import torch

    if not torch.cuda.is_available():
        return None, "cpu"
    name = torch.cuda.get_device_name()
    if args.peak_tflops:
        return args.peak_tflops, name
    return next((peak for fragment, peak in BF16_PEAK_TFLOPS if fragment in name), None), name


class GpuMemoryPeak(threading.Thread):
    """The most memory nvidia-smi reports in use on GPU 0 while it runs (context and caching
    allocator included: what `tsld-estimate`'s total stands for); None without nvidia-smi."""

    def __init__(self, period: float = 0.25):
        super().__init__(daemon=True)
        self.period, self.peak_mib, self.done = period, None, threading.Event()

    def read_mib(self):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--id=0",
                                  "--format=csv,noheader,nounits"], capture_output=True,
                                 text=True, timeout=10)
            return float(out.stdout.split()[0]) if out.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
            return None

    def run(self):
        while not self.done.is_set():
            used = self.read_mib()
            if used is not None:
                self.peak_mib = max(self.peak_mib or 0.0, used)
            time.sleep(self.period)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.join()


def stage_llama_1b(check: Check, args) -> dict:
    model_dir = check.out / "runs" / ("llama-tiny-random" if check.dry_run else "llama-1b-random")
    proc = check.run("llama_1b", [sys.executable, __file__, "--make-model", model_dir,
                                  "tiny" if check.dry_run else "1b"], 300)
    if proc.returncode != 0:
        raise StageFailed("llama_1b: building the random model failed")
    parameters = json.loads(proc.stdout.strip().splitlines()[-1])["parameters"]
    micro_batch, block, steps, log_every = (2, 64, 4, 2) if check.dry_run else (4, 2048, 20, 5)
    config = json.loads((REPO / "ds_configs" / "zero3_bf16.json").read_text())
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config_file = check.out / "llama_1b_ds.json"
    config_file.write_text(json.dumps(config, indent=2))
    with GpuMemoryPeak() as memory:
        idle_mib = memory.read_mib()
        summary = train(check, "llama_1b", [
            "--model", model_dir, "--ds_config", config_file, "--block_size", block,
            "--max_steps", steps, "--log_every", log_every, "--eval_every", 0,
            "--eval_max_blocks", 2, "--no_export"], check.out / "runs" / "llama_1b", 600)
    proc = check.run("llama_1b estimate", [
        sys.executable, "launch/estimate.py", "--model", model_dir, "--ds_config", config_file,
        "--num_gpus", 1, "--block_size", block, "--gpu_memory_gb", 1024, "--json"], 120)
    if proc.returncode != 0:
        raise StageFailed("llama_1b: tsld-estimate failed")
    estimate_mib = json.loads(proc.stdout)["total_bytes"] / 2**20
    measured_mib = None if memory.peak_mib is None else memory.peak_mib - (idle_mib or 0.0)
    windows = summary["window_tokens_per_s"]
    steady = sum(windows[1:]) / len(windows[1:])  # the first window holds the warm-up
    peak, device = bf16_peak_tflops(args)
    flops_per_token = 6 * parameters + 2 * parameters  # student trains, teacher runs forward
    mfu = None if peak is None else flops_per_token * steady / (peak * 1e12)
    figures = {"device": device, "parameters": parameters, "block_size": block,
               "micro_batch": micro_batch, "steps": steps, "tokens_per_s_steady": steady,
               "tokens_per_s_run": summary["tokens_per_s"], "window_tokens_per_s": windows,
               "bf16_peak_tflops": peak, "mfu": mfu,
               "student_ppl_before": summary["student_ppl_before"],
               "student_ppl_after": summary["student_ppl_after"],
               "memory_peak_mib": measured_mib, "memory_estimate_mib": estimate_mib,
               "memory_peak_over_estimate": None if measured_mib is None
               else measured_mib / estimate_mib}
    check.say(f"llama_1b: {parameters / 1e9:.3f}B parameters, {steady:.0f} tokens/s after the "
              f"first window, MFU {'n/a' if mfu is None else f'{100 * mfu:.1f} %'}; GPU "
              f"memory peak {'n/a' if measured_mib is None else f'{measured_mib:.0f} MiB'} "
              f"against tsld-estimate's {estimate_mib:.0f} MiB")
    return figures


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.make_model:
        make_model(*args.make_model)
        return 0
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            sys.exit("benchmarks/gpu_check.py: no CUDA device here; --dry-run runs the stages "
                     "at tiny sizes on the CPU")
    out = Path(args.out).resolve()
    check = Check(out, args.dry_run)
    report_file = out / "report.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    report.update(dry_run=args.dry_run, started=time.strftime("%Y-%m-%d %H:%M:%S"))
    report.setdefault("stages", {})
    stage_functions = {name: globals()[f"stage_{name}"] for name in STAGES}
    failed = []
    for name in [s for s in STAGES if s in args.stages]:
        check.say(f"\n=== {name} ===")
        started = time.time()
        try:
            result = {"status": "passed", **stage_functions[name](check, args)}
        except Skipped as e:
            reason, figures = e.args
            result = {"status": "skipped", "reason": reason, **figures}
            check.say(f"{name}: skipped: {reason}")
        except StageFailed as e:
            result = {"status": "failed", "reason": str(e)}
            failed.append(name)
            check.say(f"{name}: FAILED: {e}")
        result["seconds"] = round(time.time() - started, 1)
        report["stages"][name] = result
        report_file.write_text(json.dumps(report, indent=2, default=str))  # after every stage
    total = sum(s["seconds"] for s in report["stages"].values())
    check.say(f"\n{len(args.stages) - len(failed)} of {len(args.stages)} stages without failure, "
              f"{total:.0f} s; figures in {report_file}, output in {out / 'log.txt'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
