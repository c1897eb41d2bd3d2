"""``patch_causal_lm`` under the transformers features users combine it with: gradient checkpointing (reentrant
and not), attention dropout in train mode, tied embeddings after ``resize_token_embeddings`` and ``unpatch``,
left-padded batches with position ids, ``model.to(bfloat16)`` after the patch, ``torch.compile``, a PEFT LoRA
model, and ``generate``. Each case compares the loss and every parameter's gradient with an unpatched model of
the same weights running its own logits through the float64 ``grpo_loss_ref``, or checks a clear refusal."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from gxpo_kernels.integrations.hf import patch_causal_lm, unpatch_causal_lm  # noqa: E402
from gxpo_kernels.ops.grpo.reference import grpo_loss_ref  # noqa: E402

V = 389  # prime: no power-of-two tiling of the vocabulary


def _model(family="qwen2", tied=False, dtype=torch.float32, **extra):
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=48, tie_word_embeddings=tied, **extra)
    cfg = (transformers.Qwen2Config if family == "qwen2" else transformers.LlamaConfig)(**cfg)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").to(dtype)


def _batch(B=3, P=5, K=6, seed=1):
    """Left-padded prompts, right-padded completions; old log-probs away from the policy's so the ratio binds."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, P + K), generator=g)
    am = torch.ones(B, P + K, dtype=torch.long)
    am[0, :3] = 0
    am[2, :1] = 0
    ids[am == 0] = 0
    cm = am[:, P:].clone()
    cm[1, K - 2:] = 0
    adv = torch.randn(B, generator=g)
    old = -torch.log(torch.tensor(float(V))) + 0.3 * torch.randn(B, K, generator=g)
    return ids, am, cm, adv, old


def _grads(model):
    # torch.compile's wrapper prefixes the names with "_orig_mod."
    return {n.replace("_orig_mod.", ""): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _reference(model, ids, am, cm, adv, old, seed=5, **kw):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)           # the same dropout masks as the fused call below
    K = cm.shape[1]
    logits = model(input_ids=ids, attention_mask=am, use_cache=False, **kw).logits[:, -K - 1:-1]
    loss, _ = grpo_loss_ref(logits.double(), ids[:, -K:], adv, cm.bool(), old)
    loss.backward()
    return loss.detach(), _grads(model)


def _fused(model, ids, am, cm, adv, old, seed=5, **kw):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(input_ids=ids, attention_mask=am, advantages=adv, completion_mask=cm, logits_to_keep=cm.shape[1],
                old_logprobs=old, grpo_options=dict(backend="torch"), **kw)
    out.loss.backward()
    return out.loss.detach(), _grads(model)


def _assert_same(got, want, rtol=1e-4, atol=1e-6):
    torch.testing.assert_close(got[0].double(), want[0].double(), rtol=rtol, atol=atol)
    assert got[1].keys() == want[1].keys() and len(want[1]) > 0
    for name, g in want[1].items():
        assert g.abs().max() > 0, name        # every parameter takes part: the comparison can fail
        torch.testing.assert_close(got[1][name].float(), g.float(), rtol=rtol, atol=atol, msg=lambda s: f"{name}: {s}")


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("reentrant", [True, False, None])
def test_gradient_checkpointing(family, reentrant):
    """``gradient_checkpointing_enable`` (use_reentrant True / False / transformers' default) on the patched model:
    the fused loss's gradients equal the plain model's without checkpointing; the patched model's own logits path
    (a call without ``advantages``) still checkpoints."""
    batch = _batch()
    want = _reference(_model(family).train(), *batch)
    model = _model(family).train()
    kw = None if reentrant is None else {"use_reentrant": reentrant}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    patch_causal_lm(model)
    assert model.is_gradient_checkpointing
    _assert_same(_fused(model, *batch), want)
    _assert_same(_reference(model, *batch), want)


