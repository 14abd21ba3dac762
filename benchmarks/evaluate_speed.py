"""Time per fact of :func:`workbench.evaluate` on the bundled model (the per-edit overhead).

Runs ``wb.evaluate(model, facts, methods=..., n=N)`` (both request perspectives, the unedited
baseline rows included, no result folder) and prints the wall and CPU time per fact and per edit
(CPU time is the steadier figure on a shared machine), and
how often the weights' fingerprint was computed from the weights (``fingerprints``: calls to
:func:`workbench.loading.model_fingerprint` that hashed the weights rather than answering from
its cache; ``-`` where the installed workbench has no such cache).

    OMP_NUM_THREADS=1 python benchmarks/evaluate_speed.py -n 200 --methods mend ft
    OMP_NUM_THREADS=1 python benchmarks/evaluate_speed.py -n 20 --methods rome --repeats 2

An untimed warm-up evaluation of two facts comes first (the MEND editor, covariance
statistics and context templates are read or computed there, not in the timed run).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch


def count_hashes():
    """A counter of fingerprints computed from the weights (``None`` if the cache does not exist)."""
    try:
        from workbench import weights as module  # where the fingerprint lives
    except ImportError:  # an older workbench: in loading
        from workbench import loading as module

    compute = getattr(module, "_compute_fingerprint", None)
    if compute is None:
        return None
    calls = [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return compute(*args, **kwargs)

    module._compute_fingerprint = counted
    return calls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=200, help="facts (default 200)")
    ap.add_argument("--methods", nargs="+", default=["mend", "ft"], help="registered methods (default mend ft)")
    ap.add_argument("--repeats", type=int, default=1, help="timed evaluations (default 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args(argv)

    import workbench as wb

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # edits that miss their object warn; the rows record it
    model = wb.load_model("toy-facts")
    facts = wb.load_facts("toy-facts")
    wb.evaluate(model, facts, methods=args.methods, n=2, progress=False, n_boot=10)
    calls = count_hashes()
    walls, cpus = [], []
    for _ in range(args.repeats):
        start = calls[0] if calls else 0
        t0, c0 = time.perf_counter(), time.process_time()
        table = wb.evaluate(model, facts, methods=args.methods, n=args.n, progress=False, n_boot=10)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        hashed = "-" if calls is None else calls[0] - start
        edits = int((table.attrs["details"]["method"] != "unedited").sum())
        print(f"{args.n} facts, {edits} edits ({' '.join(args.methods)}), {args.threads} thread(s): "
              f"{walls[-1]:.1f} s, {walls[-1] / args.n * 1000:.0f} ms per fact, "
              f"{walls[-1] / edits * 1000:.0f} ms per edit; cpu {cpus[-1]:.1f} s, {cpus[-1] / args.n * 1000:.0f} ms "
              f"per fact; fingerprints {hashed}", flush=True)
    if len(walls) > 1:
        print(f"median over {len(walls)} runs: wall {statistics.median(walls) / args.n * 1000:.0f} ms per fact, "
              f"cpu {statistics.median(cpus) / args.n * 1000:.0f} ms per fact")
    return 0


if __name__ == "__main__":
    sys.exit(main())
