"""The trainer's engines and step loop (``trainer.engines``, ``trainer.loop``), CPU.

- the two loss paths of :class:`PolicyLoss` (fused lm_head + GRPO loss from hidden states, and materialised
  logits + ``grpo_loss``) give the same loss, metrics and parameter gradients on a tiny Qwen2 / Llama with
  left-padded prompts, masked response tails and old log-probs, in fp32 (tight) and bf16 (loose), for the
  token-mean and Dr.GRPO aggregations;
- a short run with either path writes the per-phase timing fields: wall (``t_*``), process CPU (``cpu_*``),
  no CUDA-event fields on the CPU, and ``t_update`` = ``t_backward`` + ``t_optimizer``;
- the config picks the engine (plain without --deepspeed).
"""
import pytest
import torch

from gxpo_kernels.trainer import loop
from gxpo_kernels.trainer.config import SFTConfig, TrainConfig
from gxpo_kernels.trainer.engines import PlainEngine, PolicyLoss, make_engine
from gxpo_kernels.trainer.model import build_tiny_model, tiny_config_dict
from gxpo_kernels.trainer.tasks import CharTokenizer

TINY = dict(steps=2, prompts=4, group=4, val_every=2, val_size=16, pass1_size=4, pass1_n=2, hidden=32, quiet=True,
            sft=SFTConfig(max_steps=0))


def _batch(V, seed, B=6, Lp=5, T=7):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(2, Lp + 1, (B,), generator=g)
    prompt_attn = (torch.arange(Lp)[None] >= Lp - lens[:, None]).long()        # left padding
    prompt_ids = torch.where(prompt_attn.bool(), torch.randint(3, V, (B, Lp), generator=g), 0)
    resp = torch.randint(3, V, (B, T), generator=g)
    rlen = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < rlen[:, None]                               # response tail masked
    resp = torch.where(mask, resp, 0)
    adv = torch.randn(B, generator=g)
    old = -torch.rand(B, T, generator=g) * 3
    return prompt_ids, prompt_attn, resp, mask, adv, old


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_loss_paths_agree(arch, dtype, agg, beta):
    tok = CharTokenizer("0123456789+=,abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRS")   # V = 64
    model = build_tiny_model(tiny_config_dict(tok.vocab_size, arch, hidden=48, layers=2, heads=4, intermediate=96),
                             tok, torch.device("cpu"), seed=3).to(dtype)
    kw = dict(temperature=0.7, eps_low=0.2, eps_high=0.28, loss_agg_mode=agg)
    if agg == "seq-mean-token-sum-norm":
        kw["max_length"] = 9
    batch = _batch(tok.vocab_size, seed=11)
    if beta:   # a KL penalty against reference log-probs near the old ones
        kw["beta"] = beta
        batch = batch + (batch[-1] - 0.5 * torch.rand(batch[-1].shape, generator=torch.Generator().manual_seed(5)),)
    out = {}
    for path in ("fused_linear", "logits"):
        model.zero_grad(set_to_none=True)
        mod = PolicyLoss(model, kw, loss_path=path)
        loss = mod(*batch)
        loss.backward()
        out[path] = (loss.detach().double(), {k: float(v) for k, v in mod.metrics.items()},
                     {n: p.grad.double().clone() for n, p in model.named_parameters()})
    (lf, mf, gf), (ll, ml, gl) = out["fused_linear"], out["logits"]
    if beta:   # the penalty is in the loss: without it (same inputs) the loss drops by beta * KL (token-mean)
        assert mf["kl"] > 0.01
        if agg == "token-mean" and dtype == torch.float32:
            plain = PolicyLoss(model, {k: v for k, v in kw.items() if k != "beta"}, loss_path="logits")
            assert float(ll - plain(*batch[:-1]).detach().double()) == pytest.approx(beta * ml["kl"], rel=1e-4)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-3)
    assert lf.item() != 0.0
    torch.testing.assert_close(lf, ll, **tol)
    assert set(mf) == set(ml)
    for k in mf:
        assert mf[k] == pytest.approx(ml[k], rel=tol["rtol"], abs=10 * tol["atol"]), k
    assert set(gf) == set(gl)
    for n in gf:
        scale = gl[n].abs().max().clamp(min=1e-12)
        assert float((gf[n] - gl[n]).abs().max() / scale) < (1e-4 if dtype == torch.float32 else 8e-2), n


def test_bad_loss_path():
    with pytest.raises(ValueError, match="loss_path"):
        TrainConfig(loss_path="liger").validate()
    with pytest.raises(ValueError, match="loss_path"):
        PolicyLoss(torch.nn.Linear(2, 2), {}, loss_path="nope")


@pytest.mark.parametrize("loss_path", ["fused_linear", "logits"])
def test_timing_fields(tmp_path, loss_path):
    cfg = TrainConfig(algo="grpo", loss_path=loss_path, out_dir=str(tmp_path / "o"), cache_dir=str(tmp_path / "c"),
                      save_model=False, **TINY)
    assert isinstance(make_engine(cfg), PlainEngine)
    records = loop.train(cfg)
    assert "t_val" in records[0] and "cpu_val" in records[0]
    for r in records[1:]:
        for phase in ("rollout", "update"):
            assert r[f"t_{phase}"] > 0 and r[f"cpu_{phase}"] >= 0, (phase, r)
            assert f"gpu_{phase}" not in r                       # CUDA-event times only on CUDA
        assert r["t_update"] == pytest.approx(r["t_backward"] + r["t_optimizer"], rel=1e-9, abs=1e-12)
        assert ("t_val" in r) == ("val" in r) == ("cpu_val" in r)
    assert records[-1]["metrics"]["logp_mean"] < 0
