"""Device, precision and process setup, in one place, so the rest of the code never asks.

The same training code runs as one process or as one of N torchrun ranks (RANK, LOCAL_RANK,
WORLD_SIZE in the environment): gloo on CPUs, nccl on GPUs with rank r on cuda:LOCAL_RANK.
Ranks also agree on CPU-side facts (a stop signal) through a gloo group, so doing so never
waits on the GPU."""
from __future__ import annotations

import contextlib
import gc
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .cpu import keep_freed_memory
from .config import DEVICES, PRECISIONS
from .errors import ConfigError


@dataclass
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None   # the arithmetic setup decided: torch.bfloat16, or None for fp32
    rank: int = 0
    local_rank: int = 0                  # the rank among this machine's processes
    world_size: int = 1
    cpu_group: object = None             # gloo group for CPU tensors (None: the default group, when it is gloo)

    @property
    def precision(self) -> str:
        return "bf16" if self.autocast_dtype == torch.bfloat16 else "fp32"

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run directory and prints."""
        return self.rank == 0

    def autocast(self):
        """The runtime's precision for a model as training builds it: bf16 autocast around its
        forward pass (or nothing, in fp32); the densities stay fp32 (see models/vae.py). A model
        prepared for inference carries the precision itself (models/inference.py)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def generator(self, seed: int) -> torch.Generator:
        """A seeded generator on this runtime's device (noise is drawn where it is used). The
        same seed on every rank gives every rank the same stream."""
        return torch.Generator(self.device).manual_seed(seed)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to train: DDP around it across ranks (it averages gradients), else itself.
        Buffers are not broadcast from rank 0 each step (forward_sync_buffers=False, torch 2.13's
        name for broadcast_buffers=False): the only ones that change, the vq family's codebook,
        are kept identical on every rank by summing their statistics (models/vq_vae.py), and a
        broadcast would hide a rank that drifted. DDP still copies rank 0's buffers once, here,
        where every rank holds the same ones already (the same seed, or the same checkpoint)."""
        if self.world_size == 1:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)

    def shard(self, n: int) -> slice:
        """This rank's rows of a global batch of `n`: contiguous, sizes differing by at most one."""
        return slice(n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size)

    def sum_all(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums `tensor` (on the device) over ranks, in place; returns it."""
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def max_all(self, value: int) -> int:
        """The largest of every rank's `value`."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return int(t.item())

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.cpu_group)

    @contextlib.contextmanager
    def local_main_first(self):
        """Runs the body on each machine's local rank 0 first, then on the other ranks: one
        process per machine downloads into the cache, the others then read it."""
        if self.local_rank != 0:
            self.barrier()
        yield
        if self.local_rank == 0:
            self.barrier()

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            # DDP's reducer and its finished gloo work hold tensors; freed only at interpreter
            # exit they take the GIL from a dying interpreter and the process aborts (exit 134).
            # Collect them while the interpreter and the group are still alive.
            gc.collect()
            dist.destroy_process_group()


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 pays where the hardware has bf16 matrix units: AMX/AVX512-BF16 CPUs, Ampere+ GPUs."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_device(name: str = "auto") -> torch.device:
    """The device `--device` names (one of config.DEVICES): auto is cuda where torch sees a GPU, else cpu."""
    if name not in DEVICES:
        raise ConfigError(f"--device must be one of {', '.join(DEVICES)}; got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The arithmetic `--precision` names (one of config.PRECISIONS) on `device`: bf16 (torch.bfloat16)
    or fp32 (None); auto is bf16 where bf16_is_fast, else fp32. The one place this is decided: training
    applies it with Runtime.autocast, inference by preparing the model (models/inference.py)."""
    if name not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}; got {name!r}")
    if name == "bf16" and not bf16_is_fast(device):
        print(f"vaekit: warning: this {device.type} has no bf16 instructions: bf16 is emulated, about 10x slower "
              "than fp32 (--precision auto picks fp32 here)", file=sys.stderr)
    use_bf16 = name == "bf16" or (name == "auto" and bf16_is_fast(device))
    return torch.bfloat16 if use_bf16 else None


def setup(device: str = "auto", precision: str = "auto", distributed: bool = False) -> Runtime:
    """The runtime for `device` and `precision` (see resolve_device, resolve_precision). With
    `distributed`, under torchrun with more than one process, this also joins the process group
    (the caller ends it with `Runtime.close`)."""
    keep_freed_memory()
    dev = resolve_device(device)
    autocast_dtype = resolve_precision(precision, dev)
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if distributed else 1
    if world_size == 1:
        return Runtime(dev, autocast_dtype)
    local_rank = int(os.environ["LOCAL_RANK"])
    cpu_group = None
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank} has no GPU (torch sees {torch.cuda.device_count()}); "
                              "start at most one process per GPU (--nproc-per-node)")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev, **_attempt_store())
        cpu_group = dist.new_group(backend="gloo")
    else:
        dist.init_process_group("gloo", **_attempt_store())
    return Runtime(dev, autocast_dtype, dist.get_rank(), local_rank, dist.get_world_size(), cpu_group)


SEPARATE_STORES = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"   # =1: each rendezvous round a store of its own


def _attempt_store() -> dict:
    """The store (env://) the group forms in, under a prefix of its own for each restart when
    torchrun shares one store across restarts (see store_prefix)."""
    store, rank, world_size = next(dist.rendezvous("env://"))
    prefix = store_prefix(os.environ)
    return {"store": store if prefix is None else dist.PrefixStore(prefix, store), "rank": rank,
            "world_size": world_size}


def store_prefix(env) -> str | None:
    """The prefix the process group's keys take in torchrun's store, from the rank's environment.

    By default torchrun hands every rendezvous round the same store (the agent's), so a restarted
    group would find the addresses its failed predecessor left there and its connections would be
    refused (pytorch/pytorch#167288): each restart takes keys of its own, named by the agent's
    restart count. That count is agreed only on one machine: with several launchers, one restarted
    because a rank of another failed counts no restart (torchrun: "membership changes do not count
    as retries"), its ranks take other keys than the failed machine's and the two never meet (the
    job hangs). So a job of several machines that may restart is refused here unless its
    launchers run with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, under which each round has a store of
    its own (a new port) and no prefix is needed."""
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None                                       # a store of its own: nothing left in it
    if int(env.get("GROUP_WORLD_SIZE", "1")) > 1 and int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        raise ConfigError(f"a job of several machines with --max-restarts needs a store per restart (torchrun's "
                          f"shared store cannot tell the machines which restart is current): start torchrun with "
                          f"--rdzv-backend c10d and {SEPARATE_STORES}=1 exported on each machine")
    return f"vaekit/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def restartable_job() -> str | None:
    """The id of the torchrun job this rank belongs to when the job may restart its ranks
    (--max-restarts) and the id names it (--rdzv-id; `--nproc` and --standalone draw a new one per
    launch; torchrun's default, "none", names no job): a run such a job made is resumed by its
    restarted ranks, after a failure or because a rank of another machine failed (torchrun counts
    no restart then), where any other start is refused a run directory that exists. None
    otherwise; on one machine `restarted` then tells a restart. A job of several machines that may
    restart must name itself: ConfigError otherwise."""
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) == 0:
        return None
    if job in (None, "", "none"):
        if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1:
            raise ConfigError("a job of several machines with --max-restarts needs a name, so that a restarted "
                              "machine knows the run its job made: pass the same --rdzv-id NAME to torchrun on each")
        return None
    return job


def restarted() -> bool:
    """Whether torchrun started this process again after a failure on this machine (--max-restarts)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
