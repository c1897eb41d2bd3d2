"""The trainer's engines and step loop (``trainer.engines``, ``trainer.loop``), CPU.

- the two loss paths of :class:`PolicyLoss` (fused lm_head + GRPO loss from hidden states, and materialised
  logits + ``grpo_loss``) give the same loss, metrics and parameter gradients on a tiny Qwen2 / Llama with
  left-padded prompts, masked response tails and old log-probs, in fp32 (tight) and bf16 (loose), for the
  token-mean and Dr.GRPO aggregations;
- a short run with either path writes the per-phase timing fields: wall (``t_*``), process CPU (``cpu_*``),
  no CUDA-event fields on the CPU, and ``t_update`` = ``t_backward`` + ``t_optimizer``;
- the config picks the engine (plain without --deepspeed);
- memory bounds: --gradient_accumulation_steps 2 and 4 give one pass's gradients, parameters and logged loss
  after a GRPO step (three loss aggregations) and a GXPO step, with micro-batches of different token counts,
  and must divide the rows (DeepSpeed's JSON owns the value); the rollout's chunked no-grad log-probs equal
  one forward's; --eval_batch_size is the batch of every evaluation (warm-start check, greedy, pass@1).
"""
import json

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


def _one_step(monkeypatch, tmp_path, **kw):
    """One RL step of a tiny model: (the rollout's mask, the last pass's gradients, the parameters, the record)."""
    got = {}

    def keep_engine(cfg):
        got["engine"] = make_engine(cfg)
        return got["engine"]

    def keep_rollout(*a, **k):
        got["ro"] = loop_rollout(*a, **k)
        return got["ro"]

    def random_advantages(cfg, rewards, *a, **k):   # the untrained policy's rewards are all 0: no gradient
        return torch.randn(rewards.shape, generator=torch.Generator().manual_seed(7)), None

    loop_rollout = loop.rollout
    monkeypatch.setattr(loop, "make_engine", keep_engine)
    monkeypatch.setattr(loop, "rollout", keep_rollout)
    monkeypatch.setattr(loop, "compute_advantages", random_advantages)
    cfg = TrainConfig(**dict(TINY, steps=1, val_every=1, lr=1e-4, max_new_tokens=6, cache_dir=str(tmp_path)), **kw)
    rec = loop.train(cfg)[-1]
    model = got["engine"].policy
    return (got["ro"].mask, {n: p.grad.double().clone() for n, p in model.named_parameters()},
            {n: p.detach().double().clone() for n, p in model.named_parameters()}, rec)


@pytest.mark.parametrize("algo, agg", [("grpo", "token-mean"), ("grpo", "seq-mean-token-mean"),
                                       ("grpo", "seq-mean-token-sum-norm"), ("gxpo", "token-mean")])
def test_gradient_accumulation_matches_one_pass(monkeypatch, tmp_path, algo, agg):
    """--gradient_accumulation_steps 2 and 4 (micro-batches of 8 and 4 of the 16 rows) give the gradients, the
    parameters and the logged loss of one pass over all rows, to float rounding, with micro-batches holding
    different token counts (a per-micro-batch token-mean averaged over them is not the batch's)."""
    kw = dict(algo=algo, loss_agg_mode=agg, gxpo_gate="none")
    mask, g1, p1, r1 = _one_step(monkeypatch, tmp_path, **kw)
    for gas in (2, 4):
        m, g, p, r = _one_step(monkeypatch, tmp_path, gradient_accumulation_steps=gas, **kw)
        assert torch.equal(m, mask)                                  # the same rollout
        counts = mask.sum(-1).view(gas, -1).sum(-1)
        assert len(set(counts.tolist())) > 1, counts                 # micro-batches of different token counts
        assert all(float(v.abs().max()) > 0 for v in g1.values())
        for n in g1:
            scale = g1[n].abs().max().clamp(min=1e-12)
            assert float((g[n] - g1[n]).abs().max() / scale) < 1e-4, (gas, n)   # 0.1 without token weights
            torch.testing.assert_close(p[n], p1[n], rtol=1e-5, atol=1e-6)   # Adam steps are ~lr = 1e-4
        assert r["loss"] == pytest.approx(r1["loss"], rel=1e-5, abs=1e-7)
        if algo == "grpo":                                           # (the pre-clip norm)
            assert r["update"]["grad_norm"] == pytest.approx(r1["update"]["grad_norm"], rel=1e-5)


