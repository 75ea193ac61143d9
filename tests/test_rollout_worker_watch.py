"""RolloutWorkerWatch: an agent-loop worker's death fails the trainer's wait instead of hanging it (real Ray actors)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from steppo_verl.trainer import RolloutWorkerDied, RolloutWorkerWatch, watch_rollout_workers


class Worker:
    def crash(self) -> None:
        os.kill(os.getpid(), signal.SIGSEGV)  # as TextWorld's interpreter took its worker down

    def busy(self, seconds: float) -> None:
        time.sleep(seconds)


@pytest.fixture(scope="module")
def ray_workers():
    import ray

    # The workers import Worker from this module.
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        yield lambda count: [ray.remote(Worker).remote() for _ in range(count)]
    finally:
        ray.shutdown()


def _poll(watch: RolloutWorkerWatch, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        watch.check()
        time.sleep(0.05)


@pytest.mark.ray
def test_a_worker_that_crashed_fails_the_wait_and_is_named(ray_workers):
    import ray

    workers = ray_workers(2)
    watch = RolloutWorkerWatch(lambda: workers, every_s=0.2)
    _poll(watch, 1.0)  # both alive: several pings answered, nothing raised
    with pytest.raises(ray.exceptions.ActorDiedError):
        ray.get(workers[1].crash.remote())
    with pytest.raises(RolloutWorkerDied, match=r"agent-loop worker 1 died .* instead of waiting forever"):
        _poll(watch, 10.0)


@pytest.mark.ray
def test_a_busy_worker_is_not_taken_for_dead_and_the_check_never_blocks(ray_workers):
    import ray

    workers = ray_workers(1)
    busy = workers[0].busy.remote(2.0)  # a plain actor runs one call at a time: the ping waits behind this
    watch = RolloutWorkerWatch(lambda: workers, every_s=0.1)
    slowest = 0.0
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        started = time.monotonic()
        watch.check()
        slowest = max(slowest, time.monotonic() - started)
        time.sleep(0.05)
    ray.get(busy)
    assert slowest < 0.5, f"one check took {slowest:.2f} s"


def test_the_check_runs_after_each_wait_and_the_wait_is_unchanged():
    calls = []

    class Buffer:
        def _wait_for_next_poll(self, partition_id: str, last_debug_time: float) -> float:
            calls.append(("wait", partition_id, last_debug_time))
            return last_debug_time + 1

    class Watch:
        def check(self) -> None:
            calls.append(("check",))

    buffer = Buffer()
    watch_rollout_workers(buffer, Watch())
    assert buffer._wait_for_next_poll("train", 5.0) == 6.0
    assert calls == [("wait", "train", 5.0), ("check",)]


def test_verls_sample_loops_wait_where_the_watch_is_attached():
    """Both of verl's replay buffers sleep between polls in ``_wait_for_next_poll``; were that renamed, the watch
    would silently never run."""
    import inspect

    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer, ReplayBufferAsync

    for cls in (ReplayBuffer, ReplayBufferAsync):
        loops = [name for name, member in inspect.getmembers(cls, inspect.isfunction)
                 if "self._wait_for_next_poll(" in inspect.getsource(member)]
        assert loops, f"{cls.__name__} no longer waits in _wait_for_next_poll"
