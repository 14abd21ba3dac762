"""Sweep throughput on Ray workers: one against two CPU actors (and the single process).

Traces the first ``--facts`` facts of the bundled world (subject corrupted, the three
kinds, default settings) three ways, on one local Ray instance:

* in this process (no Ray), the reference;
* on 1 worker, then on 2 workers (CPU actors, 1 torch thread each).

For the workers it reports the time to start them (each loads the model) apart from the
sweep itself, checks that every run gives the same average maps bit for bit, and samples
the 1-minute load average during each run (the machine may be shared: compare ratios
only at low load). A GPU run (``--device cuda``, one actor per GPU) uses the same code
path with ``num_gpus=1`` per actor.

    python benchmarks/scale_bench.py                     # 200 facts, 1 vs 2 CPU workers
    python benchmarks/scale_bench.py --facts 40 --json scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


class LoadSampler:
    """1-minute load average, sampled every second in a thread while the block runs."""

    def __enter__(self):
        self.samples = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.samples.append(os.getloadavg()[0])

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict:
        return {"load_mean": round(sum(self.samples) / len(self.samples), 2), "load_max": round(max(self.samples), 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts", type=int, default=200, help="facts to sweep (default 200)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    ap.add_argument("--device", default="cpu", help="'cpu' actors (default) or 'cuda' (one GPU per actor)")
    ap.add_argument("--ray", default=None, help="address of a running Ray cluster (default: start a local one)")
    ap.add_argument("--no-single", action="store_true", help="skip the single-process reference run")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    import ray
    import torch

    import workbench as wb
    from workbench.scale import shutdown_workers, start_workers

    torch.set_num_threads(1)
    model = wb.load_model("toy-facts", device="cpu")
    facts = wb.load_facts("toy-facts", split="counterfact")[: args.facts]
    runs: list[dict] = []
    reference = None

    def record(name: str, workers: int | None, start_s: float, result, seconds: float, load: LoadSampler) -> None:
        nonlocal reference
        same = None
        if reference is None:
            reference = result
        else:
            same = all(result.aie[k].equals(reference.aie[k]) for k in reference.kinds)
        runs.append({"run": name, "workers": workers, "start_s": round(start_s, 2), "sweep_s": round(seconds, 2),
                     "facts_per_s": round(len(facts) / seconds, 3), "identical": same, **load.summary()})
        print(json.dumps(runs[-1]), flush=True)

    print(f"{len(facts)} facts, {os.cpu_count()} CPUs, load average before: {os.getloadavg()}", flush=True)
    if not args.no_single:
        with LoadSampler() as load:
            t0 = time.perf_counter()
            res = wb.trace_dataset(model, facts, progress=False)
            record("single process", None, 0.0, res, time.perf_counter() - t0, load)
    if args.ray is None:
        ray.init(num_cpus=max(args.workers) if args.device == "cpu" else None, include_dashboard=False,
                 log_to_driver=False)
    else:
        ray.init(address=args.ray, log_to_driver=False)
    for n in args.workers:
        shutdown_workers()
        with LoadSampler() as load:
            t0 = time.perf_counter()
            started = start_workers(model, n, device=args.device)
            start_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            res = wb.trace_dataset(model, facts, progress=False, workers=n)
            record(f"{started} {args.device} worker(s)", started, start_s, res, time.perf_counter() - t0, load)
    shutdown_workers()
    ray.shutdown()

    by_workers = {r["workers"]: r for r in runs if r["workers"]}
    if 1 in by_workers and 2 in by_workers:
        ratio = by_workers[1]["sweep_s"] / by_workers[2]["sweep_s"]
        total = ((by_workers[1]["sweep_s"] + by_workers[1]["start_s"])
                 / (by_workers[2]["sweep_s"] + by_workers[2]["start_s"]))
        print(f"speed-up of 2 workers over 1: {ratio:.2f}x on the sweep, {total:.2f}x with the workers' start")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"facts": len(facts), "cpus": os.cpu_count(), "device": args.device, "runs": runs}, fh, indent=1)
    return 0 if all(r["identical"] in (None, True) for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
