"""Data-parallel training on ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Each process holds the whole network, reads the same (seeded) sequence of global batches,
encodes each global batch as one process would, and keeps its own contiguous rows of it
(:class:`Shard`). It runs ``rule.step`` on those rows; the ``.grad`` the rule wrote (a batch
mean over its rows) is then summed over the processes with the weight rows / global rows, which
is the global batch mean, and every process takes the same optimiser step. Why not
``DistributedDataParallel``: it synchronises gradients from autograd hooks during
``backward()``, and every rule except BPTT and OWM writes ``.grad`` without calling backward.

Rules whose step depends on more than per-sample quantities read the shard from ``rule.shard``
(None in a single process, which then runs exactly the code it always ran):

* random numbers drawn per sample (NP/LOCO noise, OPZO noise, SFDFA tangents): every process
  draws the *global* stacked batch's numbers from the shared-seed generator and keeps its own
  rows (:meth:`Shard.draw`), so each sample gets the noise one process would have given it and
  the generators stay in step;
* batch statistics (LOCO's projector inputs, OWM's input means, OPZO's and SFDFA's feedback
  updates, the deep NP options' running RMS, heads, rates and averages): all-gathered or
  all-reduced (:meth:`Shard.gather_rows`, :meth:`Shard.sum`, :meth:`Shard.mean`).

Everything else (feedback matrices drawn from the seed, LOCO's cluster memory, optimiser state)
then evolves identically in every process; rank 0 writes metrics and checkpoints. See
``docs/distributed.md``.

Processes are started by ``torchrun`` or ``locosnn train --nproc N`` (:func:`launch`), which
describe the group in RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
"""
from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from .errors import LocosnnError

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: torch threads per data-parallel process unless LOCOSNN_THREADS says otherwise
DEFAULT_THREADS = 1


@dataclass
class Group:
    """This process's place in the data-parallel group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device  # where tensors handed to collectives live (cpu for gloo, cuda:LOCAL_RANK for nccl)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, total: int) -> "Shard":
        """This process's contiguous rows of a global batch of ``total`` rows (sizes differ by at most 1)."""
        base, extra = divmod(total, self.world_size)
        sizes = tuple(base + (1 if r < extra else 0) for r in range(self.world_size))
        return Shard(lo=sum(sizes[: self.rank]), size=sizes[self.rank], total=total, sizes=sizes, group=self)


_GROUP: Optional[Group] = None


class Reported(LocosnnError):
    """An error rank 0 found and printed; the other processes exit with it silently."""


def env_world_size() -> int:
    """WORLD_SIZE as torchrun (or ``locosnn train --nproc``) set it; 1 when unset."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise LocosnnError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def env_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def current() -> Optional[Group]:
    """The data-parallel group this process joined, or None (one process)."""
    return _GROUP


def is_main() -> bool:
    """True in rank 0 and in a single process: the process that prints and writes."""
    return _GROUP is None or _GROUP.rank == 0


def init_from_env(device: str = "auto", threads: Optional[int] = None,
                  timeout_s: float = 600.0) -> Optional[Group]:
    """Join the process group described by the torchrun environment variables; None when
    WORLD_SIZE is 1 or unset (nothing is initialised then). The backend is NCCL when ``device``
    resolves to CUDA (each process on cuda:LOCAL_RANK), else gloo. Sets ``threads`` torch threads
    (default: LOCOSNN_THREADS, else 1)."""
    global _GROUP
    if _GROUP is not None:
        return _GROUP
    ws = env_world_size()
    if ws <= 1:
        return None
    missing = [k for k in ENV_VARS if k not in os.environ]
    if missing:
        raise LocosnnError(f"data-parallel: WORLD_SIZE={ws} but {', '.join(missing)} not set; start the "
                           "processes with torchrun or `locosnn train --nproc N`")
    import torch.distributed as dist
    from .config import resolve_device

    if not dist.is_available():
        raise LocosnnError("data-parallel training needs a torch build with torch.distributed")
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    torch.set_num_threads(int(threads or os.environ.get("LOCOSNN_THREADS", DEFAULT_THREADS)))
    dev = resolve_device(device)
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if local >= n:
            raise LocosnnError(f"data-parallel: process with LOCAL_RANK {local} has no GPU (this node has {n}); "
                               "start at most one process per GPU")
        torch.cuda.set_device(local)
        backend, cdev = "nccl", torch.device("cuda", local)
    else:
        backend, cdev = "gloo", torch.device("cpu")
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=ws,
                            timeout=datetime.timedelta(seconds=timeout_s))
    _GROUP = Group(rank=rank, world_size=ws, local_rank=local, backend=backend, device=cdev)
    return _GROUP


def shutdown() -> None:
    """Leave the process group (a no-op in a single process)."""
    global _GROUP
    if _GROUP is None:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _GROUP = None


def barrier() -> None:
    if _GROUP is not None:
        import torch.distributed as dist
        dist.barrier()


def on_main(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and share its outcome: an error there is raised in every process
    (as :class:`Reported` outside rank 0, so it is printed once, by rank 0), instead of leaving
    the others waiting in their next collective. Returns fn's result on rank 0, None elsewhere."""
    if _GROUP is None:
        return fn()
    import torch.distributed as dist

    msg: list[Any] = [None]
    result = None
    if _GROUP.rank == 0:
        try:
            result = fn()
        except Exception as e:
            msg = [str(e) or type(e).__name__]
            dist.broadcast_object_list(msg, src=0)
            raise
    dist.broadcast_object_list(msg, src=0)
    if msg[0] is not None:
        raise Reported(msg[0])
    return result


