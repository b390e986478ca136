"""NeCo sort loss: densessl's soft_permutation vs diffsort 0.2.0 at NeCo shapes.

Rows = 10 crop pairs x B*49 queries, n = 49 references, bitonic, steepness 100. One step =
teacher sort without grad + student sort + cross-entropy + backward to the student sims.
Times are medians over ``--repeats`` runs in this process, methods interleaved (wall clock
and process CPU time; CPU time is the steadier figure on a shared machine). Peak memory is
the peak RSS during one step minus the RSS just before it (Linux VmHWM, reset via
/proc/self/clear_refs), each method in a fresh subprocess.
Needs ``pip install diffsort==0.2.0`` for the reference rows.

    PYTHONPATH=src python benchmarks/bench_sorting.py --batch 8 --threads 1
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import statistics
import subprocess
import sys
import time

import torch

from densessl.losses import sort_loss

N_REFS, PAIRS, STEEPNESS = 49, 10, 100.0
# diffsort's dense layers need ~0.7 MB per row with grad (11 GB at B=32).
REFERENCE_BYTES_PER_ROW = 0.75e6


def _sims(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    rows = PAIRS * batch * N_REFS
    student = torch.rand(rows, N_REFS, generator=gen) * 2 - 1
    teacher = torch.rand(rows, N_REFS, generator=gen) * 2 - 1
    return student.requires_grad_(), teacher


@functools.cache
def _diffsort_sorter() -> torch.nn.Module:
    import diffsort

    return diffsort.DiffSortNet("bitonic", N_REFS, steepness=STEEPNESS)


def _diffsort_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    sorter = _diffsort_sorter()
    with torch.no_grad():
        q = sorter(teacher)[1]
    p = sorter(student)[1]
    return -(q * torch.log(p)).sum() / (student.shape[0] * N_REFS)


METHODS = {
    "diffsort": _diffsort_loss,
    "ours (plain autograd)": lambda s, t: sort_loss(s, t, chunk_rows=None),
    "ours (chunk_rows=512)": lambda s, t: sort_loss(s, t, chunk_rows=512),
}


def _step(method: str, student: torch.Tensor, teacher: torch.Tensor) -> float:
    student.grad = None
    loss = METHODS[method](student, teacher)
    loss.backward()
    return loss.item()


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB


def _peak_memory_worker(method: str, batch: int) -> None:
    """Runs in a subprocess: prints the peak-RSS growth (MB) of one step.

    Uses VmHWM reset through clear_refs, not ru_maxrss: Linux carries ru_maxrss over
    fork + exec, so a child would report the parent's peak.
    """
    student, teacher = _sims(batch)
    before = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    _step(method, student, teacher)
    print(json.dumps({"peak_mb": (_status_bytes("VmHWM") - before) / 2**20}))


def _peak_memory(method: str, batch: int, threads: int | None) -> float:
    cmd = [sys.executable, __file__, "--worker", method, "--batch", str(batch)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def _available_bytes() -> float:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return float(fields["MemAvailable"].split()[0]) * 1024


def _bench(batch: int, repeats: int, threads: int | None, with_reference: bool) -> None:
    methods = [m for m in METHODS if with_reference or m != "diffsort"]
    student, teacher = _sims(batch)
    losses = {m: _step(m, student, teacher) for m in methods}  # warm-up, also the values
    wall: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(repeats):
        for m in methods:
            w0, c0 = time.perf_counter(), time.process_time()
            _step(m, student, teacher)
            wall[m].append(time.perf_counter() - w0)
            cpu[m].append(time.process_time() - c0)
    peaks = {m: _peak_memory(m, batch, threads) for m in methods}

    base = "diffsort" if with_reference else methods[0]
    print(f"\nB={batch}: {student.shape[0]} rows x n={N_REFS}, {repeats} repeats, ratios vs {base}")
    header = ("method", "loss", "wall s", "cpu s", "peak MB", "speed-up", "mem ratio")
    print(f"{header[0]:<24}" + "".join(f" {h:>9}" for h in header[1:]))
    for m in methods:
        w, c = statistics.median(wall[m]), statistics.median(cpu[m])
        speed = statistics.median(cpu[base]) / c
        mem = peaks[base] / max(peaks[m], 1.0)
        print(f"{m:<24} {losses[m]:>9.6f} {w:>9.3f} {c:>9.3f} {peaks[m]:>9.0f} {speed:>8.1f}x {mem:>8.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-reference", action="store_true", help="skip diffsort")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.worker is not None:
        _peak_memory_worker(args.worker, args.batch[0])
        return

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        "peak MB = peak RSS - RSS before one step, fresh process"
    )
    has_reference = importlib.util.find_spec("diffsort") is not None
    if not (has_reference or args.no_reference):
        print("diffsort not installed (pip install diffsort==0.2.0): reference rows skipped")
    for batch in args.batch:
        with_reference = has_reference and not args.no_reference
        need = REFERENCE_BYTES_PER_ROW * PAIRS * batch * N_REFS
        if with_reference and need > 0.8 * _available_bytes():
            print(f"\nB={batch}: skipping diffsort, needs ~{need / 1e9:.0f} GB (see MemAvailable)")
            with_reference = False
        _bench(batch, args.repeats, args.threads, with_reference)


if __name__ == "__main__":
    main()
