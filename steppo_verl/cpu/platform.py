"""The ``cpu`` platform for verl's platform registry, the FSDP2 engines on it, and two wrapped verl functions.

verl resolves every device question (device name, ``torch.<device>`` module, collective backend,
Ray resource) through one platform object chosen by ``verl.plugin.platform``. Without an
accelerator it falls back to ``nvidia`` (``cuda``/``nccl``), so nothing trains on a CPU machine.
:class:`PlatformCPU` answers ``cpu``/``gloo``. Auto-detection probes the built-in platforms first and
this one last, and this one only claims a host whose torch build has no accelerator at all, so a GPU
(or NPU/ROCm) installation never selects it unless ``VERL_PLATFORM=cpu`` asks for it.

Ray still schedules verl's workers on resource ``GPU`` (verl's resource check counts only
``GPU``/``NPU``), so a CPU run declares logical GPUs: ``+ray_kwargs.ray_init.num_gpus=N``.
"""

from __future__ import annotations

from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch
from verl.plugin.platform import PlatformBase, PlatformRegistry

from steppo_verl.cpu import device

PLATFORM_NAME = "cpu"


def _torch_has_accelerator() -> bool:
    """True for any torch build that targets an accelerator (CUDA, ROCm, NPU, XPU, MPS, ...)."""
    if torch.version.cuda is not None or torch.version.hip is not None or hasattr(torch, "npu"):
        return True
    accelerator = getattr(torch, "accelerator", None)
    return accelerator is not None and accelerator.is_available()


class PlatformCPU(PlatformBase):
    """Host CPU as verl's device: ``torch.device("cpu")``, gloo collectives, no-op caches and profilers."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> ModuleType:
        return device

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # Probed after the accelerator platforms; still refuse any accelerator build of torch so that a
        # CPU-only Ray actor on a GPU host (where those probes can fail) keeps verl's nvidia fallback.
        return not _torch_has_accelerator()

    def current_device(self) -> str:  # type: ignore[override]
        return device.current_device()

    def device_count(self) -> int:
        return device.device_count()

    def set_device(self, device_index: int) -> None:
        pass

    def synchronize(self, device_index: int | None = None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # Ray sets it for the logical GPUs the workers are scheduled on; a CPU build of torch ignores it.
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


def register_platform() -> None:
    """Add ``cpu`` to verl's platform registry (idempotent)."""
    if PlatformRegistry.get(PLATFORM_NAME) is not PlatformCPU:
        PlatformRegistry.register(platform=PLATFORM_NAME)(PlatformCPU)


def register_engines() -> None:
    """Register verl's own FSDP engines for device ``cpu``, backend ``fsdp2`` (idempotent).

    verl registers them for ``cuda``/``npu`` only. FSDP1 (``strategy=fsdp``) is left out on purpose:
    its ``sync_module_states`` needs an accelerator, and verl's "No engine registered for
    device='cpu' ... backend='fsdp'" says so more clearly than a failure deep inside FSDP.
    """
    from verl.workers.engine import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead, FSDPEngineWithValueHead

    for model_type, engine_cls in (("language_model", FSDPEngineWithLMHead), ("value_model", FSDPEngineWithValueHead)):
        if EngineRegistry._engines.get(model_type, {}).get("fsdp2", {}).get(PLATFORM_NAME) is not engine_cls:
            EngineRegistry.register(model_type=model_type, backend="fsdp2", device=PLATFORM_NAME)(engine_cls)


def wrap_verl_functions() -> None:
    """The three verl callables wrapped for the cpu platform (idempotent); no registry or hook reaches them.

    Each wrapper calls verl's own callable unchanged on every other platform.

    1. ``verl.workers.engine_workers.initialize_global_process_group_ray``: ``TrainingWorker.__init__``
       calls it without a backend, and verl then builds ``f"cpu:gloo,{device}:{backend}"``, which on
       the cpu platform is ``"cpu:gloo,cpu:gloo"`` and torch rejects ("Duplicate device type cpu").
       On the cpu platform a missing backend becomes the platform's (plain ``gloo``).
    2. ``verl.utils.model.load_valuehead_model`` (the critic's model): it passes
       ``attn_implementation="flash_attention_2"`` to transformers whatever the config says, and
       flash-attn does not exist on CPU. On the cpu platform the critic loads its token-classification
       head with the attention implementation from the model config (``override_config``), as the
       actor does. (verl's fallback, trl's value-head model, hard-codes flash attention too.)
    3. ``CPUOffloadPolicy`` as named in ``verl.workers.engine.fsdp.transformer_impl``: verl builds every
       forward-only FSDP2 model (the reference policy of a KL loss) with ``pin_memory=True``, and pinning
       host memory needs an accelerator ("Cannot access accelerator device"). On the cpu platform the
       parameters live in host memory anyway, so the policy is built without pinning.
    """
    from verl.utils import model as verl_model
    from verl.utils.device import get_device_name, get_nccl_backend
    from verl.workers import engine_workers

    init_process_group = engine_workers.initialize_global_process_group_ray
    if not getattr(init_process_group, "_steppo_cpu_wrapped", False):

        def initialize_global_process_group_ray(timeout_second=None, backend=None):
            if backend is None and get_device_name() == PLATFORM_NAME:
                backend = get_nccl_backend()
            return init_process_group(timeout_second=timeout_second, backend=backend)

        initialize_global_process_group_ray._steppo_cpu_wrapped = True
        initialize_global_process_group_ray.__wrapped__ = init_process_group
        engine_workers.initialize_global_process_group_ray = initialize_global_process_group_ray

    load_value_model = verl_model.load_valuehead_model  # imported by name at call time by the engine
    if not getattr(load_value_model, "_steppo_cpu_wrapped", False):

        def load_valuehead_model(local_path, torch_dtype, model_config, trust_remote_code):
            if get_device_name() != PLATFORM_NAME:
                return load_value_model(local_path, torch_dtype, model_config, trust_remote_code)
            from transformers import AutoModelForTokenClassification

            return AutoModelForTokenClassification.from_pretrained(
                local_path,
                torch_dtype=torch_dtype,
                config=model_config,
                attn_implementation=getattr(model_config, "_attn_implementation", None) or "sdpa",
                trust_remote_code=trust_remote_code,
            )

        load_valuehead_model._steppo_cpu_wrapped = True
        load_valuehead_model.__wrapped__ = load_value_model
        verl_model.load_valuehead_model = load_valuehead_model

    from verl.workers.engine.fsdp import transformer_impl

    offload_policy = transformer_impl.CPUOffloadPolicy
    if not getattr(offload_policy, "_steppo_cpu_wrapped", False):

        def cpu_offload_policy(pin_memory=True):
            return offload_policy(pin_memory=pin_memory and get_device_name() != PLATFORM_NAME)

        cpu_offload_policy._steppo_cpu_wrapped = True
        cpu_offload_policy.__wrapped__ = offload_policy
        transformer_impl.CPUOffloadPolicy = cpu_offload_policy
