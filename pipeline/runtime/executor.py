"""Where stages run: in this process (local) or as Ray tasks (embedded local Ray or a cluster).

Stages are written once; an executor only decides where a call happens and with which
resources (declared in the config, never inferred from the driver's hardware).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Generic, Protocol, Sequence, TypeVar

from pipeline.errors import DataError, UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resources:
    """Resources one task or actor asks for."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0


TaskT = TypeVar("TaskT")
ResultT = TypeVar("ResultT")
TaskIn = TypeVar("TaskIn", contravariant=True)
ResultOut = TypeVar("ResultOut", covariant=True)


class Stage(Protocol[TaskIn, ResultOut]):
    """A unit of pipeline work: resources as a plain field, heavy state loaded once in
    ``setup()`` (once per worker), then ``process(task)`` for each task. Every stage of the
    pipeline has this shape; the executor decides where it runs."""

    resources: Resources

    def setup(self) -> None: ...

    def process(self, task: TaskIn) -> ResultOut: ...


OnResult = Callable[[Any, Any], None]  # (task, its result), in completion order
OnRetry = Callable[[Any, BaseException], None]  # (task, why its worker died): the task runs again


class Executor(Protocol):
    """Runs a stage's tasks somewhere and returns their results in task order.

    ``workers=None``: one task each (a Ray task per task, the stage set up in it: for stages
    whose setup is light or whose tasks are few); ``workers=n``: a pool of ``n`` long-lived
    workers, each set up once, taking tasks until none are left.
    """

    def run_stage(self, stage: Stage[TaskT, ResultT], tasks: Sequence[TaskT], workers: int | None = None,
                  on_result: OnResult | None = None, on_retry: OnRetry | None = None) -> list[ResultT]:
        ...

    def shutdown(self) -> None:
        ...


def configure_worker_logging(level: int = logging.INFO) -> None:
    """Show the library's INFO logs in a worker process (Ray forwards them to the driver)."""
    logger = logging.getLogger("pipeline")
    logger.setLevel(level)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)


def _run_one(stage: Stage[TaskT, ResultT], task: TaskT) -> ResultT:
    """Ray task body: set the stage up in this worker, then process one task."""
    configure_worker_logging()
    stage.setup()
    return stage.process(task)


class StageActor(Generic[TaskT, ResultT]):
    """Ray actor body: holds one stage instance, set up once.

    An exception in ``setup()`` is kept and raised by ``process()``: it is the stage's error
    (bad input, a missing file), reported as such — not an actor death to retry.
    """

    def __init__(self, stage: Stage[TaskT, ResultT]) -> None:
        configure_worker_logging()
        self.stage = stage
        self.setup_error: Exception | None = None
        try:
            self.stage.setup()
        except Exception as exc:
            self.setup_error = exc

    def process(self, task: TaskT) -> ResultT:
        if self.setup_error is not None:
            raise self.setup_error
        return self.stage.process(task)


def stage_actor_pids(address: str | None = None) -> list[int]:
    """Pids of the live actors of :class:`RayExecutor`'s actor pools in the Ray cluster at
    ``address`` (its GCS address; default: this process's cluster — named explicitly, because
    the state API's auto-discovery refuses when several Ray instances run on the machine).
    Actors still in ``setup()`` count too."""
    import ray
    from ray.util.state import list_actors

    address = address or ray.get_runtime_context().gcs_address
    actors = list_actors(address=address, detail=True,
                         filters=[("class_name", "=", StageActor.__name__), ("state", "!=", "DEAD")])
    return sorted(int(a.pid) for a in actors if a.pid)

