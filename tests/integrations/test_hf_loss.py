"""Guards ``gxpo_kernels.integrations.hf``: the fused lm_head GRPO loss on real (tiny, random) transformers
models gives the same loss and the same gradient on every parameter as the model's own logits path followed
by the float64 ``grpo_loss_ref`` (Qwen2, Llama, tied embeddings, prompt/completion split, left padding),
the no-grad log-prob helper matches the logits path, and unsupported heads are refused."""
import functools

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gxpo_kernels.integrations.hf import (causal_lm_grpo_loss, causal_lm_hidden_states,  # noqa: E402
                                          causal_lm_token_logprobs)
from gxpo_kernels.ops.grpo.reference import grpo_loss_ref
from gxpo_kernels.ops.logprobs.reference import token_logprobs_ref  # noqa: E402
from tests._utils import assert_close  # noqa: E402

V = 211


def _model(family: str, tied: bool = False):
    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, tie_word_embeddings=tied)
    cfg = (transformers.Qwen2Config if family == "qwen2" else transformers.LlamaConfig)(**common)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    return model


def _batch(B=3, P=5, K=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, P + K), generator=g)
    am = torch.ones(B, P + K, dtype=torch.long)
    am[0, :2] = 0                                 # left-padded prompt
    cm = am[:, P:].clone()
    cm[1, K - 3:] = 0                             # short completion, padded on the right
    adv = torch.randn(B, generator=g)
    return ids, am, cm, adv


def _logits_path(model, ids, am, cm, adv, K, old=None, ref=None, **opts):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=am).logits[:, -K - 1:-1]
    loss, metrics = grpo_loss_ref(logits, ids[:, -K:], adv, cm.bool(), old, ref, **opts)
    loss.backward()
    return loss, metrics, {n: p.grad.clone() for n, p in model.named_parameters()}


def _fused_path(model, ids, am, cm, adv, K, old=None, ref=None, **opts):
    model.zero_grad(set_to_none=True)
    loss, metrics = causal_lm_grpo_loss(model, ids, am, adv, completion_mask=cm, logits_to_keep=K,
                                        old_logprobs=old, ref_logprobs=ref, **opts)
    loss.backward()
    return loss, metrics, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family,tied,backend,extra", [
    pytest.param("qwen2", False, "torch", dict(), id="qwen2-torch"),
    pytest.param("llama", False, "torch", dict(deterministic=True), id="llama-torch"),
    pytest.param("qwen2", True, "triton", dict(), id="qwen2-tied-triton"),
])
def test_fused_loss_matches_logits_path(family, tied, backend, extra):
    model = _model(family, tied)
    ids, am, cm, adv = _batch()
    K = cm.shape[1]
    with torch.no_grad():
        lp = token_logprobs_ref(model(input_ids=ids, attention_mask=am).logits[:, -K - 1:-1], ids[:, -K:], 0.8)[0]
    old = (lp + 0.3 * torch.randn(lp.shape, dtype=lp.dtype)).float()
    ref = (lp + 0.2 * torch.randn(lp.shape, dtype=lp.dtype)).float()
    opts = dict(temperature=0.8, beta=0.05, entropy_coef=0.01, loss_agg_mode="seq-mean-token-mean")
    rl, rm, rg = _logits_path(model, ids, am, cm, adv, K, old, ref, **opts)
    fl, fm, fg = _fused_path(model, ids, am, cm, adv, K, old, ref, backend=backend, **extra, **opts)
    assert_close("loss", rl.detach(), fl.detach().double(), 1e-5)
    for k in rm:
        assert_close(k, rm[k], fm[k].double(), 1e-5, atol=1e-6)
    assert rg.keys() == fg.keys()
    for name in rg:
        assert_close(name, rg[name], fg[name], 2e-5, atol=1e-7)


