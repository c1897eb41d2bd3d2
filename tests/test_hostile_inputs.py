"""Hostile and unusual inputs to the public API, outside the loss-option fuzzer (tests/ops/test_fuzz_options.py).

Every case gets either the float64 reference's numbers or an error that names the argument and what to do:
empty and degenerate shapes (B = 0, T = 0, V = 1, every position masked), ids at the vocabulary's edges and
outside it (Hugging Face's ignore_index -100), strided / transposed / stride-0 layouts, int32 ids, fp16 logits,
inputs without requires_grad, a second derivative, numpy integers for ``chunk_size``, bool / complex tensors
for KTO's ``kl``, and CLI options that a run cannot use. Small sizes: the whole file runs in seconds under
TRITON_INTERPRET=1.
"""
import contextlib
import io

import numpy as np
import pytest
import torch

from gxpo_kernels import (FPALogProbs, LinearGRPOLoss, fpa_kto_loss, fpa_logprobs, grpo_loss, linear_fpa_logprobs,
                          linear_grpo_loss, linear_token_logprobs, token_logprobs)

BACKENDS = ["torch", "triton"]
V, H = 11, 6


def _reference(logits, tokens, mask, temperature):
    """float64 (logp, entropy), 0 at masked positions (differentiable in ``logits``)."""
    logp_all = torch.log_softmax(logits.double() / temperature, -1)
    p = logp_all.exp()
    ids = torch.where(mask, tokens.long(), 0)
    logp = torch.where(mask, logp_all.gather(-1, ids[..., None])[..., 0], 0.0)
    ent = torch.where(mask, -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1), 0.0)
    return logp, ent


def _case(name, g):
    """(logits, tokens, mask) of one awkward case; logits may be a view with odd strides."""
    B, T = 3, 4
    rand = lambda *s: torch.randn(*s, generator=g)                               # noqa: E731
    ids = lambda hi, *s: torch.randint(0, hi, s, generator=g)                   # noqa: E731
    full = torch.ones(B, T, dtype=torch.bool)
    return {
        "B=0": lambda: (rand(0, T, V), ids(V, 0, T), torch.ones(0, T, dtype=torch.bool)),
        "T=0": lambda: (rand(B, 0, V), ids(V, B, 0), torch.ones(B, 0, dtype=torch.bool)),
        "V=1": lambda: (rand(B, T, 1), ids(1, B, T), full),
        "V=2": lambda: (rand(B, T, 2), ids(2, B, T), full),
        "ids V-1": lambda: (rand(B, T, V), torch.full((B, T), V - 1), full),
        "all masked, -100 ids": lambda: (rand(B, T, V), torch.full((B, T), -100), torch.zeros(B, T, dtype=torch.bool)),
        "HF padding masked": lambda: (rand(B, T, V), torch.tensor([[1, 2, -100, -100]] * B),
                                      torch.tensor([[1, 1, 0, 0]] * B, dtype=torch.bool)),
        "transposed (B, V, T)": lambda: (rand(B, V, T).transpose(1, 2), ids(V, B, T), full),
        "vocab stride 2": lambda: (rand(B, T, 2 * V)[..., ::2], ids(V, B, T), full),
        "stride-0 rows": lambda: (rand(1, 1, V).expand(B, T, V), ids(V, B, T), full),
        "stride-0 ids, int32": lambda: (rand(B, T, V), ids(V, 1, T).int().expand(B, T), full),
        "fp16": lambda: (rand(B, T, V).half(), ids(V, B, T), full),
        "int8 0/1 mask, transposed": lambda: (rand(B, T, V), ids(V, B, T), (torch.rand(T, B, generator=g) > .4)
                                              .to(torch.int8).t()),
    }[name]()


CASES = ["B=0", "T=0", "V=1", "V=2", "ids V-1", "all masked, -100 ids", "HF padding masked", "transposed (B, V, T)",
         "vocab stride 2", "stride-0 rows", "stride-0 ids, int32", "fp16", "int8 0/1 mask, transposed"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CASES)