def test_gradient_accumulation_must_divide_the_rows():
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps \(3\) must divide the rows of a step, "
                                         r"prompts \* group = 16"):
        TrainConfig(**dict(TINY, gradient_accumulation_steps=3)).validate()
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be an int >= 1"):
        TrainConfig(**dict(TINY, gradient_accumulation_steps=0)).validate()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rollout_logprobs_in_chunks_match_one_pass(monkeypatch, dtype):
    """The rollout's no-grad log-prob forwards (policy and reference) run in row chunks under
    LOGPROB_CHUNK_ELEMENTS: a budget of 3 rows per chunk (B = 9 rows -> 3 forwards each) gives the old and
    reference log-probs and the entropy of one forward over all rows; the default budget is one forward."""
    from gxpo_kernels.trainer import rollout as ro_mod
    from gxpo_kernels.trainer.tasks import make_task, make_tokenizer

    cfg = TrainConfig()
    task = make_task(cfg)
    tok = make_tokenizer(task)
    model = build_tiny_model(tiny_config_dict(tok.vocab_size, "qwen2", 32, 2, 4, 128), tok, torch.device("cpu"),
                             seed=1).to(dtype)
    ref = build_tiny_model(tiny_config_dict(tok.vocab_size, "qwen2", 32, 2, 4, 128), tok, torch.device("cpu"),
                           seed=2).to(dtype)
    pairs = task.sample(3, "train", seed=0)
    calls = []
    forward = ro_mod.response_logits

    def counted(m, ids, *a):
        calls.append(ids.shape[0])
        return forward(m, ids, *a)

    monkeypatch.setattr(ro_mod, "response_logits", counted)
    out = []
    for chunked in (False, True):
        if chunked:   # 3 rows of (T + 1) x V logits (the same seed samples the same responses)
            L = out[0][0].resp.shape[1] + 1
            monkeypatch.setattr(ro_mod, "LOGPROB_CHUNK_ELEMENTS", 3 * L * tok.vocab_size)
        calls.clear()
        torch.manual_seed(4)
        out.append((ro_mod.rollout(model, tok, task, pairs, 3, 4, 0.8, ref_model=ref), list(calls)))
    (one, c1), (chunked, c3) = out
    assert c1 == [9, 9] and c3 == [3, 3, 3, 3, 3, 3]
    assert torch.equal(one.resp, chunked.resp) and torch.equal(one.mask, chunked.mask)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(chunked.old_logp, one.old_logp, **tol)
    torch.testing.assert_close(chunked.ref_logp, one.ref_logp, **tol)
    assert chunked.entropy == pytest.approx(one.entropy, rel=tol["rtol"])
    assert not torch.equal(one.old_logp, one.ref_logp)