def _flat(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]).to(device)


def all_reduce_sum(tensors: Sequence[torch.Tensor], group: Optional[Group] = None) -> list[torch.Tensor]:
    """Element-wise sums over the processes of each tensor (the same shapes in every process), in one
    collective; new tensors, in the inputs' dtypes and devices."""
    g = group or _GROUP
    if g is None or not tensors:
        return [t.clone() for t in tensors]
    import torch.distributed as dist

    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    buf = _flat([t.to(dtype) for t in tensors], g.device)
    dist.all_reduce(buf)
    out, i = [], 0
    for t in tensors:
        out.append(buf[i:i + t.numel()].reshape(t.shape).to(device=t.device, dtype=t.dtype))
        i += t.numel()
    return out


def mean_over_ranks(values: dict[str, float], group: Optional[Group] = None) -> dict[str, float]:
    """The mean over the processes of each number (every process must pass the same keys)."""
    g = group or _GROUP
    if g is None or not values:
        return dict(values)
    keys = sorted(values)
    (s,) = all_reduce_sum([torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)], g)
    return {k: float(v) / g.world_size for k, v in zip(keys, s.tolist())}


@dataclass
class Shard:
    """Rows [lo, lo + size) of a global batch of ``total`` rows; ``sizes`` holds every process's count."""

    lo: int
    size: int
    total: int
    sizes: tuple[int, ...]
    group: Group

    @property
    def weight(self) -> float:
        """This shard's share of the batch: the weight of its batch means in the global mean."""
        return self.size / self.total

    def take(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This process's rows of a global-batch tensor along ``dim``."""
        return t.narrow(dim, self.lo, self.size)

    def global_rows(self, n_local: int) -> tuple[int, torch.Tensor]:
        """A stacked batch of ``n_local`` rows made of R = n_local / size blocks of this shard (e.g.
        clean | noisy): the global stacked batch's row count R * total and the indices of this
        process's rows in it."""
        if self.size == 0 or n_local % self.size:
            raise ValueError(f"a stacked batch of {n_local} rows is not made of shards of {self.size}")
        R = n_local // self.size
        idx = (torch.arange(R)[:, None] * self.total + self.lo + torch.arange(self.size)[None, :]).reshape(-1)
        return R * self.total, idx

    def draw(self, sample: Callable[[tuple[int, ...]], torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
        """Random rows for a local stacked batch of ``shape``, as one process on the global batch draws
        them: ``sample`` draws the global shape (from a generator in the same state in every
        process) and this process keeps its rows."""
        n, idx = self.global_rows(int(shape[0]))
        full = sample((n,) + tuple(int(s) for s in shape[1:]))
        return full.index_select(0, idx.to(full.device))

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """The global batch's rows of a per-sample tensor (this process's rows are ``t``), in order."""
        import torch.distributed as dist

        if t.shape[0] != self.size:
            raise ValueError(f"gather_rows: {t.shape[0]} rows, but this shard has {self.size}")
        m = max(self.sizes)
        pad = t.new_zeros((m,) + tuple(t.shape[1:]))
        pad[: self.size] = t
        pad = pad.to(self.group.device).contiguous()
        parts = [torch.empty_like(pad) for _ in self.sizes]
        dist.all_gather(parts, pad)
        return torch.cat([p[:n] for p, n in zip(parts, self.sizes)]).to(t.device)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over the processes."""
        return all_reduce_sum([t], self.group)[0]

    def sums(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Sums over the processes of several tensors, in one collective."""
        return all_reduce_sum(list(tensors), self.group)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The global batch mean from this process's batch mean (weighted by the shards' sizes)."""
        return self.means([t])[0]

    def means(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """:meth:`mean` of several tensors, in one collective."""
        return all_reduce_sum([t * self.weight for t in tensors], self.group)

    def reduce_step(self, params: Iterable[torch.nn.Parameter], loss: float, correct: int) -> tuple[float, int]:
        """After ``rule.step``: replace every parameter's .grad (a mean over this shard) by the global
        batch mean, and return the global batch's summed loss and correct count; one collective.
        A parameter keeps ``grad = None`` only if no process wrote one."""
        params = list(params)
        ref = next((p for p in params if p.grad is not None), params[0] if params else None)
        if ref is None:
            return loss * self.size, correct
        dtype = ref.grad.dtype if ref.grad is not None else ref.dtype
        parts = [(p.grad.reshape(-1).to(dtype) * self.weight) if p.grad is not None
                 else torch.zeros(p.numel(), dtype=dtype, device=ref.device) for p in params]
        stats = torch.tensor([float(p.grad is not None) for p in params] + [loss * self.size, float(correct)],
                             dtype=dtype, device=ref.device)
        import torch.distributed as dist

        buf = torch.cat(parts + [stats]).to(self.group.device)
        dist.all_reduce(buf)
        buf = buf.to(ref.device)
        i = 0
        flags = buf[-len(params) - 2:-2].tolist()
        for p, f in zip(params, flags):
            p.grad = buf[i:i + p.numel()].reshape(p.shape).to(p.dtype).clone() if f else None
            i += p.numel()
        return float(buf[-2]), int(round(float(buf[-1])))


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_env(rank: int, nproc: int, port: int, threads: int = DEFAULT_THREADS) -> dict[str, str]:
    """The environment torchrun gives process ``rank`` of ``nproc`` on one node."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
            "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "LOCOSNN_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}


def launch(nproc: int, argv: Sequence[str], threads: int = DEFAULT_THREADS, poll_s: float = 0.2) -> int:
    """Run ``python -m locosnn ARGV`` in ``nproc`` local processes that form one gloo/NCCL group
    (what ``torchrun --standalone --nproc-per-node N -m locosnn ARGV`` does, without its agent).
    Returns the first non-zero exit code, else 0; when one process fails, the others are stopped."""
    if nproc < 1:
        raise LocosnnError(f"--nproc must be >= 1, got {nproc}")
    port = free_port()
    env = {**os.environ, "LOCOSNN_LAUNCHED": "1"}  # the launcher itself reports an interrupt
    procs = [subprocess.Popen([sys.executable, "-m", "locosnn", *argv], env={**env, **worker_env(r, nproc, port, threads)})
             for r in range(nproc)]
    try:
        while True:
            codes = [p.poll() for p in procs]
            bad = [c for c in codes if c not in (None, 0)]
            if bad:
                _stop(procs)
                return bad[0]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(poll_s)
    except BaseException:
        _stop(procs)
        raise


def _stop(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    """SIGTERM to the processes still running (each stops like after Ctrl-C), SIGKILL after ``grace_s``."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