def test_default_alignment_scores_every_token_after_the_first():
    model = _model("llama")
    ids, am, _, adv = _batch(B=2, P=1, K=6, seed=1)
    am[:] = 1
    hidden, tokens = causal_lm_hidden_states(model, ids, am)
    assert hidden.shape == (2, ids.shape[1] - 1, 64) and torch.equal(tokens, ids[:, 1:])
    rl, _, rg = _logits_path(model, ids, am, am[:, 1:], adv, ids.shape[1] - 1)
    model.zero_grad(set_to_none=True)
    fl, _ = causal_lm_grpo_loss(model, ids, am, adv, backend="torch")
    fl.backward()
    assert_close("loss", rl.detach(), fl.detach().double(), 1e-5)
    assert_close("lm_head", rg["lm_head.weight"], model.lm_head.weight.grad, 2e-5)


def test_token_logprobs_helper_matches_logits():
    model = _model("qwen2")
    ids, am, cm, _ = _batch(seed=2)
    K = cm.shape[1]
    lp, ent = causal_lm_token_logprobs(model, ids, am, logits_to_keep=K, completion_mask=cm, temperature=0.9,
                                       compute_entropy=True, backend="torch")
    assert lp.shape == (3, K) and lp.grad_fn is None
    with torch.no_grad():
        rlp, rent = token_logprobs_ref(model(input_ids=ids, attention_mask=am).logits[:, -K - 1:-1], ids[:, -K:], 0.9)
    m = cm.bool()
    assert_close("logp", rlp[m], lp[m], 1e-5)
    assert_close("entropy", rent[m], ent[m], 1e-5)
    assert (lp[~m] == 0).all()


def test_bad_arguments():
    model = _model("qwen2")
    ids, am, cm, adv = _batch()
    with pytest.raises(ValueError, match="logits_to_keep"):
        causal_lm_grpo_loss(model, ids, am, adv, logits_to_keep=ids.shape[1])
    with pytest.raises(ValueError, match="completion_mask"):
        causal_lm_grpo_loss(model, ids, am, adv, completion_mask=cm[:, 1:], logits_to_keep=cm.shape[1])
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(TypeError, match="nn.Linear"):
        causal_lm_grpo_loss(model, ids, am, adv)


SOFT_CAPS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")


@pytest.mark.parametrize("name,value", [("final_logit_softcapping", 30.0), ("lm_head_multiplier", 0.25),
                                        ("output_multiplier", 2.0), ("logits_scaling", 0.5), ("logit_scale", 0.1),
                                        ("logits_soft_cap", 30.0), ("output_logit_soft_cap", 15.0),
                                        ("logits_mup_width_multiplier", 24.0)])
def test_models_that_rescale_their_logits_are_refused(name, value):
    """A logit scale or soft cap anywhere in the config (FalconH1's lm_head_multiplier used to pass and gave
    log-probs off by 0.13) or in a composite model's text config is refused, here and on TRL's hidden path."""
    from gxpo_kernels.integrations.hf import logit_rescaling, patch_causal_lm
    model = _model("qwen2")
    ids, am, cm, adv = _batch()
    assert logit_rescaling(model) is None
    setattr(model.config, name, value)
    with pytest.raises(NotImplementedError, match=name):
        causal_lm_token_logprobs(model, ids, am, logits_to_keep=cm.shape[1])
    with pytest.raises(NotImplementedError, match=name):
        patch_causal_lm(model)
    setattr(model.config, name, None if name in SOFT_CAPS else 1.0)   # neutral values pass
    assert logit_rescaling(model) is None


def _recurrent_gemma():
    cfg = transformers.RecurrentGemmaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                            intermediate_size=128, lru_width=64, attention_window_size=8)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def _xlstm():
    cfg = transformers.xLSTMConfig(vocab_size=V, hidden_size=64, embedding_dim=64, num_heads=4, num_blocks=1,
                                   qk_dim_factor=1.0, v_dim_factor=1.0, mode="train", chunk_size=4,
                                   chunkwise_kernel="chunkwise--native_autograd",
                                   sequence_kernel="native_sequence__native", step_kernel="native")
    return transformers.AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("build,name", [(_recurrent_gemma, "logits_soft_cap"), (_xlstm, "output_logit_soft_cap")])
