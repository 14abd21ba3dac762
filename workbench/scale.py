"""Many workers for sweeps and evaluations, on Ray (the optional ``[scale]`` extra).

:func:`map_facts` sends items (facts, or (method, locus, fact) cells) through a per-item
work function ``work(model, item, shared) -> row`` and yields ``(index, row)`` as rows
complete. Without ``workers`` it is a plain loop over the caller's model. With
``workers=N`` it starts (or joins, ``ray_address=``) a Ray cluster and runs N actors, each
loading its own copy of the model from the same spec (``model.workbench_spec``) and
checking that its weights' fingerprint equals the driver's:

* one GPU per actor (Ray's ``num_gpus=1``) where the cluster has GPUs, CPU actors
  otherwise, each with ``threads`` torch threads and as many Ray CPUs, so actors do not
  oversubscribe cores;
* ``shared`` (e.g. the covariance statistics of an edit method) is put in Ray's object
  store once by the driver and handed to every actor, not recomputed per actor;
* the driver receives every row and is the only writer of the caller's store: a
  distributed run writes the same files as a single-process one, rows in completion
  order, and the caller sorts by index before aggregating;
* an actor that dies (killed, out of memory, its node lost) is replaced, and the items it
  held are retried on the live actors up to ``retries`` times, then reported through
  ``on_failure`` (the row recording the error) -- an exception raised by ``work`` itself
  is not a fault of the worker and propagates, as it would in a single process;
* if the driver is interrupted, its actors are killed with it; the caller's store holds
  every row received so far, so a rerun resumes.

Actors stay warm between runs in one Ray session (a sweep of the subject side then the
relation side loads the model once per worker) until a run needs other workers (another
model, count or device), :func:`shutdown_workers` stops them, or the driver ends.

A progress bar (tqdm) given as ``bar`` counts items over all workers and shows each
worker's rate (items/s) as its postfix.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

log = logging.getLogger(__name__)

EXTRA = "pip install 'workbench[scale]'"
"""The install command that brings Ray."""

Work = Callable[[Any, Any, Any], Any]
"""``work(model, item, shared) -> row``: must be picklable (a module-level function or a
:func:`functools.partial` of one) when run on workers."""


class ScaleUnavailable(RuntimeError):
    """``workers=`` was asked for but Ray (the ``[scale]`` extra) is not installed."""


class WorkerSetupError(RuntimeError):
    """The workers could not be started as asked (model not loadable there, other weights)."""


def require_ray():
    """The ``ray`` module, or :class:`ScaleUnavailable` naming the extra to install."""
    try:
        import ray
    except ImportError as err:
        raise ScaleUnavailable(f"workers need Ray, which is not installed; install the extra: {EXTRA}") from err
    return ray


def check_workers(workers: int | None, ray_address: str | None = None) -> None:
    """Validate ``workers`` / ``ray_address`` at once, before any expensive work."""
    if workers is None:
        if ray_address is not None:
            raise ValueError("ray_address (--ray) needs workers (--workers N)")
        return
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, not {workers!r}")
    if ray_address is not None:
        check_ray_address(ray_address)
    require_ray()


def check_ray_address(address: str, timeout: float = 3.0) -> None:
    """Fail within ``timeout`` seconds when nothing listens at a Ray cluster address (``HOST:PORT`` or
    ``ray://HOST:PORT``; ``"auto"``/``"local"`` are left to Ray), instead of Ray's minutes of retries."""
    import socket

    text = str(address).strip()
    if text in ("auto", "local", ""):
        return
    hostport = text.split("://", 1)[1] if "://" in text else text
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"--ray {address!r} is not a cluster address: give HOST:PORT (e.g. 10.0.0.5:6379 after "
                         f"`ray start --head`), ray://HOST:PORT, or 'auto'")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return
    except OSError as err:
        raise ValueError(f"cannot reach the Ray cluster at {address} ({err.strerror or err}); start it with `ray "
                         f"start --head` on that machine, check the address and port, or leave --ray out to start "
                         f"a local Ray for this run") from None