def test_attention_dropout_in_train_mode():
    """Dropout > 0 in train mode: the fused path runs the same decoder call as the logits path, so with the same
    seed it draws the same dropout masks (with and without checkpointing, which replays the RNG state); in eval
    mode dropout is off and the results match without a seed."""
    batch = _batch(seed=2)
    want = _reference(_model(attention_dropout=0.3).train(), *batch)
    model = patch_causal_lm(_model(attention_dropout=0.3).train())
    _assert_same(_fused(model, *batch), want)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _assert_same(_fused(model, *batch), want)
    other = _reference(_model(attention_dropout=0.3).train(), *batch, seed=6)   # the masks really differ
    assert not torch.allclose(other[1]["model.embed_tokens.weight"], want[1]["model.embed_tokens.weight"])
    model.eval()
    _assert_same(_fused(model, *batch, seed=7), _reference(_model(attention_dropout=0.3).eval(), *batch, seed=8))


def test_tied_embeddings_after_resize_and_unpatch():
    """Tied lm_head: its gradient sums the head's and the embedding's use; after ``resize_token_embeddings`` (grown,
    then shrunk to a multiple of 8) the patch reads the new tied weight; ``unpatch`` leaves the tie in place."""
    batch = _batch(seed=3)
    plain, model = _model(tied=True), patch_causal_lm(_model(tied=True))
    _assert_same(_fused(model, *batch), _reference(plain, *batch))
    for new_size, multiple in ((V + 13, None), (V - 9, 8)):
        for m in (plain, model):
            torch.manual_seed(1)          # the same initialisation of the added rows
            m.resize_token_embeddings(new_size, pad_to_multiple_of=multiple, mean_resizing=False)
        assert model.lm_head.weight is model.get_input_embeddings().weight
        assert model.lm_head.weight.shape[0] == (new_size if multiple is None else -(-new_size // 8) * 8)
        ids = batch[0] % (V - 9)
        _assert_same(_fused(model, ids, *batch[1:]), _reference(plain, ids, *batch[1:]))
    unpatch_causal_lm(model)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    _assert_same(_reference(model, ids, *batch[1:]), _reference(plain, ids, *batch[1:]))


def _accumulated(model, batches, fused, **opts):
    """Gradient accumulation as a trainer does it: .grad starts at 0.25 (a previous step's leftover that must be
    added to), each micro-batch's loss is scaled by 1 / len(batches) and backpropagated on its own."""
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    total = 0
    for ids, am, cm, adv, old in batches:
        K = cm.shape[1]
        if fused:
            loss = model(input_ids=ids, attention_mask=am, advantages=adv, completion_mask=cm, logits_to_keep=K,
                         old_logprobs=old, grpo_options=opts).loss
        else:
            logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits[:, -K - 1:-1]
            loss, _ = grpo_loss_ref(logits.double(), ids[:, -K:], adv, cm.bool(), old)
        (loss / len(batches)).backward()
        total = total + loss.detach() / len(batches)
    return total, {n: g - 0.25 for n, g in _grads(model).items()}


@pytest.mark.parametrize("grad_in_forward", [False, True])
@pytest.mark.parametrize("backend, reentrant", [("torch", None), ("torch", True), ("torch", False),
                                                ("triton", True), ("triton", False)])
def test_tied_head_gradient_accumulation(backend, reentrant, grad_in_forward):
    """Tied Qwen2 (the lm_head weight is the input embedding, as in Qwen2-0.5B): three micro-batches of different
    prompt / completion lengths accumulated into a non-zero .grad, with ``grad_in_forward`` off and on and with
    gradient checkpointing (reentrant or not) or without: every parameter's gradient, the tied one summing both
    uses, equals the logits path's, and nothing written during forward is counted twice by a recomputation."""
    batches = [_batch(B=3, P=4, K=5, seed=1), _batch(B=3, P=6, K=3, seed=2), _batch(B=4, P=3, K=7, seed=3)]
    want = _accumulated(_model(tied=True).train(), batches, fused=False)
    model = _model(tied=True).train()
    if reentrant is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    patch_causal_lm(model)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    _assert_same(_accumulated(model, batches, fused=True, backend=backend, grad_in_forward=grad_in_forward), want)


def test_left_padding_with_position_ids():
    """Generation-style batches: left padding, position ids counted from the first real token (as ``generate``
    makes them; RoPE sees only their differences, so these give the default's numbers) and stretched ones (which
    do not); pads are outside the completion mask and the loss matches the logits path for each."""
    ids, am, cm, adv, old = _batch(B=4, seed=4)
    pos = (am.cumsum(1) - 1).clamp_min(0)
    wants = []
    for position_ids in (pos, 2 * pos):
        want = _reference(_model("llama"), ids, am, cm, adv, old, position_ids=position_ids)
        got = _fused(patch_causal_lm(_model("llama")), ids, am, cm, adv, old, position_ids=position_ids)
        _assert_same(got, want)
        wants.append(want[1]["lm_head.weight"])
    assert not torch.allclose(*wants)     # the position ids reach the decoder: the check above can fail


@pytest.mark.parametrize("extra", [dict(use_cache=False), dict(use_cache=True),
                                   dict(output_hidden_states=True, return_dict=False)])
def test_logits_path_keywords_accepted(extra):
    """Keywords a logits-path call carries over (TRL's and this package's logits calls pass ``use_cache=False``):
    ``use_cache`` used to fail with "got multiple values for keyword argument 'use_cache'"; now no cache is kept
    for the loss whatever it says, and the numbers are the plain model's."""
    batch = _batch(seed=10)
    _assert_same(_fused(patch_causal_lm(_model()), *batch, **extra), _reference(_model(), *batch))


def test_logits_to_keep_forms():
    """An int count and a 0-d tensor count run the fused loss; transformers' 1-D index tensor is refused by the
    loss (ValueError) and handed to the model unchanged on a plain call (its logits are the reference's)."""
    ids, am, cm, adv, old = _batch(seed=5)
    K = cm.shape[1]
    plain, model = _model(), patch_causal_lm(_model())
    want = _reference(plain, ids, am, cm, adv, old)
    for keep in (K, torch.tensor(K)):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=am, advantages=adv, completion_mask=cm, logits_to_keep=keep,
                    old_logprobs=old, grpo_options=dict(backend="torch"))
        out.loss.backward()
        _assert_same((out.loss.detach(), _grads(model)), want)
    index = torch.arange(ids.shape[1] - K - 1, ids.shape[1] - 1)
    with pytest.raises(ValueError, match="index tensors are not supported"):
        model(input_ids=ids, attention_mask=am, advantages=adv, completion_mask=cm, logits_to_keep=index)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=am, logits_to_keep=index).logits,
                                   plain(input_ids=ids, attention_mask=am).logits[:, index])


