"""The ``hf`` rollout backend, registered in both registries that resolve ``rollout.name``.

verl looks a rollout backend up twice: on the driver, ``RolloutReplicaRegistry`` gives the replica
class that starts the generation servers; in each ``ActorRolloutRefWorker``,
``verl.workers.rollout.base._ROLLOUT_REGISTRY`` gives the server adapter that receives the actor's
weights. :class:`HFReplica` starts one :class:`~steppo_verl.cpu.server.HFRolloutServer` actor per
replica; :class:`HFServerAdapter` forwards each step's weights to it. With the default
``checkpoint_engine.backend=naive`` the trainer calls ``update_weights`` on every actor rank with a
generator of full (unsharded) tensors; iterating it is collective across FSDP ranks, so every rank
drains it and the replica's first rank ships the tensors to its server.
"""

from __future__ import annotations

import os

import ray
from verl.workers.rollout.base import _ROLLOUT_REGISTRY, BaseRollout
from verl.workers.rollout.replica import RolloutReplica, RolloutReplicaRegistry

from steppo_verl.cpu.server import HFRolloutServer

ROLLOUT_NAME = "hf"
_SERVER_PREFIX = "hf_server_"


def _server_name(replica_rank: int) -> str:
    return f"{_SERVER_PREFIX}{replica_rank}_0"


class HFReplica(RolloutReplica):
    """Driver side: one single-process ``HFRolloutServer`` actor per replica, on the replica's node."""

    async def launch_servers(self):
        if self.world_size != 1:
            raise ValueError(
                f"the hf rollout serves each replica from one process; got tensor*data*pipeline parallel size "
                f"{self.world_size}: set actor_rollout_ref.rollout.tensor_model_parallel_size=1 (and data/pipeline 1)"
            )
        options = {"name": _server_name(self.replica_rank) + self.name_suffix, "max_concurrency": self.max_concurrency}
        if self.workers:
            node_id = await self.workers[0].__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id())
            options["scheduling_strategy"] = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                node_id=node_id, soft=False
            )
        server = (
            ray.remote(HFRolloutServer)
            .options(**options)
            .remote(config=self.config, model_config=self.model_config, replica_rank=self.replica_rank)
        )
        await server.wake_up.remote()  # surfaces model-loading errors here, not at the first request
        self.servers = [server]
        self._server_handle = server
        # Agent loops reach the server through its actor handle; the address only keys the load balancer.
        self._server_address = options["name"]


class HFServerAdapter(BaseRollout):
    """Worker side: receives the actor's weights and loads them into this replica's ``HFRolloutServer``."""

    def __init__(self, config, model_config, device_mesh, replica_rank: int = -1):
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", 0))
        self.replica_rank = rank if replica_rank == -1 else replica_rank  # one process per replica
        self.is_leader_rank = True
        self._server = None

    def _server_handle(self):
        if self._server is None:  # the servers start after the workers, so look the actor up lazily
            self._server = ray.get_actor(_server_name(self.replica_rank))
        return self._server

    async def update_weights(self, weights, global_steps: int | None = None, wire_format="named_tensors", **kwargs):
        if wire_format != "named_tensors":
            raise NotImplementedError(f"the hf rollout takes full named tensors, not {wire_format!r}")
        if kwargs.get("peft_config") is not None:
            raise NotImplementedError("the hf rollout does not load LoRA adapters; set model.lora.merge=true")
        # Copy: engines may hand out views of a reused staging buffer.
        state = {name: tensor.detach().to("cpu", copy=True) for name, tensor in weights}
        await self._server_handle().load_weights.remote(state, global_steps)

    async def resume(self, tags: list[str]):
        pass  # the server never frees its weights

    async def release(self):
        pass


def register_rollout() -> None:
    """Make ``actor_rollout_ref.rollout.name=hf`` resolvable on the driver and in the workers (idempotent)."""
    RolloutReplicaRegistry.register(ROLLOUT_NAME, lambda: HFReplica)
    _ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = f"{HFServerAdapter.__module__}.{HFServerAdapter.__qualname__}"