def test_real_models_with_other_soft_cap_names_are_refused(build, name):
    """RecurrentGemma (``logits_soft_cap``) and xLSTM (``output_logit_soft_cap``) soft-cap their logits under
    their own config names: both used to run through the fused head, whose log-probs of the uncapped logits were
    off by 44 and 98 nats on these tiny models with logits of about 30."""
    from gxpo_kernels.integrations.hf import logit_rescaling, patch_causal_lm
    torch.manual_seed(0)
    model = build().float().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)                       # logits of tens, where a cap of 15-30 bites
        ids = torch.randint(0, V, (2, 8))
        hidden, _ = causal_lm_hidden_states(model, ids, None, logits_to_keep=7)
        uncapped = model.lm_head(hidden)
        capped = model(input_ids=ids).logits[:, :-1].float()
    assert (uncapped - capped).abs().max() > 1.0               # the head alone is not the model's logits
    assert name in logit_rescaling(model)
    with pytest.raises(NotImplementedError, match=name):
        causal_lm_token_logprobs(model, ids, None, logits_to_keep=7)
    with pytest.raises(NotImplementedError, match=name):
        patch_causal_lm(model)


def test_logits_cut_to_an_unpadded_vocabulary_are_refused():
    """A head with padding rows whose logits the model drops (``unpadded_vocab_size``, Inkling) would put
    probability on the padding rows in the fused log-softmax."""
    from gxpo_kernels.integrations.hf import logit_rescaling
    model = _model("qwen2")
    model.config.unpadded_vocab_size = V                       # as many rows as the head: nothing is cut
    assert logit_rescaling(model) is None
    model.config.unpadded_vocab_size = V - 11
    assert "unpadded_vocab_size" in logit_rescaling(model)
    with pytest.raises(NotImplementedError, match="unpadded_vocab_size"):
        causal_lm_token_logprobs(model, *_batch()[:2], logits_to_keep=3)


def test_composite_config_soft_cap_is_refused():
    from gxpo_kernels.integrations.hf import logit_rescaling

    class Composite(torch.nn.Module):   # a multimodal model keeps the language model's settings in text_config
        def __init__(self):
            super().__init__()
            self.config = transformers.Gemma3nConfig()
            self.lm_head = torch.nn.Linear(8, 16, bias=False)

        def get_output_embeddings(self):
            return self.lm_head
    m = Composite()
    assert getattr(m.config, "final_logit_softcapping", None) is None
    assert "final_logit_softcapping" in logit_rescaling(m)


def test_zero3_style_head_runs_as_the_head_modules_forward():
    # a parameter carrying ds_id takes the path that runs the loss as lm_head.forward (so DeepSpeed's module
    # hooks gather the weight for forward and backward); without DeepSpeed the result must not change
    model = _model("qwen2")
    ids, am, cm, adv = _batch(seed=3)
    K = cm.shape[1]
    rl, _, rg = _logits_path(model, ids, am, cm, adv, K, temperature=0.9)
    calls = []
    model.lm_head.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape))
    model.lm_head.weight.ds_id = 0
    try:
        fl, fm, fg = _fused_path(model, ids, am, cm, adv, K, temperature=0.9, backend="torch")
    finally:
        del model.lm_head.weight.ds_id
    assert calls == [(3, K, 64)]
    assert "forward" not in model.lm_head.__dict__          # the class forward is restored
    assert_close("loss", rl.detach(), fl.detach().double(), 1e-5)
    assert set(fm) >= {"clip_frac_low", "ratio_mean", "entropy"}
    for name in rg:
        assert_close(name, rg[name], fg[name], 2e-5, atol=1e-7)