def test_token_logprobs_edge_cases_match_float64(name, backend):
    """Values and d(logits) of every awkward case against float64 (at temperature 0.7); the same logits
    without requires_grad give the same values."""
    g = torch.Generator().manual_seed(CASES.index(name))
    logits, tokens, mask = _case(name, g)
    temperature = 0.7
    x = logits.detach().requires_grad_()
    lp, ent = token_logprobs(x, tokens, temperature, mask=mask, backend=backend)
    ref_lp, ref_ent = _reference(x.detach(), tokens, mask.bool(), temperature)
    assert lp.shape == ent.shape == tokens.shape and lp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(lp.double(), ref_lp, rtol=0, atol=2e-6)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=0, atol=2e-6)
    up_lp, up_ent = torch.randn(lp.shape, generator=g), torch.randn(lp.shape, generator=g)
    ((lp * up_lp).sum() + (ent * up_ent).sum()).backward()
    xd = logits.detach().double().requires_grad_()
    r_lp, r_ent = _reference(xd, tokens, mask.bool(), temperature)
    ((r_lp * up_lp.double()).sum() + (r_ent * up_ent.double()).sum()).backward()
    tol = 2e-3 if logits.dtype == torch.float16 else 2e-6   # d(logits) is written in the logits' dtype
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=tol, atol=tol)
    lp2, ent2 = token_logprobs(logits.detach(), tokens, temperature, mask=mask, backend=backend)
    assert not lp2.requires_grad and torch.equal(lp2, lp.detach()) and torch.equal(ent2, ent.detach())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["B=0", "T=0", "V=1", "all masked, -100 ids", "HF padding masked", "stride-0 rows"])
def test_grpo_loss_edge_cases_match_float64(name, backend):
    """grpo_loss on the same cases: on-policy, the loss is -mean(A) over the unmasked tokens and d(logits) is
    -A d(logp) / n (0 and no NaN when nothing is unmasked)."""
    g = torch.Generator().manual_seed(CASES.index(name))
    logits, tokens, mask = _case(name, g)
    adv = torch.randn(logits.shape[0], generator=g)
    x = logits.detach().requires_grad_()
    loss, metrics = grpo_loss(x, tokens, adv, mask, backend=backend, validate="full")
    loss.backward()
    m = mask.bool()
    n = int(m.sum())
    a = adv.double()[:, None].expand(m.shape)
    assert float(loss.detach()) == pytest.approx(float(-(a * m).sum() / max(n, 1)), abs=1e-6)
    assert all(torch.isfinite(v) for v in metrics.values())
    xd = logits.detach().double().requires_grad_()
    r_lp, _ = _reference(xd, tokens, m, 1.0)
    (-(a * r_lp).sum() / max(n, 1)).backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=2e-6, atol=2e-6)


