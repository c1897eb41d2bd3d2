"""No host synchronisation on the hot path of ``grpo_loss`` / ``linear_grpo_loss`` at the default validation level.

On the CPU, a TorchDispatchMode records every aten op of a forward + backward and flags the ops that make a
CUDA stream synchronise with the host (reading a value: ``_local_scalar_dense`` behind ``item``/``bool``/
``int``; data-dependent output sizes: ``nonzero``, ``masked_select``, boolean indexing, ``unique``; copies to
the host; tensors made from host data, ``torch.tensor``/``as_tensor``, a blocking host-to-device copy on CUDA),
inside the library's custom ops too. ``host_sync_free`` is patched to True so the code takes its CUDA path. The test is shown to catch
syncs: the same call with ``validate="full"`` or ``check_finite=True`` is flagged. On a GPU,
``torch.cuda.set_sync_debug_mode("error")`` makes any sync raise.
"""
import pytest
import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

import gxpo_kernels._utils as gutils
from gxpo_kernels.ops import grpo_loss, linear_grpo_loss

aten = torch.ops.aten
_SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
             aten.is_nonzero.default, aten.equal.default, aten.allclose.default, aten.item.default,
             aten.unique_dim.default, aten._unique2.default, aten.unique_consecutive.default,
             aten.repeat_interleave.Tensor}


class SyncRecorder(TorchDispatchMode):
    """Record the ops that would synchronise a CUDA stream with the host."""

    def __init__(self, device_type="cpu"):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        opdef = OPDEFS.get(func._schema.name)
        if opdef is not None and func._schema.name.startswith("gxpo::"):
            # look inside the library's own custom ops (masked-row handling, launchers) instead of treating
            # them as opaque: their Python implementation runs with this recorder active again
            with self:
                return opdef._init_fn(*args, **kwargs)
        if func in _SYNC_OPS:
            self.syncs.append(name)
        elif func in (aten.lift_fresh.default, aten.lift_fresh_copy.default):
            # torch.tensor(host data, device=...): on CUDA a blocking host-to-device copy (a sync)
            self.syncs.append(name + " (host data to device)")
        elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default):
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
                self.syncs.append(name + " (bool index)")
        elif func in (aten._to_copy.default, aten.copy_.default) and kwargs.get("device") is not None \
                and torch.device(kwargs["device"]).type == "cpu" and args[0].device.type != "cpu":
            self.syncs.append(name + " (to host)")
        return func(*args, **kwargs)


def _inputs(B=3, T=6, V=97, H=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(logits=torch.randn(B, T, V, generator=g), hidden=torch.randn(B, T, H, generator=g),
                weight=torch.randn(V, H, generator=g) * 0.3, bias=torch.randn(V, generator=g),
                tokens=torch.randint(0, V, (B, T), generator=g), adv=torch.randn(B, generator=g),
                mask=torch.rand(B, T, generator=g) > 0.3, old=-torch.rand(B, T, generator=g) * 5,
                ref=-torch.rand(B, T, generator=g) * 5)


def _call(linear, backend, d, **kw):
    opts = dict(beta=0.05, entropy_coef=0.01, eps_high=0.28, backend=backend, **kw)
    if linear:
        h, w, b = (d[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
        loss, metrics = linear_grpo_loss(h, w, d["tokens"], d["adv"], d["mask"], d["old"], d["ref"], bias=b, **opts)
    else:
        x = d["logits"].clone().requires_grad_()
        loss, metrics = grpo_loss(x, d["tokens"], d["adv"], d["mask"], d["old"], d["ref"], **opts)
    loss.backward()
    return loss, metrics


CALLS = [pytest.param(False, "triton", {}, id="grpo_loss-triton"),
         pytest.param(False, "torch", {}, id="grpo_loss-torch"),
         pytest.param(False, "triton", dict(importance_sampling="sequence", loss_agg_mode="seq-mean-token-mean",
                                            num_items_in_batch=None), id="grpo_loss-gspo"),
         pytest.param(False, "triton", dict(num_items_in_batch=torch.tensor(50.0)), id="grpo_loss-num-items"),
         pytest.param(True, "torch", {}, id="linear_grpo_loss-torch"),
         pytest.param(True, "torch", dict(grad_in_forward=True), id="linear_grpo_loss-grad-in-forward"),
         pytest.param(True, "triton", {}, id="linear_grpo_loss-triton"),
         pytest.param(True, "triton", dict(grad_in_forward=True), id="linear_grpo_loss-triton-grad-in-forward"),
         *(pytest.param(False, "triton", dict(policy_loss=p), id=f"grpo_loss-{p}") for p in ("cispo", "sapo", "vespo"))]


@pytest.mark.parametrize("linear,backend,kw", CALLS)
def test_default_call_makes_no_host_sync(monkeypatch, linear, backend, kw):
    monkeypatch.setattr(gutils, "host_sync_free", lambda device: True)
    d = _inputs()
    with SyncRecorder() as rec:
        loss, _ = _call(linear, backend, d, **kw)
    assert rec.syncs == []
    assert torch.isfinite(loss)
    # the same numbers as the compacting (CPU) path
    monkeypatch.setattr(gutils, "host_sync_free", lambda device: False)
    ref, _ = _call(linear, backend, d, **kw)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(validate="full"), dict(check_finite=True)])
@pytest.mark.parametrize("linear", (False, True))
def test_recorder_catches_the_opt_in_value_checks(monkeypatch, linear, kw):
    """The recorder is not blind: opt-in value checks and CPU row compaction are flagged."""
    monkeypatch.setattr(gutils, "host_sync_free", lambda device: True)
    with SyncRecorder() as rec:
        _call(linear, "torch", _inputs(), **kw)
    assert rec.syncs
    monkeypatch.setattr(gutils, "host_sync_free", lambda device: False)
    if linear:
        with SyncRecorder() as rec:
            _call(linear, "torch", _inputs())
        assert any("nonzero" in s or "_local_scalar_dense" in s for s in rec.syncs)
    with SyncRecorder() as rec:
        torch.tensor(100.0)            # e.g. a hyperparameter turned into a tensor: a host-to-device copy on CUDA
    assert rec.syncs == ["aten.lift_fresh.default (host data to device)"]


@pytest.mark.gpu
@pytest.mark.parametrize("linear", (False, True))
def test_no_sync_on_cuda(linear):
    d = {k: v.cuda() for k, v in _inputs(B=4, T=64, V=4099, H=256).items()}
    d["hidden"], d["weight"], d["bias"] = (d[k].bfloat16() for k in ("hidden", "weight", "bias"))
    _call(linear, "triton", d)                        # warm-up: compile outside the checked region
    # made before the checked region: torch.tensor(x, device="cuda") is itself a blocking host-to-device copy
    num_items = torch.tensor(100.0, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, metrics = _call(linear, "triton", d)
        loss2, _ = _call(linear, "triton", d, num_items_in_batch=num_items)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item() and torch.isfinite(loss2).item()
