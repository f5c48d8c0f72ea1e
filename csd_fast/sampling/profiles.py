"""Hardware profiles: the vLLM engine arguments and environment each machine type wants.

    profile = resolve_profile("auto", engine_overrides={"max_num_seqs": 512}, env_overrides={})
    print(profile.describe())        # every setting, and where it came from

Profiles (each value can be overridden with `--engine-arg KEY=VALUE` / `--env KEY=VALUE`):

* `cuda` (NVIDIA): bf16, prefix caching, chunked prefill, CUDA graphs kept (no enforce_eager),
  `gpu_memory_utilization` 0.90, one TP=1 engine per visible GPU (`CUDA_VISIBLE_DEVICES`).
* `rocm-mi250x` (AMD MI250X, gfx90a, 2 GCDs per card of 64 GB each): bf16 (same peak as fp16,
  no FP8); `max_num_seqs` 1024 and `max_num_batched_tokens` 32768 instead of vLLM's 256 / 8192,
  which hold only ~4 prompts x 64 samples; prefix caching; AITER off (`VLLM_ROCM_USE_AITER=0`:
  it does not support gfx90a); custom all-reduce off; one TP=1 engine per GCD, masked with
  `HIP_VISIBLE_DEVICES` only (`ROCR_VISIBLE_DEVICES` and `CUDA_VISIBLE_DEVICES` are removed from
  the engine's environment: masking twice renumbers devices under each other).
* `cpu` (vLLM's CPU backend, tests and laptops): fp32, eager (no compile: start-up in seconds
  rather than a minute), `VLLM_CPU_KVCACHE_SPACE=2` GiB, the engine core in-process
  (`VLLM_ENABLE_V1_MULTIPROCESSING=0`: nothing left behind after a kill -9).
* `auto`: rocm-mi250x on a ROCm gfx90a device, cuda on another GPU, else cpu.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

PROFILES: dict[str, dict] = {
    "cuda": {
        "engine": {
            "dtype": "bfloat16",
            "enable_prefix_caching": True,
            "enable_chunked_prefill": True,
            "enforce_eager": False,
            "gpu_memory_utilization": 0.90,
            "tensor_parallel_size": 1,
        },
        "env": {},
        "device_mask": "CUDA_VISIBLE_DEVICES",
    },
    "rocm-mi250x": {
        "engine": {
            "dtype": "bfloat16",
            "enable_prefix_caching": True,
            "enable_chunked_prefill": True,
            "max_num_seqs": 1024,
            "max_num_batched_tokens": 32768,
            "gpu_memory_utilization": 0.92,
            "tensor_parallel_size": 1,
            "disable_custom_all_reduce": True,
        },
        "env": {"VLLM_ROCM_USE_AITER": "0"},
        "device_mask": "HIP_VISIBLE_DEVICES",
    },
    "cpu": {
        "engine": {
            "dtype": "float32",
            "enable_prefix_caching": True,
            "enforce_eager": True,
        },
        "env": {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        "device_mask": None,
    },
}
PROFILE_NAMES = ("auto", *PROFILES)
# masks that must not reach an engine alongside the profile's own (ROCm: never two masks)
_OTHER_MASKS = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")


@dataclass
class Profile:
    name: str
    engine: dict
    env: dict
    device_mask: str | None
    sources: dict = field(default_factory=dict)  # setting -> "profile" | "override"
    devices: list[str] = field(default_factory=list)  # visible device ids, in mask order

    def describe(self) -> str:
        lines = [f"profile {self.name}: {len(self.devices) or 'no'} accelerator(s) {self.devices}"]
        for k, v in self.engine.items():
            lines.append(f"  engine {k} = {v!r} ({self.sources.get(k, 'profile')})")
        for k, v in self.env.items():
            lines.append(f"  env {k}={v} ({self.sources.get('env:' + k, 'profile')})")
        return "\n".join(lines)

    def device_env(self, device: str | None) -> dict[str, str | None]:
        """Environment of the engine process pinned to `device` (None: the values to unset)."""
        env: dict[str, str | None] = dict(self.env)
        if self.device_mask and device is not None:
            for other in _OTHER_MASKS:
                env[other] = None
            env[self.device_mask] = device
        return env


def detect() -> str:
    """The profile `auto` picks on this machine."""
    try:
        import torch
    except ImportError:
        return "cpu"
    if not torch.cuda.is_available():
        return "cpu"
    if getattr(torch.version, "hip", None):
        arch = getattr(torch.cuda.get_device_properties(0), "gcnArchName", "")
        return "rocm-mi250x" if "gfx90a" in arch else "cuda"
    return "cuda"


def visible_devices(name: str) -> list[str]:
    """Device ids as the parent sees them: the entries of an existing mask, else 0..count-1."""
    if name == "cpu":
        return []
    masks = ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES") if name == "rocm-mi250x" else ()
    for var in (*masks, "CUDA_VISIBLE_DEVICES"):
        value = os.environ.get(var)
        if value:
            if var == "ROCR_VISIBLE_DEVICES":
                # ROCR already renumbered the devices: HIP indexes them from 0
                return [str(i) for i in range(len(value.split(",")))]
            return [v.strip() for v in value.split(",") if v.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def resolve_profile(
    name: str, engine_overrides: dict | None = None, env_overrides: dict | None = None
) -> Profile:
    if name not in PROFILE_NAMES:
        raise ValueError(f"unknown profile {name!r}; choose from {', '.join(PROFILE_NAMES)}")
    chosen = detect() if name == "auto" else name
    base = PROFILES[chosen]
    engine, env = dict(base["engine"]), dict(base["env"])
    sources = {}
    for k, v in (engine_overrides or {}).items():
        engine[k] = v
        sources[k] = "override"
    for k, v in (env_overrides or {}).items():
        env[str(k)] = str(v)
        sources["env:" + str(k)] = "override"
    return Profile(chosen, engine, env, base["device_mask"], sources, visible_devices(chosen))


def apply_env(env: dict[str, str | None]) -> None:
    """Set (or, for None, remove) environment variables in this process before vLLM starts."""
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