def test_bf16_after_patching():
    """``model.to(torch.bfloat16)`` after the patch: the fused loss runs the bf16 weights (gradients bf16, within
    bf16 rounding of a bf16 model's logits path)."""
    batch = _batch(seed=6)
    model = patch_causal_lm(_model())
    model.to(torch.bfloat16)
    got = _fused(model, *batch)
    assert all(g.dtype == torch.bfloat16 for g in got[1].values())
    _assert_same(got, _reference(_model().to(torch.bfloat16), *batch), rtol=5e-2, atol=2e-3)


@pytest.mark.parametrize("how", ["wrap", "in_place"])
def test_torch_compile_after_patching(how):
    """``torch.compile(patched)`` and ``patched.compile()`` run the patched forward: same numbers as the plain
    model (``aot_eager``: dynamo and AOTAutograd without a C++ compiler). Patching the compiled wrapper itself is
    refused with a TypeError that says what to do (it used to fail with a misleading 'follows another
    transform'); its ``_orig_mod`` can be patched."""
    batch = _batch(seed=7)
    want = _reference(_model(), *batch)
    model = patch_causal_lm(_model())
    if how == "wrap":
        compiled = torch.compile(model, backend="aot_eager")
    else:
        compiled = model
        model.compile(backend="aot_eager")
    _assert_same(_fused(compiled, *batch), want)
    wrapper = torch.compile(_model(), backend="aot_eager")
    compiled_forward = wrapper.__dict__.get("forward")      # the wrapper's own (dynamo's) forward
    for fn in (patch_causal_lm, unpatch_causal_lm):
        with pytest.raises(TypeError, match=r"torch\.compile.*_orig_mod"):
            fn(wrapper)
    assert wrapper.__dict__.get("forward") is compiled_forward and "_gxpo_patched" not in wrapper.__dict__
    assert not hasattr(wrapper._orig_mod, "_gxpo_patched")
    patch_causal_lm(wrapper._orig_mod)
    _assert_same(_fused(wrapper, *batch), want)