def connect(ray_address: str | None = None):
    """Join the running Ray session, or the cluster at ``ray_address`` (``"auto"``: the one
    started by ``ray start`` on this node), or start a local one; returns ``ray``."""
    ray = require_ray()
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"log_to_driver": False}
        if ray_address is None and not os.environ.get("RAY_ADDRESS"):
            kwargs["include_dashboard"] = False
        ray.init(address=ray_address, **kwargs)
    return ray


def model_source(model) -> tuple[str, Any, str]:
    """``(spec, dtype, fingerprint)`` from which workers load the same model as ``model``."""
    from .loading import model_fingerprint, resolve_spec

    spec = getattr(model, "workbench_spec", None)
    if spec is None:
        raise WorkerSetupError("workers load the model from its spec: pass a model from workbench.load_model(spec)")
    kind, path = resolve_spec(spec)
    if kind == "folder":  # workers may run in another directory
        spec = str(path.resolve())
    return str(spec), getattr(model.cfg, "dtype", None), model_fingerprint(model)


class _Worker:
    """A Ray actor: one model; ``bind`` gives it a run's work function and shared object."""

    def __init__(self, spec: str, given_spec: str, device: str, dtype, threads: int):
        import torch

        from .loading import load_model, model_fingerprint

        torch.set_num_threads(threads)
        self.model = load_model(spec, device=device, dtype=dtype)
        self.model.workbench_spec = given_spec  # as on the driver (cache keys, default corpus)
        self.fingerprint = self.model.workbench_fingerprint = model_fingerprint(self.model)  # weights as loaded
        self.work: Work | None = None
        self.shared: Any = None

    def ready(self) -> tuple[str, int]:
        return self.fingerprint, os.getpid()

    def bind(self, work: Work | None, shared: Any) -> None:
        self.work, self.shared = work, shared

    def run(self, item: Any) -> tuple[Any, float]:
        t0 = time.perf_counter()
        row = self.work(self.model, item, self.shared)
        return row, time.perf_counter() - t0


@dataclass
class _Task:
    index: int
    item: Any
    attempts: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class _Slot:
    """One live actor and what the driver knows of it."""

    name: str
    handle: Any
    inflight: int = 0
    done: int = 0
    busy_s: float = 0.0
    since: float = field(default_factory=time.perf_counter)

    def rate(self) -> float:
        return self.done / max(1e-9, time.perf_counter() - self.since)


def _fault_types(ray) -> tuple[type, ...]:
    """Ray errors that mean the worker (not the work) failed."""
    names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "OutOfMemoryError",
             "NodeDiedError", "ObjectLostError", "OwnerDiedError")
    return tuple(getattr(ray.exceptions, n) for n in names if hasattr(ray.exceptions, n))


