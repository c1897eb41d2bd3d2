"""Helpers shared by the tests: fla-style named RMS-ratio check plus exact float64 checks, a free local port and
the spawn-and-load of multi-rank tests."""
import contextlib
import os
import socket

import torch


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (MASTER_PORT of a spawned process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker, world: int, out_dir: str, cases, *, weights_only: bool = True) -> list:
    """Run ``worker(rank, port, out_dir, cases)`` on ``world`` spawned ranks and load what each rank saved
    (``out_dir/rank<r>.pt``), in rank order."""
    import torch.multiprocessing as mp
    mp.spawn(worker, args=(free_port(), out_dir, cases), nprocs=world, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=weights_only) for r in range(world)]


@contextlib.contextmanager
def count_plan_builds():
    """Count the update rules' builds of their prepared extrapolation plan (``ExtrapolationPlan`` as
    ``gxpo_kernels.update.base`` calls it) inside the block: yields a one-element list, the count so far."""
    from gxpo_kernels.update import base
    real, n = base.ExtrapolationPlan, [0]

    def counting(*args, **kwargs):
        n[0] += 1
        return real(*args, **kwargs)
    base.ExtrapolationPlan = counting
    try:
        yield n
    finally:
        base.ExtrapolationPlan = real


def flat64(ts) -> torch.Tensor:
    """The tensors of ``ts`` as one flat float64 vector."""
    return torch.cat([t.reshape(-1).double() for t in ts])


def rms_err_ratio(ref: torch.Tensor, tri: torch.Tensor) -> float:
    ref, tri = ref.double(), tri.double()
    err = (ref - tri).pow(2).mean().sqrt()
    base = ref.pow(2).mean().sqrt()
    return float(err / base.clamp(min=1e-30))


def assert_close(name: str, ref: torch.Tensor, tri: torch.Tensor, ratio: float, atol: float = 1e-6):
    """Pass when the RMS error is below ``ratio`` x RMS(ref), or the max abs error is below ``atol``."""
    assert ref.shape == tri.shape, f"{name}: shape {tuple(tri.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(tri).all(), f"{name}: non-finite values"
    abs_err = float((ref.double() - tri.double()).abs().max().detach()) if ref.numel() else 0.0
    r = rms_err_ratio(ref, tri)
    assert abs_err <= atol or r <= ratio, f"{name}: rms err ratio {r:.3e} > {ratio:.1e} (max abs err {abs_err:.3e})"


class FailOnUse:
    """A stand-in for ``real`` (a function, or a Triton kernel, which is indexed by its grid before the call) whose
    ``k``-th use raises ``exc("injected")``; every other use defers to ``real``.
    ``uses`` counts them: an exception-safety test injects a failure part way through an op with it."""

    def __init__(self, real, k: int, exc=torch.OutOfMemoryError):
        self.real, self.k, self.exc, self.uses = real, k, exc, 0

    def _use(self) -> None:
        self.uses += 1
        if self.uses == self.k:
            raise self.exc("injected")

    def __call__(self, *args, **kwargs):
        self._use()
        return self.real(*args, **kwargs)

    def __getitem__(self, grid):
        self._use()
        return self.real[grid]