def test_eval_batch_size_reaches_every_evaluate(monkeypatch, tmp_path):
    """--eval_batch_size parses into the config, is saved in config.json, and is the batch size of every
    generate-based evaluation: the warm start's accuracy check, greedy validation and pass@1 sampling."""
    from gxpo_kernels import cli
    from gxpo_kernels.trainer import rollout as ro_mod

    a = cli.build_parser().parse_args(["train", "--eval_batch_size", "3"])
    assert cli.config_from_args(a, TrainConfig()).eval_batch_size == 3
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="eval_batch_size must be an int >= 1"):
            TrainConfig(eval_batch_size=bad).validate()
    seen, generated = [], []
    evaluate, generate = loop.evaluate, ro_mod.generate

    def spy_evaluate(*a, **k):
        seen.append((len(a[3]), k.get("batch_size"), k.get("do_sample", False)))
        return evaluate(*a, **k)

    def spy_generate(model, tok, ids, *a, **k):
        generated.append(ids.shape[0])
        return generate(model, tok, ids, *a, **k)

    monkeypatch.setattr(loop, "evaluate", spy_evaluate)
    monkeypatch.setattr(ro_mod, "generate", spy_generate)
    out = tmp_path / "o"
    cfg = TrainConfig(**dict(TINY, steps=1, val_size=7, pass1_size=4, eval_batch_size=3, out_dir=str(out),
                             cache_dir=str(tmp_path / "c"), save_model=False,
                             sft=SFTConfig(max_steps=1, check_every=1, check_size=5, batch_size=4, pool_size=8)))
    loop.train(cfg)
    # warm-start check (5 prompts), then step 0 and step 1: greedy (7) and pass@1 (4)
    assert seen == [(5, 3, False), (7, 3, False), (4, 3, True), (7, 3, False), (4, 3, True)]
    assert [g for g in generated if g <= 3] == [3, 2] + 2 * [3, 3, 1, 3, 1]   # rollouts are 16 rows
    assert json.loads((out / "config.json").read_text())["train"]["eval_batch_size"] == 3


def test_deepspeed_json_owns_gradient_accumulation(tmp_path):
    """--deepspeed: the JSON's gradient_accumulation_steps is used; --gradient_accumulation_steps fills in a JSON
    without it and must not contradict one with it."""
    from gxpo_kernels.trainer.engines import load_ds_config

    path = tmp_path / "ds.json"
    base = {"zero_optimization": {"stage": 2}}
    cfg = TrainConfig(prompts=4, group=4)
    path.write_text(json.dumps(dict(base, gradient_accumulation_steps=4)))
    assert load_ds_config(str(path), cfg)["gradient_accumulation_steps"] == 4
    assert load_ds_config(str(path), cfg.replace(gradient_accumulation_steps=4))["train_micro_batch_size_per_gpu"] == 4
    with pytest.raises(ValueError, match="--gradient_accumulation_steps 2 conflicts with the "
                                         "gradient_accumulation_steps 4 of --deepspeed"):
        load_ds_config(str(path), cfg.replace(gradient_accumulation_steps=2))
    path.write_text(json.dumps(base))
    d = load_ds_config(str(path), cfg.replace(gradient_accumulation_steps=8))
    assert (d["gradient_accumulation_steps"], d["train_micro_batch_size_per_gpu"]) == (8, 2)


class _StubDeepSpeed:
    """What the trainer's DeepSpeedEngine reads of a DeepSpeed engine at a boundary step: ``step`` skips an fp16
    overflow (``was_step_applied()`` False, ``get_global_grad_norm()`` inf, as ZeRO 1/2 set them) or a bf16 NaN
    is stepped (ZeRO checks bf16 gradients only with check_grad_overflow: applied, norm NaN)."""

    def __init__(self, outcomes):
        self.outcomes, self.applied, self.norm = list(outcomes), None, None

    def step(self):
        self.applied, self.norm = self.outcomes.pop(0)

    def was_step_applied(self):
        return self.applied

    def get_global_grad_norm(self):
        return self.norm


def test_deepspeed_engine_counts_the_steps_deepspeed_applied():
    """GRPO on DeepSpeed counts a step as taken when DeepSpeed applied it (``was_step_applied``), asked right after
    each ``optimizer_step``: an fp16 overflow DeepSpeed skipped was counted as an optimizer step (step_skipped was
    always False), and a step's answer must not be the last step's (grpo_epochs steps several times)."""
    from gxpo_kernels.trainer.engines import DeepSpeedEngine
    eng = DeepSpeedEngine.__new__(DeepSpeedEngine)
    eng.engine = _StubDeepSpeed([(False, float("inf")), (True, 0.5), (True, float("nan"))])
    got = []
    for _ in range(3):
        norm = eng.optimizer_step()
        got.append((norm, eng.step_skipped(norm)))
    assert got[0] == (float("inf"), True) and got[1] == (0.5, False)
    assert got[2][1] is False and got[2][0] != got[2][0]   # stepped (DeepSpeed's choice), its NaN norm reported