_ZERO3_SCRIPT = r"""
import copy, json, torch, torch.distributed as dist, deepspeed, transformers
from deepspeed.utils import safe_get_full_grad
from gxpo_kernels.integrations.hf import causal_lm_grpo_loss, causal_lm_token_logprobs
from gxpo_kernels.ops.grpo.reference import grpo_loss_ref
dist.init_process_group("gloo")
res = []
for tied in (False, True):
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=211, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=tied)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 211, (3, 12), generator=g); am = torch.ones_like(ids); am[0, :2] = 0
    cm = am[:, 5:].clone(); cm[1, 4:] = 0; adv = torch.randn(3, generator=g); K = 7
    logits = ref(input_ids=ids, attention_mask=am).logits[:, -K - 1:-1]
    rl, _ = grpo_loss_ref(logits, ids[:, -K:], adv, cm.bool(), temperature=0.8, entropy_coef=0.01)
    rl.backward()
    ds = {"train_micro_batch_size_per_gpu": 1,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    eng, *_ = deepspeed.initialize(model=model, config=ds, model_parameters=model.parameters())
    shape = list(eng.module.lm_head.weight.shape)
    lp, _ = causal_lm_token_logprobs(eng.module, ids, am, logits_to_keep=K, completion_mask=cm, temperature=0.8,
                                     backend="torch")
    loss, _ = causal_lm_grpo_loss(eng.module, ids, am, adv, completion_mask=cm, logits_to_keep=K, temperature=0.8,
                                  entropy_coef=0.01, backend="torch")
    eng.backward(loss)
    worst = max(float((safe_get_full_grad(p) - q.grad).abs().max() / q.grad.abs().max().clamp(min=1e-12))
                for p, q in zip(eng.module.parameters(), ref.parameters()))
    eng.step()
    rlp = torch.log_softmax(logits.double() / 0.8, -1).gather(-1, ids[:, -K:, None]).squeeze(-1)
    lp_err = float((lp.double() - rlp)[cm.bool()].abs().max())
    res.append(dict(tied=tied, shape=shape, loss=float(loss), ref=float(rl), worst=worst, lp_err=lp_err))
print(json.dumps(res))
"""


@pytest.mark.slow
def test_real_zero3_single_rank_grads_match_plain_model():
    pytest.importorskip("deepspeed")
    import json
    import os
    import pathlib
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0", DS_ACCELERATOR="cpu", TRITON_INTERPRET="0")
    root = pathlib.Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", _ZERO3_SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    for case in json.loads(out.stdout.strip().splitlines()[-1]):
        assert case["shape"] == [0], case                 # really partitioned outside forward
        assert abs(case["loss"] - case["ref"]) < 1e-5, case
        assert case["worst"] < 1e-5, case                 # every parameter's full gradient
        assert case["lp_err"] < 1e-5, case


# ------------------------------------------------------------------------------------------ patch_causal_lm
def test_patch_causal_lm_forward_matches_the_loss_function():
    from gxpo_kernels.integrations.hf import GRPOLossOutput, patch_causal_lm
    model = _model("qwen2")
    ids, am, cm, adv = _batch(seed=4)
    K = cm.shape[1]
    opts = dict(temperature=0.9, beta=0.0, eps_high=0.28, backend="torch")
    want, wm, wg = _fused_path(model, ids, am, cm, adv, K, **opts)
    with torch.no_grad():
        plain_logits = model(input_ids=ids, attention_mask=am).logits
    assert patch_causal_lm(model, temperature=0.9, eps_high=0.28) is model
    model.zero_grad(set_to_none=True)
    out = model(ids, am, advantages=adv, completion_mask=cm, logits_to_keep=K, grpo_options={"backend": "torch"})
    assert isinstance(out, GRPOLossOutput) and set(out.metrics) == set(wm)
    out.loss.backward()
    assert_close("loss", want.detach().double(), out.loss.detach().double(), 1e-6)
    for name, p in model.named_parameters():
        assert_close(name, wg[name], p.grad, 1e-6, atol=1e-8)
    with torch.no_grad():  # without GRPO targets the model's own forward runs unchanged
        torch.testing.assert_close(model(input_ids=ids, attention_mask=am).logits, plain_logits)
    gen = model.generate(ids[:1], attention_mask=am[:1], max_new_tokens=2, do_sample=False)
    assert gen.shape == (1, ids.shape[1] + 2)