def plan_workers(ray, workers: int, threads: int, device: str | None) -> tuple[int, str, float]:
    """``(actors, device, gpus_per_actor)``: one GPU per actor where the cluster has GPUs
    (unless ``device="cpu"``), else CPU actors; never more actors than the cluster can place."""
    total = ray.cluster_resources()
    gpus, cpus = int(total.get("GPU", 0)), int(total.get("CPU", 0))
    use_gpu = gpus > 0 if device is None else str(device).startswith("cuda")
    if use_gpu:
        if gpus < 1:
            raise WorkerSetupError(f"device={device!r} asks for GPU workers but the Ray cluster has no GPU")
        n = min(workers, gpus)
        if n < workers:
            log.warning("%d workers asked, the cluster has %d GPUs: using %d GPU workers", workers, gpus, n)
        return n, "cuda", 1.0
    n = min(workers, max(1, cpus // threads))
    if n < workers:
        log.warning("%d workers of %d threads asked, the cluster has %d CPUs: using %d workers", workers, threads,
                    cpus, n)
    return n, "cpu", 0.0


def map_facts(model, work: Work, items: Iterable[tuple[int, Any]], *, shared: Any = None, workers: int | None = None,
              ray_address: str | None = None, device: str | None = None, threads: int = 1, retries: int = 2,
              depth: int = 2, on_failure: Callable[[int, Any, str], Any] | None = None, bar=None
              ) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, work(model, item, shared))`` for every ``(index, item)``, in completion order.

    ``workers=None``: in this process, on ``model``, in order. ``workers=N``: on N Ray actors
    (module docstring); ``ray_address`` joins a running cluster; ``device`` forces ``"cpu"`` or
    ``"cuda"`` actors (default: GPUs when the cluster has them); ``threads`` torch threads per
    CPU actor; ``depth`` items queued per actor. An item whose actor died is retried up to
    ``retries`` times, then ``on_failure(index, item, error)`` gives its row (without
    ``on_failure`` a :class:`RuntimeError` is raised). ``bar``: a tqdm bar to advance.
    """
    items = list(items)
    check_workers(workers, ray_address)
    if workers is None:
        for index, item in items:
            row = work(model, item, shared)
            if bar is not None:
                bar.update(1)
            yield index, row
        return
    if not items:
        return
    yield from _map_ray(model, work, items, shared=shared, workers=workers, ray_address=ray_address, device=device,
                        threads=threads, retries=retries, depth=depth, on_failure=on_failure, bar=bar)


class _Pool:
    """Live actors holding one model, kept warm between runs of one Ray session."""

    def __init__(self, ray, actor_cls, args: tuple, n: int, fingerprint: str | None, given: str):
        self.ray, self.actor_cls, self.args = ray, actor_cls, args
        self.counter = iter(range(10**9))
        self.slots: dict[str, _Slot] = {}
        first = [self.start() for _ in range(n)]
        refs = [s.handle.ready.remote() for s in first]
        if len(ray.wait(refs, num_returns=len(refs), timeout=60)[0]) < len(refs):
            log.warning("workers are still starting after 60 s; Ray places them when the cluster has free "
                        "resources (available: %s)", ray.available_resources())
        try:
            answers = ray.get(refs)
        except _fault_types(ray) as err:
            self.close()
            raise WorkerSetupError(f"a worker could not load the model {given!r}: {_first_line(err)}") from err
        for s, (fp, _pid) in zip(first, answers):
            if fingerprint is not None and fp != fingerprint:
                self.close()
                raise WorkerSetupError(f"worker {s.name} loaded {given!r} with weights {fp}, the driver's model has "
                                       f"{fingerprint}; workers run the model as loaded from its spec, unedited")

    def start(self) -> _Slot:
        slot = _Slot(f"w{next(self.counter)}", self.actor_cls.remote(*self.args))
        self.slots[slot.name] = slot
        return slot

    def close(self) -> None:
        for s in self.slots.values():
            self.ray.kill(s.handle, no_restart=True)
        self.slots.clear()


_POOLS: dict[tuple, _Pool] = {}


def start_workers(model, workers: int, *, ray_address: str | None = None, device: str | None = None,
                  threads: int = 1) -> int:
    """Start (or find warm) the workers :func:`map_facts` would use for ``model``; returns how many.

    Optional: the first run starts them anyway. Useful to pay the model loading up front.
    """
    check_workers(workers, ray_address)
    return len(_pool(connect(ray_address), model, workers, device, threads).slots)


def shutdown_workers() -> None:
    """Stop the warm workers (each keeps a model in memory until its Ray session ends)."""
    while _POOLS:
        _POOLS.popitem()[1].close()


def _pool(ray, model, workers: int, device: str | None, threads: int) -> _Pool:
    spec, dtype, fingerprint = model_source(model)
    n, dev, gpus = plan_workers(ray, workers, threads, device)
    context = ray.get_runtime_context()
    key = (context.gcs_address, context.get_job_id(), context.get_node_id(), spec, str(dtype), dev, threads,
           fingerprint)
    pool = _POOLS.get(key)
    if pool is not None and len(pool.slots) == n:
        return pool
    shutdown_workers()  # one warm pool at a time: the last one holds the resources the new one needs
    given = str(getattr(model, "workbench_spec"))
    actor_cls = ray.remote(_Worker).options(num_cpus=threads if gpus == 0 else 1, num_gpus=gpus, max_restarts=0)
    # the fingerprint's float64 sums may differ in the last bit across devices: compare on the same device type
    same_device = str(getattr(model.cfg, "device", "cpu")).split(":")[0] == dev
    _POOLS[key] = pool = _Pool(ray, actor_cls, (spec, given, dev, dtype, threads), n,
                               fingerprint if same_device else None, given)
    return pool


def _map_ray(model, work: Work, items: list[tuple[int, Any]], *, shared, workers: int, ray_address, device, threads,
             retries: int, depth: int, on_failure, bar) -> Iterator[tuple[int, Any]]:
    ray = connect(ray_address)
    faults = _fault_types(ray)
    pool = _pool(ray, model, workers, device, threads)
    shared_ref = ray.put(shared)  # once, for every actor (and every replacement)
    for s in pool.slots.values():
        s.handle.bind.remote(work, shared_ref)
        s.done, s.busy_s, s.inflight, s.since = 0, 0.0, 0, time.perf_counter()
    inflight: dict[Any, tuple[_Slot, _Task]] = {}
    pending: deque[_Task] = deque(_Task(i, item) for i, item in items)
    replacements = len(pool.slots) * (retries + 1)
    finished = False
    try:
        while pending or inflight:
            for s in list(pool.slots.values()):
                while s.inflight < depth and pending:
                    task = pending.popleft()
                    inflight[s.handle.run.remote(task.item)] = (s, task)
                    s.inflight += 1
            if not inflight:  # no live worker left
                while pending:
                    task = pending.popleft()
                    yield task.index, _give_up(task, "no live worker left", on_failure)
                break
            # a bounded wait keeps the driver responsive to Ctrl-C between results
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            for ref in ready:
                slot, task = inflight.pop(ref)
                slot.inflight -= 1
                try:
                    row, seconds = ray.get(ref)
                except faults as err:
                    task.attempts += 1
                    task.errors.append(f"{type(err).__name__}: {_first_line(err)}")
                    if pool.slots.pop(slot.name, None) is not None:  # first news of this death: replace it
                        log.warning("worker %s died (%s); %d item(s) to retry", slot.name, task.errors[-1],
                                    slot.inflight + 1)
                        if replacements > 0:
                            replacements -= 1
                            pool.start().handle.bind.remote(work, shared_ref)
                    if task.attempts > retries:
                        yield task.index, _give_up(task, "; ".join(task.errors), on_failure)
                    else:
                        pending.appendleft(task)
                    continue
                except ray.exceptions.RayTaskError as err:  # the work raised: as in a single process
                    raise err.as_instanceof_cause() from None
                slot.done += 1
                slot.busy_s += seconds
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(" ".join(f"{s.name} {s.rate():.2f}/s" for s in pool.slots.values()),
                                        refresh=False)
                yield task.index, row
        finished = True
    finally:
        if finished:  # keep the pool warm, without this run's work and shared object
            for s in pool.slots.values():
                s.handle.bind.remote(None, None)
        else:  # interrupted or failed: items may still be running; start afresh next time
            pool.close()
            for key, value in list(_POOLS.items()):
                if value is pool:
                    del _POOLS[key]


def _first_line(err: BaseException) -> str:
    """The gist of a Ray error: the innermost ``SomeError: message`` line of its traceback text."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    named = [line for line in lines if line.split(":", 1)[0].endswith(("Error", "Exception"))]
    text = named[-1] if named else (lines[0] if lines else type(err).__name__)
    return text[:300]


def _give_up(task: _Task, error: str, on_failure) -> Any:
    message = f"failed after {task.attempts} attempt(s): {error}"
    if on_failure is None:
        raise RuntimeError(f"item {task.index}: {message}")
    return on_failure(task.index, task.item, message)
