"""Where stages run: in this process (local) or as Ray tasks (embedded local Ray or a cluster).

Stages are written once; an executor only decides where a call happens and with which
resources (declared in the config, never inferred from the driver's hardware).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resources:
    """Resources one task or actor asks for."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0


class Executor(Protocol):
    """Runs functions somewhere and returns their results in input order."""

    def map(self, fn: Callable[..., Any], items: Sequence[Any], resources: Resources) -> list[Any]:
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


def _apply(fn: Callable[..., Any], item: Any) -> Any:
    """Ray task body: call ``fn`` (any picklable callable, e.g. a stage's bound method)."""
    configure_worker_logging()
    return fn(item)


class LocalExecutor:
    """Runs every call in the current process, one after another."""

    def map(self, fn: Callable[..., Any], items: Sequence[Any], resources: Resources) -> list[Any]:
        return [fn(item) for item in items]

    def shutdown(self) -> None:
        pass


class RayExecutor:
    """Runs each call as a Ray task with the declared resources.

    Connects to ``address`` (or ``RAY_ADDRESS``, as set by ``ray job submit``) when given,
    otherwise starts an embedded local Ray. Only a Ray instance it started is shut down.
    """

    def __init__(self, address: str | None = None, num_cpus: float | None = None,
                 num_gpus: float | None = None) -> None:
        import ray

        self._ray = ray
        self._owns_ray = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"log_to_driver": True}
            if address:
                kwargs["address"] = address
            elif num_cpus is not None:
                kwargs.update(num_cpus=num_cpus, num_gpus=num_gpus)
            context = ray.init(**kwargs)
            self._owns_ray = True
            url = getattr(context, "dashboard_url", None)
            log.info("Ray %s at %s; dashboard: %s", ray.__version__,
                     context.address_info.get("address"), f"http://{url}" if url else "not running")

    def map(self, fn: Callable[..., Any], items: Sequence[Any], resources: Resources) -> list[Any]:
        remote = self._ray.remote(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
                                  max_retries=2)(_apply)
        return self._ray.get([remote.remote(fn, item) for item in items])

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