def test_patched_model_keeps_positional_calls_and_repatching_replaces_options():
    """Without GRPO targets the patched forward hands every argument on as the caller gave it: a positional
    ``model(ids, am, position_ids)`` used to raise "got multiple values for argument 'input_ids'"."""
    from gxpo_kernels.integrations.hf import patch_causal_lm
    model = _model("llama")
    ids, am, cm, adv = _batch(seed=5)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = model(ids, am, pos).logits
        want_kept = model(ids, am, pos, logits_to_keep=3).logits
    patch_causal_lm(model, temperature=0.5)
    patch_causal_lm(model, temperature=0.9)                       # the second patch only replaces the options
    with torch.no_grad():
        torch.testing.assert_close(model(ids, am, pos).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(model(ids, am, pos, logits_to_keep=3).logits, want_kept, rtol=0, atol=0)
        old = torch.full(cm.shape, -5.0)
        K = cm.shape[1]
        got = model(ids, am, advantages=adv, completion_mask=cm, logits_to_keep=K, old_logprobs=old).loss
        at_09, _ = causal_lm_grpo_loss(model, ids, am, adv, completion_mask=cm, logits_to_keep=K,
                                       old_logprobs=old, temperature=0.9)
        at_05, _ = causal_lm_grpo_loss(model, ids, am, adv, completion_mask=cm, logits_to_keep=K,
                                       old_logprobs=old, temperature=0.5)
    assert got == at_09 and got != at_05


def test_wrapped_models_refused_by_name():
    from gxpo_kernels.integrations.hf import patch_causal_lm

    class Wrapper(torch.nn.Module):  # stand-ins: the check reads the class names (of the MRO) only
        def __init__(self, module):
            super().__init__()
            self.module = module
    DistributedDataParallel, FullyShardedDataParallel, DeepSpeedEngine, PeftModel = (
        type(n, (Wrapper,), {}) for n in ("DistributedDataParallel", "FullyShardedDataParallel", "DeepSpeedEngine",
                                          "PeftModel"))
    PeftModelForCausalLM = type("PeftModelForCausalLM", (PeftModel,), {})
    model = _model("qwen2")
    ids, am, cm, adv = _batch()
    for cls, fix in ((DistributedDataParallel, "patch_causal_lm"), (FullyShardedDataParallel, "patch_causal_lm"),
                     (DeepSpeedEngine, "patch_causal_lm"), (PeftModelForCausalLM, "get_base_model")):
        wrapped = cls(model)
        name = [c.__name__ for c in type(wrapped).__mro__ if c.__name__ in
                ("DistributedDataParallel", "FullyShardedDataParallel", "DeepSpeedEngine", "PeftModel")][0]
        for fn in (lambda: causal_lm_grpo_loss(wrapped, ids, am, adv), lambda: patch_causal_lm(wrapped)):
            with pytest.raises(TypeError, match=f"{name}.*{fix}|{fix}.*{name}|PEFT.*{fix}"):
                fn()


@pytest.mark.slow
def test_patch_causal_lm_under_ddp(tmp_path):
    """2 CPU ranks (gloo), each with half the batch: after DDP's all-reduce both ranks hold the same gradient,
    equal to the single-process gradient of the mean of the two half-batch losses."""
    import os
    import torch.multiprocessing as mp
    from tests.integrations import _hf_ddp_worker as W
    from gxpo_kernels.integrations.hf import patch_causal_lm
    ids, am, cm, adv = _batch(B=4, seed=6)
    model = _model("qwen2")
    K = cm.shape[1]
    with torch.no_grad():
        lp = model(input_ids=ids, attention_mask=am).logits[:, -K - 1:-1].float().log_softmax(-1)
        lp = lp.gather(-1, ids[:, -K:, None]).squeeze(-1)
    batch = dict(ids=ids, am=am, cm=cm, adv=adv, old=lp + 0.2 * torch.randn(lp.shape))
    opts = dict(eps_high=0.28, loss_agg_mode="token-mean", backend="torch")
    patch_causal_lm(model, **opts)
    halves = [{k: v.chunk(2)[r] for k, v in batch.items()} for r in range(2)]
    losses = [model(h["ids"], h["am"], advantages=h["adv"], completion_mask=h["cm"], logits_to_keep=K,
                    old_logprobs=h["old"]).loss for h in halves]
    ((losses[0] + losses[1]) / 2).backward()
    d = str(tmp_path)
    mp.spawn(W.worker, args=(d, batch, opts), nprocs=2, join=True)
    r0, r1 = (torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(2))
    assert not torch.equal(r0["loss"], r1["loss"])        # the ranks really saw different data
    assert "DistributedDataParallel" in r0["refused"] and "patch_causal_lm" in r0["refused"]
    for name, p in model.named_parameters():
        assert torch.equal(r0["grads"][name], r1["grads"][name]), name
        assert_close(name, p.grad, r0["grads"][name], 1e-5, atol=1e-7)


def test_deepcopy_of_a_patched_model_runs_its_own_weights():
    """A copy of a patched model (TRL's ``create_reference_model`` deep-copies the policy) must run its own
    weights without GRPO targets: the patched forward used to call the original model's bound forward, so the
    copy's logits and ``generate`` came from the original model (logits off by 0.9 after scaling the copy)."""
    import copy
    from gxpo_kernels.integrations.hf import patch_causal_lm
    model = patch_causal_lm(_model("qwen2"))
    ids, am, cm, adv = _batch(seed=7)
    clone, plain = copy.deepcopy(model), _model("qwen2")
    with torch.no_grad():
        for a, b in zip(clone.parameters(), plain.parameters()):
            a.mul_(1.5)
            b.mul_(1.5)
        torch.testing.assert_close(clone(input_ids=ids, attention_mask=am).logits,
                                   plain(input_ids=ids, attention_mask=am).logits, rtol=0, atol=0)
        torch.testing.assert_close(clone(ids, am).logits, plain(ids, am).logits, rtol=0, atol=0)
        torch.testing.assert_close(clone.generate(ids[:1], attention_mask=am[:1], max_new_tokens=3, do_sample=False),
                                   plain.generate(ids[:1], attention_mask=am[:1], max_new_tokens=3, do_sample=False))
        K = cm.shape[1]
        got = clone(ids, am, advantages=adv, completion_mask=cm, logits_to_keep=K, old_logprobs=-torch.ones(cm.shape))
        want, _ = causal_lm_grpo_loss(plain, ids, am, adv, completion_mask=cm, logits_to_keep=K,
                                      old_logprobs=-torch.ones(cm.shape))
        assert got.loss == want


def test_deepspeed_module_logits_path_runs_the_head_on_the_scored_positions():
    """``CausalLMGRPOLoss(fused_linear=False)`` asks the model for the logits of the K + 1 positions that score the
    completion (``logits_to_keep``), not (B, L, V): the whole sequence's logits used to be built and, through
    the sliced view the loss saved, kept alive until backward. Loss and gradients equal the fused path's."""
    from gxpo_kernels.integrations.deepspeed import CausalLMGRPOLoss
    model = _model("llama")
    ids, am, cm, adv = _batch(seed=3)
    K = cm.shape[1]
    old = -torch.rand(cm.shape) - 4
    shapes = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    loss = CausalLMGRPOLoss(model, fused_linear=False, backend="torch")(ids, am, adv, cm, K, old)
    hook.remove()
    assert shapes == [(ids.shape[0], K + 1, V)]
    grads = torch.autograd.grad(loss, list(model.parameters()))
    want, _ = causal_lm_grpo_loss(model, ids, am, adv, completion_mask=cm, logits_to_keep=K, old_logprobs=old,
                                  backend="torch")
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(grads, torch.autograd.grad(want, list(model.parameters()))):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("keep", [3.7, torch.tensor([2, 5]), torch.tensor([5]), torch.tensor(5.0)])
def test_logits_to_keep_must_be_a_count(keep):
    """transformers reads a tensor ``logits_to_keep`` as the positions to keep; the GRPO loss takes a count.
    A 1-element index tensor used to be read as a count (``[5]``: the last 5 tokens instead of position 5), a float
    was truncated, and a longer tensor failed with torch's "only one element tensors" message."""
    model = _model("qwen2")
    ids, am, _, adv = _batch()
    from gxpo_kernels.integrations.deepspeed import CausalLMGRPOLoss
    for loss in (functools.partial(causal_lm_grpo_loss, model), CausalLMGRPOLoss(model, fused_linear=False)):
        with pytest.raises(ValueError, match="logits_to_keep"):
            loss(ids, am, adv, logits_to_keep=keep)
    assert causal_lm_grpo_loss(model, ids, am, adv, logits_to_keep=torch.tensor(5))[0].isfinite()  # a 0-d count


def _tiny(name):
    T = transformers
    return {
        "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(vocab_size=V, d_model=32, d_ff=64, num_layers=1,
                                                              num_heads=2, d_kv=16)),
        "bart": lambda: T.BartForConditionalGeneration(T.BartConfig(
            vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64)),
        "bert": lambda: T.BertLMHeadModel(T.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=64, is_decoder=True)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2)),
        "opt": lambda: T.OPTForCausalLM(T.OPTConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=16)),
        # embedding_size == hidden_size: the head's shape fits the decoder's output, so nothing failed
        "electra": lambda: T.ElectraForCausalLM(T.ElectraConfig(
            vocab_size=V, embedding_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, is_decoder=True)),
        "prophetnet": lambda: T.ProphetNetForCausalLM(T.ProphetNetConfig(
            vocab_size=V, hidden_size=32, num_encoder_layers=1, num_decoder_layers=1, num_encoder_attention_heads=2,
            num_decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64)),
    }[name]().float().eval()