def _id_ops(backend):
    """Every op that reads token ids, called with ``tokens`` (and ``mask``) on fresh small inputs."""
    g = torch.Generator().manual_seed(1)
    logits, ref, h, w = (torch.randn(2, 3, V, generator=g), torch.randn(2, 3, V, generator=g),
                         torch.randn(2, 3, H, generator=g), torch.randn(V, H, generator=g))
    adv = torch.randn(2, generator=g)
    return {
        "token_logprobs": lambda t, m: token_logprobs(logits, t, mask=m, backend=backend)[0],
        "grpo_loss": lambda t, m: grpo_loss(logits, t, adv, m, validate="full", backend=backend)[0],
        "linear_token_logprobs": lambda t, m: linear_token_logprobs(h, w, t, mask=m, backend=backend)[0],
        "linear_grpo_loss": lambda t, m: linear_grpo_loss(h, w, t, adv, m, validate="full", backend=backend)[0],
        "fpa_logprobs": lambda t, m: fpa_logprobs(logits, ref, t, mask=m, backend=backend)[0],
        "linear_fpa_logprobs": lambda t, m: linear_fpa_logprobs(h, w, h, w, t, mask=m, backend=backend)[0],
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_ids_error_says_how_to_ignore_hugging_face_padding(backend):
    """A Hugging Face user passes labels padded with ignore_index -100. The ops do not read -100 as "ignore"
    (the mask does that); the error said only "found ids in [-100, 4]" and now names the padding and the fix,
    which gives the masked ids' numbers. An id >= V is not padding: its error does not mention -100."""
    labels = torch.tensor([[1, 4, -100], [3, -100, -100]])
    for name, op in _id_ops(backend).items():
        with pytest.raises(ValueError, match=r"tokens must lie in \[0, 11\).*ignore_index -100.*mask=tokens != -100"):
            op(labels, None)
        with pytest.raises(ValueError, match=r"found ids in \[1, 11\]$"):
            op(torch.tensor([[1, 4, 11], [3, 2, 2]]), None)
        mask = labels != -100
        clean = torch.where(mask, labels, 0)
        torch.testing.assert_close(op(labels, mask), op(clean, mask), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_derivative_error_names_the_public_ops(backend):
    """The ops are differentiable once (docs/grpo-loss.md). A second derivative used to fail with PyTorch's
    message for our internal backward op: "no autograd formula was registered. Please use register_autograd to
    add one", which sends the user into the library's internals. It now names the public ops."""
    g = torch.Generator().manual_seed(2)
    tokens, adv = torch.randint(0, V, (2, 3), generator=g), torch.randn(2, generator=g)
    w, ref = torch.randn(V, H, generator=g), torch.randn(2, 3, V, generator=g)
    logits_ops = {
        "token_logprobs": lambda x: sum(o.sum() for o in token_logprobs(x * 1.0, tokens, backend=backend)),
        "grpo_loss": lambda x: grpo_loss(x * 1.0, tokens, adv, backend=backend)[0],
        "fpa_logprobs": lambda x: fpa_logprobs(x * 1.0, ref, tokens, backend=backend)[0].sum(),
    }
    head_ops = {
        "linear_token_logprobs": lambda h: sum(o.sum() for o in linear_token_logprobs(h, w, tokens, backend=backend)),
        "linear_grpo_loss": lambda h: linear_grpo_loss(h, w, tokens, adv, backend=backend)[0],
        "linear_fpa_logprobs": lambda h: linear_fpa_logprobs(h, w, h.detach(), w, tokens, backend=backend)[0].sum(),
    }
    for ops, shape in ((logits_ops, (2, 3, V)), (head_ops, (2, 3, H))):
        for name, f in ops.items():
            x = torch.randn(shape, generator=g, requires_grad=True)
            (grad,) = torch.autograd.grad(f(x), x, create_graph=True)
            with pytest.raises(RuntimeError, match=f"{name}.* are differentiable once") as e:
                grad.pow(2).sum().backward()
            assert "register_autograd" not in str(e.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_size_takes_any_positive_integer_type(backend):
    """chunk_size=np.int64(4) (e.g. computed with numpy) was refused as "must be a positive int", although every
    other integer option follows check_scalar's rule, numpy integers included. It now gives the numbers of 4; a
    bool (numpy's too) and 0 are still refused."""
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(2, 5, H, generator=g), torch.randn(V, H, generator=g)
    tokens, adv = torch.randint(0, V, (2, 5), generator=g), torch.randn(2, generator=g)
    want = linear_token_logprobs(h, w, tokens, chunk_size=4, backend=backend)
    for size in (np.int64(4), np.int32(4), torch.tensor(4).item()):
        got = linear_token_logprobs(h, w, tokens, chunk_size=size, backend=backend)
        assert all(torch.equal(a, b) for a, b in zip(want, got))
    loss = LinearGRPOLoss(chunk_size=np.int64(3), backend=backend)(h, w, tokens, adv)[0]
    assert torch.equal(loss, linear_grpo_loss(h, w, tokens, adv, chunk_size=3, backend=backend)[0])
    for bad in (np.bool_(True), True, 0, np.int64(-2), 2.0):
        with pytest.raises(ValueError, match="chunk_size"):
            linear_token_logprobs(h, w, tokens, chunk_size=bad, backend=backend)


def test_cli_warns_about_options_the_run_cannot_use(tmp_path, monkeypatch):
    """--pass_k / --pass1_n / --val_temperature with --pass1_size 0 (the sampled metrics off), and a --save_steps
    past the last step (no checkpoint is ever written), ran silently; each now gets the CLI's one-line warning
    naming the option, as the other options a run does not read do. A usable combination stays silent."""
    from gxpo_kernels import cli
    from gxpo_kernels.trainer import loop
    monkeypatch.setattr(loop, "train", lambda *a, **k: [])

    def warned(*argv):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            out = tmp_path / str(len(list(tmp_path.iterdir())))
            assert cli.main(["train", *argv, "--no_progress", "--out", str(out)]) == 0
        lines = err.getvalue().strip().splitlines()
        assert all(e.startswith("gxpo-kernels: warning: --") for e in lines), lines
        return sorted(e.split()[2] for e in lines)

    assert warned("--pass1_size", "0", "--pass_k", "2", "--pass1_n", "3", "--val_temperature", "0.5") == \
        ["--pass1_n", "--pass_k", "--val_temperature"]
    assert warned("--pass1_size", "4", "--pass_k", "2", "--pass1_n", "3", "--val_temperature", "0.5") == []
    assert warned("--steps", "10", "--save_steps", "11") == ["--save_steps"]
    assert warned("--steps", "10", "--save_steps", "10") == []
    assert warned("--steps", "10", "--save_steps", "0") == []


def test_kto_kl_tensor_follows_the_scalar_rule():
    """fpa_kto_loss(kl=...) refused True and complex numbers (check_scalar) but took a bool tensor as kl = 1.0 and
    a complex tensor with its imaginary part dropped (PyTorch's cast only warns). Both dtypes are now refused
    with the argument's name; a real one-element tensor of any float dtype still equals the number."""
    g = torch.Generator().manual_seed(4)
    batch = FPALogProbs(-torch.rand(3, 4, generator=g), -torch.rand(3, 4, generator=g), -torch.rand(3, 4, generator=g))
    desirable = torch.tensor([True, False, True])
    want = fpa_kto_loss(batch, desirable, kl=0.25)[0]
    for kl in (torch.tensor(0.25), torch.tensor([0.25], dtype=torch.float64), torch.tensor(0.25).half()):
        assert torch.equal(fpa_kto_loss(batch, desirable, kl=kl)[0], want)
    for kl in (torch.tensor(True), torch.tensor(1 + 1j), torch.tensor([0.25 + 0j])):
        with pytest.raises(TypeError, match="kl must be a real number"):
            fpa_kto_loss(batch, desirable, kl=kl)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unmasked_padding_id_makes_the_gradient_nan_too(backend):
    """docs/validation.md: with the default validate="cheap" an unmasked id outside [0, V) (here HF's -100 left
    in the tokens) makes "the loss (and its gradient)" NaN. The loss was NaN but the gradient finite: the bad
    position's NaN log-prob came from torch.where, whose backward gives it a zero gradient, so an optimizer step
    took the other tokens' gradient (divided by a count that includes the bad token) without a sign. Now the bad
    row's d(logits) / d(hidden) is NaN (every d(weight) entry reads every row), the other rows stay finite, for
    every aggregation, on- and off-policy, and for token_logprobs under torch.compile (its eager call raises)."""
    g = torch.Generator().manual_seed(5)
    tokens = torch.tensor([[1, 2, -100], [3, 4, 5]])
    bad = tokens == -100
    adv = torch.tensor([1.0, -1.0])
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        for old in (None, torch.full((2, 3), -2.0)):
            x = torch.randn(2, 3, V, generator=g, requires_grad=True)
            loss = grpo_loss(x, tokens, adv, old_logprobs=old, loss_agg_mode=agg, max_length=3, backend=backend)[0]
            loss.backward()
            assert torch.isnan(loss) and torch.isnan(x.grad[bad]).all() and torch.isfinite(x.grad[~bad]).all()
    h = torch.randn(2, 3, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    loss = linear_grpo_loss(h, w, tokens, adv, backend=backend)[0]
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(h.grad[bad]).all() and torch.isfinite(h.grad[~bad]).all()
    assert torch.isnan(w.grad).all()

    torch._dynamo.reset()
    logits = torch.randn(2, 3, V, generator=g, requires_grad=True)
    fn = torch.compile(lambda x: token_logprobs(x, tokens, backend=backend)[0], backend="aot_eager", dynamic=False)
    fn(logits).sum().backward()
    assert torch.isnan(logits.grad[bad]).all() and torch.isfinite(logits.grad[~bad]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_tensors_are_refused_by_name(backend):
    """Sparse logits failed inside the kernels' host code ("Cannot access storage of SparseTensorImpl" on the
    PyTorch path, "unsupported memory format option Contiguous" on the Triton path); every tensor argument
    checked by shape and dtype now names itself and the fix (to_dense)."""
    g = torch.Generator().manual_seed(6)
    logits, tokens = torch.randn(2, 3, V, generator=g), torch.randint(0, V, (2, 3), generator=g)
    h, w, adv = torch.randn(2, 3, H, generator=g), torch.randn(V, H, generator=g), torch.randn(2, generator=g)
    calls = {
        "logits": lambda: token_logprobs(logits.to_sparse(), tokens, backend=backend),
        "logits ": lambda: grpo_loss(logits.to_sparse(), tokens, adv, backend=backend),
        "ref_logits": lambda: fpa_logprobs(logits, logits.to_sparse(), tokens, backend=backend),
        "weight": lambda: linear_grpo_loss(h, w.to_sparse(), tokens, adv, backend=backend),
        "hidden": lambda: linear_token_logprobs(h.to_sparse(), w, tokens, backend=backend),
        "tokens": lambda: token_logprobs(logits, tokens.to_sparse(), backend=backend),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=rf"{name.strip()} must be a dense \(strided\) tensor.*to_dense"):
            call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_mask_is_refused_by_name(backend):
    """The mask of the log-prob ops (and of FPALogProbs) goes through normalize_mask, not check_tensor: a sparse
    mask still failed inside PyTorch ("Could not run 'aten::index.Tensor' with arguments from the 'SparseCPU'
    backend") after the other tensor arguments were refused by name."""
    from gxpo_kernels import fpa_simper_loss
    g = torch.Generator().manual_seed(6)
    logits, tokens = torch.randn(2, 3, V, generator=g), torch.randint(0, V, (2, 3), generator=g)
    h, w = torch.randn(2, 3, H, generator=g), torch.randn(V, H, generator=g)
    mask = torch.ones(2, 3, dtype=torch.bool).to_sparse()
    seq = FPALogProbs(-torch.rand(2, 3, generator=g), None, -torch.rand(2, 3, generator=g))
    calls = {
        "token_logprobs": lambda: token_logprobs(logits, tokens, mask=mask, backend=backend),
        "linear_token_logprobs": lambda: linear_token_logprobs(h, w, tokens, mask=mask, backend=backend),
        "fpa_logprobs": lambda: fpa_logprobs(logits, logits, tokens, mask=mask, backend=backend),
        "linear_fpa_logprobs": lambda: linear_fpa_logprobs(h, w, h, w, tokens, mask=mask, backend=backend),
        "FPALogProbs": lambda: fpa_simper_loss(seq._replace(mask=mask), seq),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=r"mask must be a dense \(strided\) tensor.*to_dense"):
            call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fpa_lam_beyond_1e6_is_refused_by_name(backend):
    """lam had no upper bound: (1 + lam) * logits overflowed fp32, so lam = 1e20 gave NaN fpa log-probs on the
    Triton path and values off by 3e13 on the PyTorch path, and lam = 1e300 an internal "value cannot be converted
    to type float without overflow". lam now follows one range, [0, 1e6], in both FPA ops and the CLI's
    --fpa_lam, as the temperature follows [1e-6, 1e6]; at the bound the values match float64 to fp32's
    lam * 6e-8 * |logits|."""
    from gxpo_kernels.ops.fpa.reference import fpa_logprobs_ref
    g = torch.Generator().manual_seed(7)
    logits, ref = torch.randn(2, 3, V, generator=g), torch.randn(2, 3, V, generator=g)
    tokens, h, w = torch.randint(0, V, (2, 3), generator=g), torch.randn(2, 3, H, generator=g), torch.randn(V, H)
    for lam in (1e6 * (1 + 1e-9), 1e20, 1e300):
        with pytest.raises(ValueError, match=r"lam must be in \[0, 1e6\]"):
            fpa_logprobs(logits, ref, tokens, lam=lam, backend=backend)
        with pytest.raises(ValueError, match=r"lam must be in \[0, 1e6\]"):
            linear_fpa_logprobs(h, w, h, w, tokens, lam=lam, backend=backend)
    got = fpa_logprobs(logits, ref, tokens, lam=1e6, backend=backend)[2]
    want = fpa_logprobs_ref(logits.double(), ref.double(), tokens, lam=1e6)[2]
    bound = 1e6 * 6e-8 * float(torch.cat([logits, ref]).abs().max()) * 2
    assert torch.isfinite(got).all() and float((got.double() - want).abs().max()) < bound


def test_cli_fpa_lam_range(tmp_path, monkeypatch):
    """--fpa_lam 1e20 is an error naming the option, exit 2 (it started a run with NaN fpa log-probs)."""
    from gxpo_kernels import cli
    from gxpo_kernels.trainer import loop
    monkeypatch.setattr(loop, "train", lambda *a, **k: [])
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        cli.main(["train", "--algo", "fpa_dpo", "--fpa_lam", "1e20", "--no_progress", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "fpa_lam must be in [0, 1e6], got 1e+20" in err.getvalue()


def test_fpa_beta_and_weights_beyond_1e6_are_refused_by_name():
    """beta = 1e39 or 1e300 gave a NaN loss (beta is inf in fp32, and inf * a zero margin is NaN); a KTO weight
    of 1e300 an internal "value cannot be converted to type float without overflow"; RPO's alpha = 1e300 a NaN
    loss when the NLL is 0. beta follows (0, 1e6] and the weights [0, 1e6] (as lam follows [0, 1e6]); the CLI's
    --fpa_beta / --fpa_rpo_alpha take the same rule. At the bound the loss is finite and matches float64."""
    from gxpo_kernels import fpa_dpo_loss, fpa_rpo_loss
    from gxpo_kernels.trainer.config import TrainConfig
    g = torch.Generator().manual_seed(3)
    lp = -torch.rand(3, 4, generator=g)
    mask = torch.ones(3, 4, dtype=torch.bool)
    same = FPALogProbs(lp, lp.clone(), lp.clone(), mask)     # zero margins: where inf * 0 made the NaN
    des = torch.tensor([True, False, True])
    for big in (1e6 * (1 + 1e-9), 1e39, 1e300):
        for call in (lambda: fpa_dpo_loss(same, same, beta=big), lambda: fpa_rpo_loss(same, same, beta=big),
                     lambda: fpa_kto_loss(same, des, beta=big)):
            with pytest.raises(ValueError, match=r"beta must be in \(0, 1e6\]"):
                call()
        for name in ("desirable_weight", "undesirable_weight"):
            with pytest.raises(ValueError, match=rf"{name} must be in \[0, 1e6\]"):
                fpa_kto_loss(same, des, **{name: big})
        with pytest.raises(ValueError, match=r"alpha must be in \[0, 1e6\]"):
            fpa_rpo_loss(same, same, alpha=big)
    w = FPALogProbs(-torch.rand(3, 4, generator=g), lp, -torch.rand(3, 4, generator=g), mask)
    loss = fpa_dpo_loss(w, same, beta=1e6)[0]
    u = 1e6 * ((w.logp.double().sum(1) - lp.double().sum(1)) - 0.0)
    assert torch.isfinite(loss) and float(loss) == pytest.approx(float(-torch.nn.functional.logsigmoid(u).mean()),
                                                                  rel=1e-6)
    assert torch.isfinite(fpa_kto_loss(same, des, beta=1e6, desirable_weight=1e6)[0])
    with pytest.raises(ValueError, match=r"fpa_beta must be in \(0, 1e6\]"):
        TrainConfig(algo="fpa_dpo", fpa_beta=1e300).validate()


BOOL_FLAG_CALLS = {
    "token_logprobs": lambda x, **f: token_logprobs(x.logits, x.tokens, **f),
    "grpo_loss": lambda x, **f: grpo_loss(x.logits, x.tokens, x.adv, **f),
    "GRPOLoss": lambda x, **f: __import__("gxpo_kernels").GRPOLoss(**f),
    "linear_grpo_loss": lambda x, **f: linear_grpo_loss(x.h, x.w, x.tokens, x.adv, **f),
    "LinearGRPOLoss": lambda x, **f: LinearGRPOLoss(**f),
    "linear_token_logprobs": lambda x, **f: linear_token_logprobs(x.h, x.w, x.tokens, **f),
    "linear_fpa_logprobs": lambda x, **f: linear_fpa_logprobs(x.h, x.w, x.h, x.w, x.tokens, **f),
    "GRPOLossOptions": lambda x, **f: __import__("gxpo_kernels").GRPOLossOptions(**f),
    "GXPO": lambda x, **f: __import__("gxpo_kernels").GXPO(x.opt(), **f),
    "SFPO": lambda x, **f: __import__("gxpo_kernels").SFPO(x.opt(), **f),
    "WindowGate": lambda x, **f: __import__("gxpo_kernels").WindowGate(**f),
    "GXPO.step": lambda x, **f: __import__("gxpo_kernels").GXPO(x.opt()).step(lambda: None, **f),
    # the integrations' flags, checked before a model / engine / process group is needed
    "CausalLMGRPOLoss": lambda x, **f: _integration("deepspeed").CausalLMGRPOLoss(torch.nn.Linear(2, 2), **f),
    "fsdp.save_checkpoint": lambda x, **f: _integration("fsdp").save_checkpoint("unused", None, None, None, **f),
    "fsdp.load_checkpoint": lambda x, **f: _integration("fsdp").load_checkpoint("unused", None, None, None, **f),
}
NO_VALID_CALL = ("GXPO.step", "fsdp.save_checkpoint", "fsdp.load_checkpoint")   # dummy closure / model
BOOL_FLAGS = {
    "token_logprobs": ("compute_entropy", "inplace_backward"),
    "grpo_loss": ("compute_entropy", "inplace_backward", "check_finite", "use_bias_correction_kl", "reduce"),
    "GRPOLoss": ("compute_entropy", "inplace_backward", "check_finite", "reduce"),
    "linear_grpo_loss": ("compute_entropy", "inplace_backward", "check_finite", "fp32_head", "deterministic",
                         "grad_in_forward"),
    "LinearGRPOLoss": ("compute_entropy", "check_finite", "fp32_head", "deterministic", "grad_in_forward"),
    "linear_token_logprobs": ("compute_entropy", "fp32_head", "deterministic", "check_finite"),
    "linear_fpa_logprobs": ("fp32_head", "deterministic"),
    "GRPOLossOptions": ("use_bias_correction_kl", "reduce"),
    "GXPO": ("transactional_state", "atomic", "optimizer_aware", "skip_corrective", "corrective_cosine",
             "gate_one_sided"),
    "SFPO": ("transactional_state", "atomic", "gate_one_sided"),
    "WindowGate": ("one_sided",),
    "GXPO.step": ("force_plain",),
    "CausalLMGRPOLoss": ("fused_linear",),
    "fsdp.save_checkpoint": ("buffers",),
    "fsdp.load_checkpoint": ("buffers",),
}


def _integration(name):
    import importlib
    return importlib.import_module(f"gxpo_kernels.integrations.{name}")


@pytest.mark.parametrize("op", sorted(BOOL_FLAGS))
def test_bool_flags_refuse_strings_and_ints_by_name(op):
    """compute_entropy="no" counted as True (any non-empty string is truthy), and so did "false" for fp32_head,
    skip_corrective, atomic ...: every public bool flag now takes True / False or a numpy bool only, one rule
    (gxpo_kernels._utils.check_bool), and refuses anything else, 0 and 1 included, with a TypeError naming it."""
    class X:
        g = torch.Generator().manual_seed(5)
        logits, tokens = torch.randn(2, 3, V, generator=g), torch.randint(0, V, (2, 3), generator=g)
        h, w, adv = torch.randn(2, 3, H, generator=g), torch.randn(V, H, generator=g), torch.randn(2, generator=g)

        @staticmethod
        def opt():
            return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)

    call = BOOL_FLAG_CALLS[op]
    for flag in BOOL_FLAGS[op]:
        for bad in ("no", "False", 0, 1, None, torch.tensor(True)):
            if bad is None and flag == "gate_one_sided":
                continue   # None: the gate's own default
            with pytest.raises(TypeError, match=rf"^{flag.removeprefix('gate_')} must be a bool \(True or False\)"):
                call(X, **{flag: bad})
    if op not in NO_VALID_CALL:
        call(X, **{BOOL_FLAGS[op][0]: np.bool_(False)})   # a numpy bool is a bool
