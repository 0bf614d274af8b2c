"""The performance figures quoted in the README, each as a ratio against its baseline measured in the same run.

  python bench.py                 # every benchmark
  python bench.py gdn mamba2      # some of them (names below)
  python bench.py --device cuda

Timing: both sides warmed up, then >= 5 interleaved repetitions, median reported (the machines are noisy;
only ratios measured in one run are comparable). Peak memory: on CUDA, max_memory_allocated; on a CPU, the
rise of the peak resident set over the set-up, measured in a forked child per side.
"""

import argparse
import os
import resource
import statistics
import time

import torch

BENCHES = {}


def bench(name):
    def register(fn):
        BENCHES[name] = fn
        return fn
    return register


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(fns: dict, device="cpu", reps=5, warmup=1) -> dict:
    """Median seconds per call of each fn, the calls interleaved so that machine noise hits all sides alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_memory(setup, run, device="cpu") -> float:
    """Extra peak memory (MB) of run(setup()) above what setup() left allocated."""
    if str(device).startswith("cuda"):
        state = setup()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run(state)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: measure, report, exit without running the parent's atexit hooks
        os.close(r)
        state = setup()
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run(state)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        os.write(w, str((peak - base) / 1024).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(pid, 0)
    return float(out)


def report(title, rows):
    """rows: list of (label, value string). Printed as a small markdown table."""
    print(f"\n### {title}\n\n| measurement | value |\n|---|---|")
    for label, value in rows:
        print(f"| {label} | {value} |")


# ======================================================================================================
# Benchmarks. Each registers under a short name and prints its own table of ratios.
# ======================================================================================================

# ---- gdn (models/qwen35.py) ----------------------------------------------------------------------------

# ---- mamba2 (models/mamba2.py) -------------------------------------------------------------------------

# ---- rwkv7 (models/rwkv7.py) ---------------------------------------------------------------------------

# ---- sae (writesae.py, train.py) -----------------------------------------------------------------------

# ---- eval (eval.py) ------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help=f"benchmarks to run (default all): {', '.join(BENCHES)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    unknown = [n for n in args.names if n not in BENCHES]
    if unknown:
        p.error(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHES)}")
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    for name in args.names or BENCHES:
        BENCHES[name](device=args.device, reps=args.reps)


if __name__ == "__main__":
    main()