@pytest.mark.parametrize("name,why", [("t5", "encoder-decoder"), ("bart", "encoder-decoder"),
                                      ("bert", "cls.predictions.decoder"), ("electra", "generator_predictions"),
                                      ("prophetnet", "n-gram predicting stream")])
def test_models_whose_head_does_not_read_the_decoder_output_are_refused(name, why):
    """An encoder-decoder model's decoder alone (T5, BART) and a head nested after a transform (BERT's
    ``cls.predictions``: dense + activation + LayerNorm before the vocabulary Linear) used to run silently, with
    log-probs off from the model's own by 21, 2.2 and 5.0 nats on these tiny random models. So did Electra (its
    ``generator_predictions`` dense + LayerNorm before ``generator_lm_head``, a direct child) and ProphetNet (its
    head reads the n-gram predicting stream); the last two are checked against the model's own logits here."""
    from gxpo_kernels.integrations.hf import logit_rescaling, patch_causal_lm
    torch.manual_seed(0)
    model = _tiny(name)
    ids = torch.randint(3, V, (2, 9))
    assert why in logit_rescaling(model)
    with pytest.raises(NotImplementedError, match=why):
        causal_lm_token_logprobs(model, ids, None, logits_to_keep=8)
    with pytest.raises(NotImplementedError, match=why):
        patch_causal_lm(model)
    assert not hasattr(model, "_gxpo_patched")
    if name in ("electra", "prophetnet"):   # what the fused head would have computed is not the model's logits
        from gxpo_kernels.integrations.hf import _decoder
        with torch.no_grad():
            hidden = _decoder(model)(input_ids=ids, use_cache=False)[0][:, :-1]
            head = model.get_output_embeddings()
            fused = token_logprobs_ref(torch.nn.functional.linear(hidden, head.weight, head.bias), ids[:, 1:])[0]
            want = token_logprobs_ref(model(input_ids=ids, use_cache=False).logits[:, :-1], ids[:, 1:])[0]
        assert (fused - want).abs().max() > 0.1