def _get(ray: Any, refs: Any) -> Any:
    """``ray.get``, but a :class:`UsageError` / :class:`DataError` raised on a worker reaches the
    caller as itself (its one-line message), not wrapped in Ray's multi-line task error."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, (UsageError, DataError)):
            raise cause from exc
        raise


class LocalExecutor:
    """Runs every task in the current process, one after another."""

    def run_stage(self, stage: Stage[TaskT, ResultT], tasks: Sequence[TaskT], workers: int | None = None,
                  on_result: OnResult | None = None, on_retry: OnRetry | None = None) -> list[ResultT]:
        """One in-process worker, whatever ``workers`` says: ``setup()`` once, then every task in
        order (nothing is retried: an error here is the stage's own)."""
        if not tasks:
            return []
        stage.setup()
        results = []
        for task in tasks:
            result = stage.process(task)
            if on_result is not None:
                on_result(task, result)
            results.append(result)
        return results

    def shutdown(self) -> None:
        pass


class RayExecutor:
    """Runs each call as a Ray task with the declared resources.

    Connects to ``address`` (or ``RAY_ADDRESS``, as set by ``ray job submit``) when given,
    otherwise starts a new embedded local Ray (``address="local"``: never attaches to a
    cluster that happens to run on this machine). Only a Ray instance it started is shut down.
    """

    def __init__(self, address: str | None = None, num_cpus: float | None = None,
                 num_gpus: float | None = None) -> None:
        import ray

        self._ray = ray
        self._owns_ray = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"log_to_driver": True}
            address = address or os.environ.get("RAY_ADDRESS")
            if address:
                kwargs["address"] = address
            else:
                kwargs["address"] = "local"
                if num_cpus is not None:
                    kwargs.update(num_cpus=num_cpus, num_gpus=num_gpus)
            context = ray.init(**kwargs)
            self._owns_ray = True
            url = getattr(context, "dashboard_url", None)
            log.info("Ray %s at %s; dashboard: %s", ray.__version__,
                     context.address_info.get("address"), f"http://{url}" if url else "not running")

    def run_stage(self, stage: Stage[TaskT, ResultT], tasks: Sequence[TaskT], workers: int | None = None,
                  on_result: OnResult | None = None, on_retry: OnRetry | None = None,
                  max_task_retries: int = 3) -> list[ResultT]:
        """``workers=None``: one Ray task per task (the stage's resources each; Ray retries a task
        whose worker died). Otherwise an actor pool (:meth:`_run_pool`). Results in task order."""
        if workers is None:
            return self._run_tasks(stage, tasks, on_result)
        return self._run_pool(stage, tasks, workers, on_result, on_retry, max_task_retries)

    def _run_tasks(self, stage: Stage[TaskT, ResultT], tasks: Sequence[TaskT],
                   on_result: OnResult | None) -> list[ResultT]:
        remote = self._ray.remote(num_cpus=stage.resources.num_cpus, num_gpus=stage.resources.num_gpus,
                                  max_retries=2)(_run_one)
        stage_ref = self._ray.put(stage)  # shipped once, not once per task
        results = _get(self._ray, [remote.remote(stage_ref, task) for task in tasks])
        if on_result is not None:
            for task, result in zip(tasks, results):
                on_result(task, result)
        return results

    def _run_pool(self, stage: Stage[TaskT, ResultT], tasks: Sequence[TaskT], workers: int,
                  on_result: OnResult | None, on_retry: OnRetry | None, max_task_retries: int) -> list[ResultT]:
        """An actor pool: ``workers`` actors (the stage's resources each) take tasks until none
        are left; results come back in task order.

        An actor that dies (its process, or its whole node) is replaced and its task retried, up
        to ``max_task_retries`` times per task; ``on_retry(task, error)`` is told of each retry.
        A task waiting on a replacement that has not started yet (it may never start: a lost
        node can leave no room for it) is moved to an actor that has run out of work, and the
        replacement is given up. The pool has at most as many actors as the cluster has room for
        (:meth:`_room_for`): more could never all start, and their tasks would wait forever.
        The pool's actors end when it returns or fails.
        """
        ray = self._ray
        if not tasks:
            return []
        actor_cls = ray.remote(StageActor).options(num_cpus=stage.resources.num_cpus,
                                                    num_gpus=stage.resources.num_gpus)
        queue = list(range(len(tasks)))[::-1]
        results: list[Any] = [None] * len(tasks)
        attempts = [0] * len(tasks)
        running: dict[Any, tuple[Any, int]] = {}  # task ref -> (actor, task index)
        starting: dict[Any, Any] = {}  # replacement actor -> its readiness ref, until known to be set up
        idle: list[Any] = []
        actors: list[Any] = []
        left = len(tasks)

        def new_actor() -> Any:
            actors.append(actor_cls.remote(stage))
            return actors[-1]

        def submit(actor: Any) -> None:
            """The next task to ``actor`` (run once it is set up), or ``actor`` waits idle."""
            if queue:
                index = queue.pop()
                running[actor.process.remote(tasks[index])] = (actor, index)
            else:
                idle.append(actor)

        def not_started(actor: Any) -> bool:
            ready = starting.get(actor)
            if ready is not None and ray.wait([ready], timeout=0)[0]:
                del starting[actor]
            return actor in starting

        def move_waiting_tasks() -> None:
            for ref, (actor, index) in list(running.items()):
                if idle and not_started(actor):
                    log.info("moving %r from a replacement actor that has not started to an idle one",
                             tasks[index])
                    del running[ref], starting[actor]
                    ray.kill(actor, no_restart=True)
                    queue.append(index)
                    submit(idle.pop())

        try:
            for _ in range(min(workers, len(tasks), self._room_for(stage.resources, workers))):
                submit(new_actor())
            while left:
                [ref], _ = ray.wait(list(running), num_returns=1)
                actor, index = running.pop(ref)
                starting.pop(actor, None)  # it started (or died): either way no longer waited on
                try:
                    results[index] = _get(ray, ref)
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
                    attempts[index] += 1
                    if attempts[index] > max_task_retries:
                        raise RuntimeError(f"task {tasks[index]!r} failed {attempts[index]} times: {exc}") from exc
                    log.warning("worker died on %r (%s); replacing it and retrying", tasks[index],
                                type(exc).__name__)
                    if on_retry is not None:
                        on_retry(tasks[index], exc)
                    ray.kill(actor, no_restart=True)
                    queue.append(index)
                    while idle and queue:
                        submit(idle.pop())
                    if queue:
                        replacement = new_actor()
                        starting[replacement] = replacement.__ray_ready__.remote()
                        submit(replacement)
                else:
                    left -= 1
                    if on_result is not None:
                        on_result(tasks[index], results[index])
                    submit(actor)
                move_waiting_tasks()
        finally:  # end the pool, also when a task failed: a failed stage holds no resources
            for actor in actors:
                ray.kill(actor, no_restart=True)
        return results

    def _room_for(self, resources: Resources, workers: int) -> int:
        """How many actors of ``resources`` the cluster holds in all (at least 1), with a warning
        when that is fewer than the ``workers`` asked for."""
        total = self._ray.cluster_resources()
        room = [total.get(name, 0.0) / amount + 1e-9
                for name, amount in (("CPU", resources.num_cpus), ("GPU", resources.num_gpus)) if amount > 0]
        fits = int(min(room)) if room else workers
        if fits < workers:
            log.warning("%d workers of %s asked for, but the cluster has room for %d (CPU %s, GPU %s): "
                        "running %d", workers, resources, fits, total.get("CPU", 0), total.get("GPU", 0),
                        max(fits, 1))
        return max(fits, 1)

    def shutdown(self) -> None:
        if self._owns_ray:
            self._ray.shutdown()
            self._owns_ray = False


def make_executor(kind: str, address: str | None = None) -> Executor:
    """``"ray"`` (default for jobs) or ``"local"``."""
    if kind == "local":
        return LocalExecutor()
    if kind == "ray":
        return RayExecutor(address=address)
    raise ValueError(f"unknown executor {kind!r}")