def test_head_subclass_with_own_forward_refused():
    """An ``nn.Linear`` subclass whose forward changes the logits (here: halves them; quantized heads are the same
    case) used to pass the head check and give silently wrong gradients (lm_head's off by 100%); refused now."""
    class HalfLinear(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 0.5

    model = _model()
    head = HalfLinear(32, V, bias=False)
    head.weight = model.lm_head.weight
    model.lm_head = head
    with pytest.raises(TypeError, match="HalfLinear.*own forward"):
        patch_causal_lm(model)
    assert not hasattr(model, "_gxpo_patched") and "forward" not in model.__dict__


def test_peft_lora_base_model():
    """PEFT: patch ``peft_model.get_base_model()``, call the PEFT model with the GRPO targets; the LoRA adapters'
    gradients equal the plain PEFT model's (with reentrant checkpointing too). Adapters on lm_head (LoRA, or a
    trainable copy through ``modules_to_save``) are refused."""
    peft = pytest.importorskip("peft")

    def lora(targets=("q_proj", "v_proj", "up_proj")):
        model = _model()
        torch.manual_seed(3)
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False)
        return peft.get_peft_model(model, cfg).train()

    batch = _batch(seed=8)
    plain, model = lora(), lora()
    patch_causal_lm(model.get_base_model())
    with pytest.raises(TypeError, match="get_base_model"):
        patch_causal_lm(model)
    want = _reference(plain, *batch)
    assert all("lora_" in n for n in want[1])
    _assert_same(_fused(model, *batch), want)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    _assert_same(_fused(model, *batch), want)
    with pytest.raises(TypeError, match="lora.*not supported"):
        patch_causal_lm(lora(("q_proj", "lm_head")).get_base_model())
    saved = peft.get_peft_model(_model(), peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(TypeError, match="ModulesToSaveWrapper.*not supported"):
        patch_causal_lm(saved.get_base_model())


def test_generate_unaffected():
    """Greedy ``generate`` on a left-padded batch gives the unpatched model's tokens, also in train mode with
    checkpointing enabled (transformers then turns the cache off) and after ``unpatch``."""
    ids, am = _batch(B=4, K=1, seed=9)[:2]
    plain, model = _model().eval(), patch_causal_lm(_model().eval())
    kw = dict(attention_mask=am, max_new_tokens=7, do_sample=False, pad_token_id=0)
    want = plain.generate(ids, **kw)
    assert want.shape[1] == ids.shape[1] + 7
    torch.testing.assert_close(model.generate(ids, **kw), want, rtol=0, atol=0)
    model.gradient_checkpointing_enable()
    model.train()
    torch.testing.assert_close(model.generate(ids, **kw), want, rtol=0, atol=0)
    unpatch_causal_lm(model.eval())
    torch.testing.assert_close(model.generate(ids, **kw), want, rtol=0, atol=0)