@pytest.mark.parametrize("name", ["gpt2", "opt"])
def test_other_decoder_only_heads_match_the_models_logits(name):
    """GPT-2 (``transformer``) and OPT (a projection inside the decoder) run and match their own logits."""
    torch.manual_seed(0)
    model = _tiny(name)
    ids = torch.randint(3, V, (2, 9))
    lp, _ = causal_lm_token_logprobs(model, ids, None, logits_to_keep=8, backend="torch")
    with torch.no_grad():
        want = token_logprobs_ref(model(input_ids=ids).logits[:, :-1], ids[:, 1:])[0]
    assert_close("logp", want, lp, 1e-5)


def test_unpatch_causal_lm_restores_the_previous_forward():
    """``unpatch_causal_lm`` puts back the forward the model had before the patch: the class's forward (no
    instance attribute left behind), or an instance-level forward installed earlier; a deep copy unpatches on
    its own; an unpatched model, and a model whose forward was wrapped after the patch, are refused."""
    import copy
    import types
    from gxpo_kernels.integrations.hf import GRPOLossOutput, patch_causal_lm, unpatch_causal_lm
    model = _model("qwen2")
    ids, am, cm, adv = _batch(seed=8)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=am).logits
    with pytest.raises(ValueError, match="not patched"):
        unpatch_causal_lm(model)
    patch_causal_lm(model, temperature=0.7)
    clone = copy.deepcopy(model)
    assert unpatch_causal_lm(model) is model
    assert "forward" not in model.__dict__ and not hasattr(model, "_gxpo_patched")
    with torch.no_grad():                                # GRPO targets no longer reach the fused loss
        assert not isinstance(model(ids, am, advantages=adv), GRPOLossOutput)
        torch.testing.assert_close(model(input_ids=ids, attention_mask=am).logits, want, rtol=0, atol=0)
    K = cm.shape[1]
    assert clone(ids, am, advantages=adv, completion_mask=cm, logits_to_keep=K).loss.isfinite()  # still patched
    unpatch_causal_lm(clone)
    assert "forward" not in clone.__dict__

    calls = []                                           # an instance-level forward from before the patch
    own = type(model).forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return own(self, *args, **kwargs)
    model.forward = types.MethodType(counting, model)
    patch_causal_lm(model)
    unpatch_causal_lm(model)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am)
    assert model.forward.__func__ is counting and calls == [1]

    patch_causal_lm(model)                               # wrapped after the patch (accelerate's prepare does this)
    patched = model.forward
    model.forward = types.MethodType(functools.wraps(patched.__func__)(lambda self, *a, **k: patched(*a, **k)), model)
    with pytest.raises(ValueError, match="replaced after patch_causal_lm"):
        unpatch_causal_lm(model)
    assert model._gxpo_patched                           # refused without changing anything


def test_unpatch_after_another_library_replaced_the_class_forward(monkeypatch):
    """Another library may replace the model class's forward after the patch (Liger's ``apply_liger_kernel_to_*``
    does): ``unpatch_causal_lm`` recognised its own forward by comparing it with the class's current forward,
    and refused ("replaced after patch_causal_lm") a forward it had installed itself. It unpatches; the model
    then runs the class's (new) forward. A second model of the class stays patched."""
    from gxpo_kernels.integrations.hf import GRPOLossOutput, patch_causal_lm, unpatch_causal_lm
    model, other = _model("qwen2"), _model("qwen2")
    ids, am, cm, adv = _batch(seed=9)
    patch_causal_lm(model)
    patch_causal_lm(other)
    cls = type(model)
    calls = []
    old = cls.forward

    def replaced(self, *args, **kwargs):
        calls.append(1)
        return old(self, *args, **kwargs)
    monkeypatch.setattr(cls, "forward", replaced)
    unpatch_causal_lm(model)
    assert "forward" not in model.__dict__ and not hasattr(model, "_gxpo_forward_fn")
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am)
    assert calls == [1]
    assert isinstance(other(ids, am, advantages=adv, completion_mask=cm, logits_to_keep=cm.shape[1]), GRPOLossOutput)
    with pytest.raises(ValueError, match="not patched"):
        unpatch_causal_lm(model)                         # unpatching twice is refused
    unpatch_causal_lm(other)


def test_head_run_as_its_modules_forward_keeps_an_instance_forward():
    """A ZeRO-3 head runs the loss as ``lm_head.forward`` for one call; an instance-level forward the head had
    (accelerate's hooks install one) was deleted afterwards instead of put back."""
    import types
    model = _model("qwen2")
    ids, am, cm, adv = _batch(seed=4)
    head = model.lm_head
    calls = []

    def hooked(self, x):
        calls.append(1)
        return torch.nn.functional.linear(x, self.weight, self.bias)
    head.forward = types.MethodType(hooked, head)
    own = head.forward
    head.weight.ds_id = 0
    try:
        loss, _ = causal_lm_grpo_loss(model, ids, am, adv, completion_mask=cm, logits_to_keep=cm.shape[1],
                                      backend="torch")
    finally:
        del head.weight.ds_id
    assert loss.isfinite() and calls == []                # the loss ran in its place for that call
    assert head.__dict__.get("forward") is own
    head(torch.zeros(1, 64))
    assert calls == [1]
