"""gxpo-kernels inside TRL's GRPOTrainer: loss parity with TRL's own ``_compute_loss`` (value, parameter
gradients and logged metrics) for every supported option, end-to-end training with the update rules, and
clear refusals of unsupported TRL options. Tiny Qwen2 built from a config, tokenizer built in memory."""
import copy
import math

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from gxpo_kernels.integrations import trl as gtrl  # noqa: E402
from tests._utils import count_plan_builds  # noqa: E402

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 +-=?."
VOCAB = 131  # not a power of two; ids >= len(CHARS) + 3 decode to nothing


def make_tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2}
    for c in CHARS:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    t = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    t.padding_side = "left"
    return t


def make_model(seed=0, tie=False):
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg)


def reward_distinct(completions, **kw):
    return [float(len(set(c))) / 4.0 for c in completions]


def make_trainer(tmp_path, cls=GRPOTrainer, model=None, trainer_kwargs=None, **cfg):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                max_completion_length=6, max_steps=2, report_to="none", logging_steps=1, use_cpu=True,
                learning_rate=1e-2, save_strategy="no", disable_tqdm=True, seed=0, bf16=False)
    base.update(cfg)
    ds = datasets.Dataset.from_dict({"prompt": ["ab", "cd", "ef ", "gh1"] * 4})
    model = model if model is not None else make_model()
    if base.get("beta", 0.0) != 0.0:  # TRL builds the reference model from the policy's path: save it
        model.save_pretrained(tmp_path / "model")
        model = str(tmp_path / "model")
    tr = cls(model=model, reward_funcs=reward_distinct,
             args=GRPOConfig(**base), train_dataset=ds, processing_class=make_tokenizer(),
             **(trainer_kwargs or {}))
    tr.current_gradient_accumulation_steps = tr.args.gradient_accumulation_steps  # set by the training loop
    return tr


def make_batch(trainer, B=6, P=4, T=7, seed=1, old_noise=0.3, ref_noise=0.2, tool_mask=False, adv2d=False):
    """A hand-made GRPO batch with ragged left-padded prompts and right-padded completions; old/ref
    log-probs perturbed from the policy's so the clip, delta and KL terms all bind somewhere."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, VOCAB, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    for i in range(B):
        pad = int(torch.randint(0, P - 1, (1,), generator=g))
        prompt_mask[i, :pad] = 0
        prompt_ids[i, :pad] = 0
    completion_ids = torch.randint(3, VOCAB, (B, T), generator=g)
    lengths = torch.tensor([T, 1, 3, T - 1, 5, 2][:B])
    completion_mask = (torch.arange(T)[None] < lengths[:, None]).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, 0)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask,
              "advantages": torch.randn((B, T) if adv2d else (B,), generator=g),
              "num_items_in_batch": completion_mask.sum() * 3}  # as if the generation batch were 3x larger
    if tool_mask:
        tm = torch.ones(B, T, dtype=torch.long)
        tm[0, 2:4] = 0
        inputs["tool_mask"] = tm
    with torch.no_grad():
        logp = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([prompt_mask, completion_mask], 1), T)[0]
    cm = completion_mask.bool()
    if old_noise is not None:
        inputs["old_per_token_logps"] = torch.where(cm, logp + old_noise * torch.randn(B, T, generator=g), 0.0)
    if ref_noise is not None and trainer.beta != 0.0:
        inputs["ref_per_token_logps"] = torch.where(cm, logp + ref_noise * torch.randn(B, T, generator=g), 0.0)
    return inputs


def loss_and_grads(trainer, fn, inputs):
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    loss = fn(trainer.model, copy.deepcopy(inputs))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, {k: list(v) for k, v in trainer._metrics["train"].items()}


def check_parity(trainer, inputs, path="auto", rtol=2e-4, atol=2e-6, backend="torch", enable=True):
    """Our hooked loss vs TRL's own ``_compute_loss`` on the same model and batch. ``backend="torch"`` by
    default: the Triton kernels run under the (slow) interpreter here, so only a few cases use them.
    ``enable=False``: the hook is already enabled."""
    trainer.model.train()
    ref = loss_and_grads(trainer, lambda m, x: GRPOTrainer._compute_loss(trainer, m, x), inputs)
    if enable:
        gtrl.enable_gxpo_loss(trainer, loss_path=path, backend=backend)
    ours = loss_and_grads(trainer, trainer._compute_loss, inputs)
    torch.testing.assert_close(ours[0], ref[0], rtol=rtol, atol=atol)
    assert ref[1].keys() == ours[1].keys() and len(ref[1]) > 0
    for name in ref[1]:
        torch.testing.assert_close(ours[1][name], ref[1][name], rtol=rtol, atol=atol, msg=lambda s: f"{name}: {s}")
    assert ref[2].keys() == ours[2].keys(), (sorted(ref[2]), sorted(ours[2]))
    for key in ref[2]:
        assert len(ref[2][key]) == len(ours[2][key]), key
        for a, b in zip(ref[2][key], ours[2][key]):  # NaN where TRL logs NaN (a min over no sequence)
            assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6), (key, a, b)
    return ref, ours


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"])
@pytest.mark.parametrize("is_level", ["token", "sequence"])
def test_loss_parity_loss_types(tmp_path, loss_type, is_level):
    tr = make_trainer(tmp_path, loss_type=loss_type, importance_sampling_level=is_level, epsilon=0.2,
                      epsilon_high=0.28, temperature=0.7)
    inputs = make_batch(tr)
    # the Triton kernels (interpreter on CPU) for one IS level, the torch backend for the other
    ref, ours = check_parity(tr, inputs, backend="auto" if is_level == "token" else "torch")
    assert tr.gxpo_loss_path == "hidden"
    # the batch really exercises the clip: otherwise the test could not tell the surrogate from a plain PG
    assert ref[2]["clip_ratio/region_mean"][0] > 0 or is_level == "sequence"


@pytest.mark.parametrize("opts", [
    dict(loss_type="grpo", beta=0.05),
    dict(loss_type="bnpo", beta=0.05, use_bias_correction_kl=False),
    dict(loss_type="grpo", beta=0.05, importance_sampling_level="sequence"),
    dict(loss_type="dapo", beta=0.1, delta=1.5, importance_sampling_level="sequence"),
    dict(loss_type="bnpo", delta=1.4, epsilon_high=0.3),
    dict(loss_type="dr_grpo", entropy_coef=0.01, beta=0.02),
    dict(loss_type="grpo", entropy_coef=0.05, top_entropy_quantile=0.5),
    dict(loss_type="dapo", off_policy_mask_threshold=0.02, entropy_coef=0.02),
    dict(loss_type="luspo", importance_sampling_level="sequence", beta=0.03),
])
def test_loss_parity_options(tmp_path, opts):
    tr = make_trainer(tmp_path, temperature=1.3, **opts)
    check_parity(tr, make_batch(tr, tool_mask=True))


def _mask_rows(*rows):
    """mask_truncated_completions: TRL zeroes the whole completion_mask row of a truncated completion."""
    def change(tr, x):
        x["completion_mask"][list(rows)] = 0
        x["num_items_in_batch"] = x["completion_mask"].sum() * 3
    return change


def _pad_past_max(tr, x):
    """pad_to_multiple_of: the completion tensors are wider than max_completion_length (dr_grpo's normaliser)."""
    for k in ("completion_ids", "completion_mask", "old_per_token_logps", "ref_per_token_logps"):
        if k in x:
            x[k] = torch.nn.functional.pad(x[k], (0, 3))


def _sequence_is_ratio(tr, x):
    """vLLM's sequence_mask / sequence_truncate modes give a (B, 1) importance-sampling ratio."""
    tr.use_vllm = tr.args.use_vllm = True
    isr = torch.rand(x["completion_ids"].shape[0], 1, generator=torch.Generator().manual_seed(3)) * 2
    isr[2] = 0.0
    x["importance_sampling_ratio"] = isr


@pytest.mark.parametrize("opts, change", [
    (dict(loss_type="grpo", beta=0.05, entropy_coef=0.01), _mask_rows(1, 3)),
    (dict(loss_type="luspo", importance_sampling_level="sequence", beta=0.05), _mask_rows(1, 3)),
    (dict(loss_type="dapo", top_entropy_quantile=0.5, entropy_coef=0.02), _mask_rows(0, 3)),
    (dict(loss_type="bnpo", beta=0.1, entropy_coef=0.1), _mask_rows(0, 1, 2, 3, 4, 5)),
    (dict(loss_type="dr_grpo", max_completion_length=6, beta=0.05), _pad_past_max),
    (dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.05), _sequence_is_ratio),
    (dict(loss_type="dapo", off_policy_mask_threshold=0.01), _sequence_is_ratio),
    (dict(loss_type="grpo", top_entropy_quantile=0.0, importance_sampling_level="sequence", entropy_coef=0.02), None),
], ids=["grpo-empty-rows", "luspo-seq-empty-rows", "dapo-topq-empty-rows", "bnpo-empty-batch", "dr_grpo-padded",
        "grpo-seq-vllm-seq-is", "dapo-offpolicy-vllm-seq-is", "grpo-seq-topq0"])
def test_loss_parity_masked_rows_padding_and_sequence_ratios(tmp_path, opts, change):
    """Batches TRL produces under mask_truncated_completions (empty rows, an empty batch), pad_to_multiple_of
    (completions wider than max_completion_length) and vLLM's sequence-level importance-sampling modes."""
    tr = make_trainer(tmp_path, **opts)
    inputs = make_batch(tr)
    if change is not None:
        change(tr, inputs)
    check_parity(tr, inputs)


@pytest.mark.parametrize("is_level, backend", [("token", "auto"), ("sequence", "torch")])
def test_loss_parity_one_token_completions(tmp_path, is_level, backend):
    """A completion width of one token (max_completion_length=1) with rows masked as truncated: TRL then takes its
    (B, 1) tensors for per-sequence ones and averages kl and the clip ratios over all B rows, masked ones included
    (as zeros: TRL scores attention-masked positions as log-prob 0, so old and ref are 0 there too)."""
    tr = make_trainer(tmp_path, loss_type="grpo", beta=0.05, epsilon=0.05, max_completion_length=1,
                      importance_sampling_level=is_level)
    inputs = make_batch(tr, T=1, old_noise=0.5, ref_noise=0.5)
    _mask_rows(1, 4)(tr, inputs)
    keep = inputs["completion_mask"].bool()
    for k in ("old_per_token_logps", "ref_per_token_logps"):
        inputs[k] = torch.where(keep, inputs[k], 0.0)
    ref, _ = check_parity(tr, inputs, backend=backend)
    assert ref[2]["kl"][0] > 0 and ref[2]["clip_ratio/region_mean"][0] > 0


def test_loss_parity_vllm_importance_sampling_correction(tmp_path):
    """vLLM colocate's truncated/masked IS ratio (simulated: no vLLM here) weights the policy term only."""
    tr = make_trainer(tmp_path, loss_type="grpo", beta=0.05, off_policy_mask_threshold=0.05)
    tr.use_vllm = tr.args.use_vllm = True  # only what _compute_loss reads; generation is never run here
    inputs = make_batch(tr)
    g = torch.Generator().manual_seed(5)
    isr = torch.rand(inputs["completion_ids"].shape, generator=g) * 2
    isr[1] = 0.0  # a masked sequence ("*_mask" modes)
    inputs["importance_sampling_ratio"] = isr
    inputs["sampling_per_token_logps"] = inputs["old_per_token_logps"] - 0.1
    check_parity(tr, inputs)


def test_loss_parity_vllm_server_mode(tmp_path):
    """vLLM server mode: the loss reads the same importance-sampling inputs as colocate mode (generation
    through a stand-in server is tested in test_trl_vllm_server.py)."""
    tr = make_trainer(tmp_path, loss_type="dapo")
    tr.use_vllm = tr.args.use_vllm = True
    tr.args.vllm_mode = "server"
    inputs = make_batch(tr)
    inputs["importance_sampling_ratio"] = torch.rand(inputs["completion_ids"].shape,
                                                     generator=torch.Generator().manual_seed(2)) * 2
    check_parity(tr, inputs)


def test_loss_parity_logits_path_and_tied_head(tmp_path):
    tr = make_trainer(tmp_path, model=make_model(tie=True), loss_type="grpo", beta=0.04, entropy_coef=0.01)
    check_parity(tr, make_batch(tr, adv2d=True), path="logits", backend="auto")
    assert tr.gxpo_loss_path == "logits"
    tr2 = make_trainer(tmp_path, model=make_model(tie=True), loss_type="dapo")
    check_parity(tr2, make_batch(tr2, old_noise=None))  # on-policy: TRL uses logp.detach() as old
    assert tr2.gxpo_loss_path == "hidden"


@pytest.mark.parametrize("reentrant,tie", [(True, False), (False, True), (None, False)])
def test_loss_parity_gradient_checkpointing(tmp_path, reentrant, tie):
    """``gradient_checkpointing=True`` (GRPOConfig's default; transformers' Trainer turns it on in ``train()``, as
    done here, while the other parity tests call the loss with it off): the hook's loss and gradients equal TRL's,
    and TRL's equal those of a trainer without checkpointing."""
    kw = None if reentrant is None else {"use_reentrant": reentrant}
    plain = make_trainer(tmp_path, model=make_model(tie=tie), loss_type="dapo", gradient_checkpointing=False)
    inputs = make_batch(plain)
    plain.model.train()
    want = loss_and_grads(plain, lambda m, x: GRPOTrainer._compute_loss(plain, m, x), inputs)
    tr = make_trainer(tmp_path, model=make_model(tie=tie), loss_type="dapo", gradient_checkpointing=True,
                      gradient_checkpointing_kwargs=kw)
    tr.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=tr.args.gradient_checkpointing_kwargs)
    assert tr.model.is_gradient_checkpointing
    ref, ours = check_parity(tr, inputs)
    torch.testing.assert_close(ref[0], want[0], rtol=1e-5, atol=1e-7)
    assert ref[1].keys() == want[1].keys()
    for name in want[1]:
        torch.testing.assert_close(ref[1][name], want[1][name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("gc", [False, True])
def test_loss_parity_peft_lora(tmp_path, gc):
    """TRL's ``peft_config`` (the trainer holds a PEFT model; the hook patches its base model): the LoRA adapters'
    gradients equal TRL's, with and without checkpointing (TRL then makes the embeddings' output require grad)."""
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    tr = make_trainer(tmp_path, model=make_model(tie=True), trainer_kwargs=dict(peft_config=cfg), loss_type="dapo",
                      gradient_checkpointing=gc)
    if gc:
        tr.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=tr.args.gradient_checkpointing_kwargs)
    ref, _ = check_parity(tr, make_batch(tr))
    assert tr.gxpo_loss_path == "hidden" and len(ref[1]) == 12 and all("lora_" in n for n in ref[1])


def test_hook_under_torch_compile(tmp_path):
    """``torch_compile=True``: the trainer calls the loss with the compiled wrapper around the patched model; one
    SGD step gives the weights of plain TRL without compilation (``aot_eager``: no C++ compiler needed)."""
    def run(hook, **kw):
        tr = make_trainer(tmp_path, max_steps=1, loss_type="dapo", optim="sgd", **kw)
        before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        if hook:
            gtrl.enable_gxpo_loss(tr, backend="torch")
        seen, real = [], tr._compute_loss

        def spy(model, inputs):
            seen.append(type(model).__name__)
            return real(model, inputs)
        tr._compute_loss = spy
        tr.train()
        return seen, before, {n: p.detach().clone() for n, p in tr.model.named_parameters()}

    _, before, want = run(False)
    seen, _, got = run(True, torch_compile=True, torch_compile_backend="aot_eager")
    assert seen == ["OptimizedModule"]
    assert any(not torch.equal(before[n], want[n]) for n in want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reentrant", [True, False])
def test_subclass_trains_with_gradient_checkpointing(tmp_path, reentrant):
    """A GXPO update (3 backward passes) with ``gradient_checkpointing=True`` ends with the weights of the same
    update without it; the loss calls ran with checkpointing on (TRL turns it off for generation only)."""
    def run(**gc):
        tr = make_trainer(tmp_path, cls=gtrl.GXPOGRPOTrainer, max_steps=1, loss_type="dapo", **gc,
                          trainer_kwargs=dict(update="gxpo", update_kwargs={"gate": None, "backend": "torch"},
                                              backend="torch"))
        before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        seen, real = [], tr._compute_loss

        def spy(model, inputs):
            seen.append(tr.accelerator.unwrap_model(model).is_gradient_checkpointing)
            return real(model, inputs)
        tr._compute_loss = spy
        tr.train()
        return seen, before, {n: p.detach().clone() for n, p in tr.model.named_parameters()}

    seen0, before, want = run(gradient_checkpointing=False)      # GRPOConfig's default is True
    seen1, _, got = run(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert seen0 == [False] * 3 and seen1 == [True] * 3
    assert any(not torch.equal(before[n], want[n]) for n in want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)


def test_loss_parity_gradient_accumulation_and_eval(tmp_path):
    tr = make_trainer(tmp_path, loss_type="dapo", gradient_accumulation_steps=2, per_device_train_batch_size=2,
                      steps_per_generation=4)
    tr.current_gradient_accumulation_steps = 2
    check_parity(tr, make_batch(tr))
    tr = make_trainer(tmp_path, loss_type="grpo")
    tr.current_gradient_accumulation_steps = 3
    check_parity(tr, make_batch(tr))
    tr.model.eval()  # eval: no GA scaling, dapo normaliser without steps_per_generation
    tr.loss_type = "dapo"  # eval's dapo normaliser has no GA / steps_per_generation factor
    gtrl.enable_gxpo_loss(tr, backend="torch")
    ref = GRPOTrainer._compute_loss(tr, tr.model, make_batch(tr))
    ours = tr._compute_loss(tr.model, make_batch(tr))
    torch.testing.assert_close(ours, ref, rtol=2e-4, atol=2e-6)


def test_dapo_normaliser_below_one_matches_trl(tmp_path):
    """TRL divides dapo's masked sum by num_items_in_batch / P * GA / steps_per_generation, which drops below 1
    when the generation batch holds fewer loss tokens than steps_per_generation (e.g. most completions masked
    as truncated). The hook used to clamp that normaliser to 1 again: its loss and gradients were 4x smaller."""
    tr = make_trainer(tmp_path, loss_type="dapo", steps_per_generation=4, entropy_coef=0.01)
    inputs = make_batch(tr)
    inputs["num_items_in_batch"] = torch.tensor(1)  # TRL's normaliser: 1 / 1 * 1 / 4 = 0.25
    ref, ours = check_parity(tr, inputs)
    assert ref[2]["policy_loss"][0] != 0.0


def test_hook_reads_trainer_options_at_each_call(tmp_path):
    """TRL's ``_compute_loss`` reads beta, epsilon_low/high, loss_type, importance_sampling_level and
    args.delta at every call, so a callback can schedule them. The hook froze them when it was enabled: after
    such a change it silently kept the old KL weight, clip range and aggregation."""
    tr = make_trainer(tmp_path, loss_type="grpo", beta=0.05, epsilon_high=0.28)
    gtrl.enable_gxpo_loss(tr, backend="torch")
    tr.beta, tr.epsilon_low, tr.epsilon_high, tr.loss_type = 0.3, 0.1, 0.12, "bnpo"
    tr.importance_sampling_level, tr.args.delta = "sequence", 1.3
    check_parity(tr, make_batch(tr, old_noise=0.5), enable=False)
    tr.loss_type = "sapo"  # an unsupported type set after enabling is refused by name at the call
    with pytest.raises(ValueError, match="loss_type='sapo'"):
        tr._compute_loss(tr.model, make_batch(tr))


@pytest.mark.parametrize("enable_first", [False, True])
def test_hook_keeps_the_temperature_trl_built_its_head_with(tmp_path, enable_first):
    """TRL 1.16 hands args.temperature to its fused LM head (and to generation) when the trainer is built, so a later
    change of trainer.temperature or args.temperature moves neither TRL's loss nor its old / ref log-probs. The
    hook read trainer.temperature at every call: after such a change its log-probs, ratios and entropies came from
    another temperature (loss off by 2.4% here)."""
    tr = make_trainer(tmp_path, loss_type="grpo", temperature=0.7, beta=0.05, entropy_coef=0.01)
    if enable_first:
        gtrl.enable_gxpo_loss(tr, backend="torch")
        tr.args.temperature = 0.9
    tr.temperature = 1.3
    check_parity(tr, make_batch(tr), enable=not enable_first)


def test_trl_policy_loss_matches_float64_formula():
    """The pure loss function against a direct float64 transcription of TRL 1.16's dapo + entropy bonus."""
    torch.manual_seed(3)
    B, T = 5, 9
    logp = (-torch.rand(B, T, dtype=torch.float64) * 3).requires_grad_()
    ent = (torch.rand(B, T, dtype=torch.float64) * 2).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(B, T, dtype=torch.float64)
    mask = torch.rand(B, T) > 0.3
    A = torch.randn(B, dtype=torch.float64)
    opts = gtrl.GRPOLossOptions(eps_low=0.2, eps_high=0.28, loss_agg_mode="seq-mean-token-sum")
    N = 37.0
    loss, _ = gtrl.trl_policy_loss(logp, ent, mask, A, old, None, opts, loss_type="dapo", dapo_normalizer=N,
                                   entropy_coef=0.1, accumulation=2.0)
    r = torch.exp(logp - old)
    pl = -torch.min(r * A[:, None], torch.clamp(r, 0.8, 1.28) * A[:, None])
    m = mask.double()
    want = (pl * m).sum() / N - 0.1 * (ent * m).sum() / m.sum() / 2.0
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    g1 = torch.autograd.grad(loss, (logp, ent))
    g2 = torch.autograd.grad(want, (logp, ent))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("change, exc, text", [
    (dict(mask=lambda a: a["mask"][:1]), ValueError, r"mask must have shape \(5, 7\)"),
    (dict(mask=lambda a: a["mask"][:, :1]), ValueError, r"mask must have shape \(5, 7\)"),
    (dict(mask=lambda a: a["mask"].float()), TypeError, "mask must have dtype"),
    (dict(advantages=lambda a: a["advantages"][:1]), ValueError, r"advantages must have shape \(5,\)"),
    (dict(old_logprobs=lambda a: a["old_logprobs"][:, :1]), ValueError, "old_logprobs must have shape"),
    (dict(ref_logprobs=lambda a: a["ref_logprobs"][:1]), ValueError, "ref_logprobs must have shape"),
    (dict(entropy_mask=lambda a: a["mask"][:1]), ValueError, "entropy_mask must have shape"),
    (dict(pg_weight=lambda a: torch.ones(1, 7)), ValueError, "pg_weight must have shape"),
    (dict(accumulation=lambda a: 0), ValueError, "accumulation must be in"),
    (dict(loss_type=lambda a: "dapo", dapo_normalizer=lambda a: 0.0), ValueError, "dapo_normalizer must be in"),
])
def test_trl_policy_loss_refuses_bad_inputs(change, exc, text):
    """The public loss function checks shapes (no values, no sync): a (1, T) or (B, 1) mask / old / ref used
    to broadcast silently into a wrong loss, and accumulation=0 returned -inf."""
    g = torch.Generator().manual_seed(4)
    B, T = 5, 7
    logp = (-torch.rand(B, T, generator=g) * 3).requires_grad_()
    args = dict(logp=logp, entropy=torch.rand(B, T, generator=g), mask=torch.rand(B, T, generator=g) > 0.3,
                advantages=torch.randn(B, generator=g), old_logprobs=logp.detach() + 0.1,
                ref_logprobs=logp.detach() - 0.1, opts=gtrl.GRPOLossOptions(beta=0.04), loss_type="grpo")
    args.update({k: f(args) for k, f in change.items()})
    with pytest.raises(exc, match=text):
        gtrl.trl_policy_loss(**args)


class _StubAccelerator:
    num_processes, sync_gradients = 1, True

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


def trl_loss_on_logits(logits, tokens, mask, adv, old, ref, *, loss_type, temperature, beta=0.0, delta=None,
                       eps_low=0.2, eps_high=0.28, is_level="token", ga=2, spg=4, n_items=50.0, bias_kl=True,
                       metrics_out=None):
    """TRL 1.16's own ``GRPOTrainer._compute_loss`` on a stand-in trainer whose policy log-probs and entropies are
    the log-softmax of ``logits`` / temperature: TRL's loss math on given tensors, no model. ``metrics_out``
    (a dict) receives the metrics TRL logged."""
    from collections import defaultdict
    from types import SimpleNamespace

    def logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kw):
        lsm = torch.log_softmax(logits / temperature, -1)
        return lsm.gather(-1, tokens[..., None])[..., 0], -(lsm.exp() * lsm).sum(-1), None
    cfg = GRPOConfig(output_dir="unused", report_to="none", use_cpu=True)
    shapes = ("sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
              "vespo_lambda_neg")   # TRL's defaults, which GRPOLossOptions' defaults must equal
    args = SimpleNamespace(use_bias_correction_kl=bias_kl, delta=delta, steps_per_generation=spg,
                           **{k: getattr(cfg, k) for k in shapes})
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=logps_and_entropies, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level=is_level, beta=beta, args=args,
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=ga,
        max_completion_length=tokens.shape[1] + 2, accelerator=_StubAccelerator(), _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list)}, get_gamma_weights=GRPOTrainer.get_gamma_weights)
    B = tokens.shape[0]
    inputs = dict(prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.long),
                  completion_ids=tokens, completion_mask=mask.long(), advantages=adv,
                  num_items_in_batch=torch.tensor(n_items, dtype=logits.dtype), old_per_token_logps=old,
                  ref_per_token_logps=ref)
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    if metrics_out is not None:
        metrics_out.update({k: v[-1] for k, v in stub._metrics["train"].items()})
    return loss


@pytest.mark.parametrize("loss_type, is_level, kw", [
    ("grpo", "sequence", dict(beta=0.04, delta=1.5)),
    ("bnpo", "token", dict(beta=0.04, bias_kl=False)),
    ("dr_grpo", "token", dict(delta=1.4)),
    ("dapo", "token", dict(beta=0.04)),
    ("luspo", "sequence", dict()),
    ("cispo", "token", dict(eps_high=1.2)),  # TRL's raw upper bound (ours: 0.2); it binds here
    ("sapo", "token", dict(beta=0.04)),
    ("vespo", "token", dict()),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grpo_loss_matches_trl_compute_loss_on_logits(loss_type, is_level, kw, dtype):
    """docs/losses.md's mapping of every TRL 1.16 loss type onto ``grpo_loss`` options, checked against TRL's own
    ``_compute_loss`` (float64, on the same logits): value and d(logits), with an all-masked row, ragged rows,
    an awkward vocabulary, gradient accumulation and steps_per_generation."""
    from gxpo_kernels import grpo_loss
    g = torch.Generator().manual_seed(7)
    B, T, V, temp, ga, spg, n = 5, 6, 37, 0.7, 2, 4, 50.0
    logits = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.arange(T)[None] < torch.tensor([6, 0, 3, 1, 5])[:, None]
    adv = torch.randn(B, generator=g)
    lp = torch.log_softmax(logits.double() / temp, -1).gather(-1, tokens[..., None])[..., 0]
    old = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    x64 = logits.double().requires_grad_()
    want = trl_loss_on_logits(x64, tokens, mask, adv.double(), old.double(), ref.double(), loss_type=loss_type,
                              temperature=temp, is_level=is_level, ga=ga, spg=spg, n_items=n, **kw)
    want_grad, = torch.autograd.grad(want, x64)

    token_sum = loss_type in ("dapo", "cispo", "vespo")   # TRL's num_items_in_batch normaliser
    mode = {"grpo": "seq-mean-token-mean", "sapo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum-norm",
            "luspo": "seq-mean-token-sum"}.get(loss_type, "token-mean")
    eps_high = kw.get("eps_high", 0.28)
    opts = gtrl.GRPOLossOptions(
        temperature=temp, eps_high=eps_high - 1.0 if loss_type == "cispo" else eps_high, delta=kw.get("delta"),
        beta=kw.get("beta", 0.0), use_bias_correction_kl=kw.get("bias_kl", True), importance_sampling=is_level,
        loss_agg_mode=mode, max_length=T + 2 if loss_type == "dr_grpo" else None,
        policy_loss=loss_type if loss_type in ("cispo", "sapo", "vespo") else "clip",
        log_ratio_clamp=None, kl_clamp=None)
    x = logits.clone().requires_grad_()
    loss, _ = grpo_loss(x, tokens, adv, mask, old, ref, options=opts, backend="torch",
                        num_items_in_batch=n / spg * ga if token_sum else None)
    loss = loss if token_sum else loss / ga
    got_grad, = torch.autograd.grad(loss, x)
    torch.testing.assert_close(loss.double(), want, rtol=2e-5, atol=1e-7)
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # a bf16 gradient is rounded to bf16
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=tol, atol=tol * want_grad.abs().max().item())


@pytest.mark.parametrize("is_level", ["token", "sequence"])
def test_grpo_loss_metrics_against_trl_logged_metrics(is_level):
    """docs/losses.md's metric table: on a batch with an empty row, length-1 rows, log-ratios past both clips
    and zero advantages, TRL's kl, entropy and clip_ratio/* equal our kl, entropy, clip_frac_low/high and their
    sum with token-level IS; with sequence-level IS TRL averages the clip indicators over the B sequences
    (empty ones included), ours over the tokens."""
    from gxpo_kernels import grpo_loss
    g = torch.Generator().manual_seed(3)
    B, T, V = 6, 5, 37
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.arange(T)[None] < torch.tensor([5, 0, 1, 4, 1, 3])[:, None]
    lp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    shifts = torch.tensor([0.0, 0.05, -0.05, 0.5, -0.5, 2.0, -2.0, 6.0, -6.0], dtype=torch.float64)
    old = lp - shifts[torch.randint(0, 9, (B, T), generator=g)]
    ref = lp + 1.5 * shifts[torch.randint(0, 9, (B, T), generator=g)]
    adv = torch.tensor([1.3, -0.7, 0.0, -2.0, 0.4, -0.1], dtype=torch.float64)
    logged = {}
    trl_loss_on_logits(logits, tokens, mask, adv, old, ref, loss_type="bnpo", temperature=1.0, beta=0.1,
                       is_level=is_level, ga=1, bias_kl=False, metrics_out=logged)
    _, ours = grpo_loss(logits.float(), tokens, adv.float(), mask, old.float(), ref.float(), beta=0.1, eps_high=0.28,
                        importance_sampling=is_level, log_ratio_clamp=None, kl_clamp=None, backend="torch")
    assert logged["kl"] == pytest.approx(float(ours["kl"]), rel=1e-5)
    assert logged["entropy"] == pytest.approx(float(ours["entropy"]), rel=1e-5)
    low, high = float(ours["clip_frac_low"]), float(ours["clip_frac_high"])
    if is_level == "token":
        assert (logged["clip_ratio/low_mean"], logged["clip_ratio/high_mean"], logged["clip_ratio/region_mean"]) == \
            pytest.approx((low, high, low + high), rel=1e-6)
    else:  # one indicator per sequence, averaged over all B rows
        seq_ratio = torch.exp(torch.where(mask, lp - old, 0.0).sum(-1) / mask.sum(-1).clamp(min=1))
        seq_low = ((seq_ratio < 0.8) & (adv < 0)).double().mean()
        seq_high = ((seq_ratio > 1.28) & (adv > 0)).double().mean()
        assert (logged["clip_ratio/low_mean"], logged["clip_ratio/high_mean"]) == \
            pytest.approx((float(seq_low), float(seq_high)), rel=1e-6)
        assert (logged["clip_ratio/low_mean"], logged["clip_ratio/high_mean"]) != pytest.approx((low, high))


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("cfg, name", [
    (dict(loss_type="cispo"), "loss_type='cispo'"),
    (dict(loss_type="sapo"), "loss_type='sapo'"),
    (dict(epsilon=1.0), "TRL's epsilon=1.0.*eps_low must be in"),   # TRL's lower bound 0: our ops refuse it
    (dict(delta=1.2, epsilon_high=0.28), "delta=1.2.*delta must be in"),  # TRL only recommends delta > 1 + eps
    (dict(beta=-0.1), "beta=-0.1.*beta must be in"),
    # TRL raises only at the first loss call; the message used to name our option (importance_sampling), not TRL's
    (dict(importance_sampling_level="seq"), "importance_sampling_level='seq'.*must be one of"),
    (dict(loss_type="vespo"), "loss_type='vespo'"),
    # TRL's dr_grpo divides by B * max_completion_length (a TypeError at its first loss); the hook used to fall
    # back silently to each micro-batch's completion width
    (dict(loss_type="dr_grpo", max_completion_length=None), "loss_type='dr_grpo' with max_completion_length=None"),
])
def test_unsupported_options_refused(tmp_path, cfg, name):
    """Refused before anything changes: the options TRL's loss reads (epsilon, delta) used to be checked after the
    model was patched, which a refused trainer left patched."""
    tr = make_trainer(tmp_path, **cfg)
    with pytest.raises(ValueError, match=name.replace("(", r"\(")):
        gtrl.enable_gxpo_loss(tr)
    assert not hasattr(tr.model, "_gxpo_patched")


def test_liger_layer_kernels_accepted(tmp_path):
    """TRL 1.16 applies only Liger's layer kernels (its fused linear cross-entropy is forced off), which leave
    the model's forward and lm_head alone: the hook accepts them."""
    tr = make_trainer(tmp_path)
    tr.args.use_liger_kernel = True  # applying the kernels for real needs a GPU; the hook only reads args
    gtrl.enable_gxpo_loss(tr, backend="torch")
    assert tr.gxpo_loss_path == "hidden"


def test_version_gate(monkeypatch):
    assert gtrl.check_trl_version("1.16.3") == "1.16.3"
    monkeypatch.delenv(gtrl.ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(RuntimeError, match="tested with TRL"):
        gtrl.check_trl_version("1.17.0")
    with pytest.raises(RuntimeError, match="tested with TRL"):
        gtrl.check_trl_version("0.21.0")
    monkeypatch.setenv(gtrl.ALLOW_UNTESTED_ENV, "1")
    with pytest.warns(RuntimeWarning, match="tested with TRL"):
        gtrl.check_trl_version("1.17.0")


def test_hidden_path_refused_where_impossible(tmp_path):
    model = make_model()
    model.config.final_logit_softcapping = 30.0
    tr = make_trainer(tmp_path, model=model)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        gtrl.enable_gxpo_loss(tr, loss_path="hidden")
    gtrl.enable_gxpo_loss(tr)  # auto falls back to the logits path
    assert tr.gxpo_loss_path == "logits"
    with pytest.raises(ValueError, match="loss_path"):
        gtrl.enable_gxpo_loss(tr, loss_path="fused")


# ------------------------------------------------------------------------------------- trainer subclass
def reward_binary(completions, **kw):
    return [float(len(set(c)) % 2) for c in completions]


def count_backward(trainer):
    calls = []
    real = trainer.accelerator.backward

    def backward(loss, **kw):
        calls.append(trainer.state.global_step)
        return real(loss, **kw)
    trainer.accelerator.backward = backward
    return calls


def adam_steps(trainer):
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    return {int(st["step"]) for st in opt.state.values()}


@pytest.mark.parametrize("update, kwargs, per_step", [
    ("grpo", {}, [1, 1]),
    ("gxpo", {"gate": None}, [3, 3]),
    ("gxpo", {"gate": "ema", "tau": 1e-9}, [3, 1]),  # the gate fires after the first update: GRPO from then on
    ("sfpo", {"K": 3, "gate": None}, [4, 4]),
])
def test_subclass_trains_with_the_update_rule(tmp_path, update, kwargs, per_step):
    # the torch backends keep this end-to-end test fast; the parity tests run our Triton kernels (interpreter)
    kwargs = dict(kwargs, backend="torch") if update != "grpo" else kwargs
    tr = make_trainer(tmp_path, cls=gtrl.GXPOGRPOTrainer, loss_type="dapo", learning_rate=5e-3, max_grad_norm=1.0,
                      trainer_kwargs=dict(update=update, update_kwargs=kwargs, backend="torch"))
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    calls = count_backward(tr)
    tr.train()
    # backward passes per outer update, counted at the accelerator (independent of the rule's own counter)
    assert [calls.count(s) for s in range(2)] == per_step
    assert tr.state.global_step == 2
    # the inner optimizer stepped once per pass; HF's outer optimizer.step() added nothing
    assert adam_steps(tr) == {sum(per_step)}
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert logs[0]["learning_rate"] > logs[1]["learning_rate"]  # scheduler stepped once per update
    assert "entropy" in logs[0] and "clip_ratio/region_mean" in logs[0]
    if update != "grpo":
        assert [h[f"{update}/backward_passes"] for h in logs] == per_step
    assert any(not torch.equal(before[n], p) for n, p in tr.model.named_parameters())


def test_subclass_builds_the_prepared_extrapolation_once(tmp_path):
    """The rule's prepared extrapolation plan (the C++ op here, the rule's default backend; the loss runs on the
    torch backend) is built on the first active update and reused on the next ones: the parameters and the
    rule's buffers keep their memory."""
    tr = make_trainer(tmp_path, cls=gtrl.GXPOGRPOTrainer, loss_type="dapo", max_steps=4, max_grad_norm=1.0,
                      trainer_kwargs=dict(update="gxpo", update_kwargs={"gate": None}, backend="torch"))
    with count_plan_builds() as builds:
        tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert [h["gxpo/active"] for h in logs] == [1.0] * 4
    assert builds[0] == 1, builds[0]


@pytest.mark.parametrize("recompute", [True, False])
def test_subclass_old_logprobs_per_pass(tmp_path, recompute):
    tr = make_trainer(tmp_path, cls=gtrl.GXPOGRPOTrainer, max_steps=1,
                      trainer_kwargs=dict(update="gxpo", update_kwargs={"gate": None, "backend": "torch"},
                                          recompute_old_logp=recompute, backend="torch"))
    seen, real = [], tr._compute_loss

    def spy(model, inputs):
        seen.append((inputs.get("old_per_token_logps"), tr._gxpo_pass_index))
        return real(model, inputs)
    tr._compute_loss = spy
    tr.train()
    assert [k for _, k in seen] == [0, 1, 2] and seen[0][0] is None  # TRL stores none on-policy
    if recompute:
        assert all(old is None for old, _ in seen)  # rho = 1 at every pass (paper protocol)
    else:  # passes 1 and 2 use theta0's log-probs, which differ from theirs after the first step
        assert seen[1][0] is not None and seen[2][0] is seen[1][0]
        assert tr._gxpo_last_logp.shape == seen[1][0].shape
        assert not torch.allclose(tr._gxpo_last_logp, seen[1][0])


def test_subclass_checkpoint_carries_gate_and_fade_state(tmp_path):
    kw = dict(update="gxpo", update_kwargs={"gate": "window", "window": 3, "backend": "torch"},
              advantage_estimator="fade", backend="torch")
    tr = make_trainer(tmp_path, cls=gtrl.GXPOGRPOTrainer, trainer_kwargs=kw, save_strategy="steps", save_steps=2)
    tr.reward_funcs = [reward_binary]
    tr.train()
    ckpt = tmp_path / "out" / "checkpoint-2"
    assert (ckpt / "gxpo_update_state.pt").exists()
    tr2 = make_trainer(tmp_path, cls=gtrl.GXPOGRPOTrainer, trainer_kwargs=kw)
    tr2.create_optimizer_and_scheduler(num_training_steps=2)
    tr2._load_optimizer_and_scheduler(str(ckpt))
    assert tr2._gxpo_pending_state == tr._gxpo_rule.state_dict()
    assert tr2._gxpo_pending_state["total_backward_passes"] == 6
    assert tr2._fade.state_dict() == tr._fade.state_dict()
    rule = tr2._get_rule(tr2.model)  # built lazily on the first update: the saved gate/counters are applied then
    assert rule.total_backward_passes == 6 and rule.gate.state_dict() == tr._gxpo_rule.gate.state_dict()


def test_subclass_fade_advantages(tmp_path):
    from gxpo_kernels.advantages import fade_advantages
    tr = make_trainer(tmp_path, cls=gtrl.GXPOGRPOTrainer,
                      trainer_kwargs=dict(update="grpo", advantage_estimator="fade", fade_kwargs={"p0": 0.3},
                                         backend="torch"))
    tr.reward_funcs = [reward_binary]
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert "fade/alpha" in logs[0] and math.isclose(logs[0]["fade/alpha"], min(3 * 0.7 / 0.6, 3.0), rel_tol=1e-6)
    assert tr._fade.steps == 1  # the second batch folded in the first batch's reward and entropy
    assert "fade/h_hat" not in logs[0] and logs[1]["fade/h_hat"] == pytest.approx(tr._fade.h_hat, rel=1e-6)
    tr.model.train()
    batch = tr._generate_and_score_completions([{"prompt": "ab"}] * 4)  # one prompt, num_generations times
    rewards = (tr._gxpo_rewards_per_func * tr.reward_weights[None]).nansum(1)
    want = fade_advantages(rewards, tr.num_generations, alpha=tr._fade.alpha, delta=tr._fade.delta)
    assert 0 < rewards.mean() < 1 and want.abs().sum() > 0  # a mixed group: the check below has teeth
    torch.testing.assert_close(batch["advantages"], want.to(batch["advantages"].dtype))


def fixed_rewards(*per_call):
    """A reward function returning the given lists in turn (None = not scored)."""
    calls = iter(per_call)

    def reward(completions, **kw):
        return list(next(calls))
    return reward


def test_subclass_fade_leaves_unscorable_completions_out(tmp_path):
    """A completion every reward function returned None for is unscorable: TRL 1.16 leaves it out of its group's
    mean and gives it advantage 0. nansum used to score it 0: [None, 1, 0, 0] became the group [0, 1, 0, 0], a
    biased mean of 1/4 and a spurious negative advantage for the unscored completion."""
    from gxpo_kernels.advantages import fade_advantages
    tr = make_trainer(tmp_path, cls=gtrl.GXPOGRPOTrainer,
                      trainer_kwargs=dict(update="grpo", advantage_estimator="fade", backend="torch"))
    # two functions: row 0 is unscorable, row 1 partly scored (nansum: 1), rows 2-3 fully scored
    tr.reward_funcs = [fixed_rewards([None, 1.0, 0.0, 0.0]), fixed_rewards([None, None, 0.0, 0.0])]
    tr.reward_func_names = ["a", "b"]
    tr.reward_processing_classes = [None, None]
    tr.reward_weights = torch.ones(2)
    tr.model.train()
    batch = tr._generate_and_score_completions([{"prompt": "ab"}] * 4)
    want = fade_advantages(torch.tensor([1.0, 0.0, 0.0]), 3, alpha=tr._fade.alpha, delta=tr._fade.delta)
    assert want.abs().min() > 0
    torch.testing.assert_close(batch["advantages"], torch.cat([torch.zeros(1), want]))
    assert tr._fade_pending_reward == pytest.approx(1 / 3)   # the batch mean over the scored completions
    assert list(tr._logs["advantages"])[-4:] == batch["advantages"].tolist()   # the completions table's column


def test_subclass_fade_failure_changes_nothing(tmp_path):
    """Non-binary rewards raise; the controller, the pending reward and the collected entropies stay as they
    were (they used to be folded in and cleared before the advantages failed)."""
    tr = make_trainer(tmp_path, cls=gtrl.GXPOGRPOTrainer,
                      trainer_kwargs=dict(update="grpo", advantage_estimator="fade", backend="torch"))
    tr.reward_funcs = [fixed_rewards([0.5, 1.0, 0.0, 0.0])]
    tr._fade_pending_reward, tr._fade_entropy = 0.25, [[3.0, 2.0], [1.25, 1.0]]
    before = copy.deepcopy(tr._fade.state_dict())
    tr.model.train()
    with pytest.raises(ValueError, match="binary rewards"):
        tr._generate_and_score_completions([{"prompt": "ab"}] * 4)
    assert tr._fade.state_dict() == before and tr._fade.steps == 0
    assert tr._fade_pending_reward == 0.25 and tr._fade_entropy == [[3.0, 2.0], [1.25, 1.0]]


def test_subclass_fade_entropy_is_token_weighted_over_micro_batches(tmp_path):
    """FADE's entropy is the mean token entropy since the last generation batch. With update="grpo" each
    micro-batch's mean used to count once whatever its token count (the GXPO path weighed tokens): micro-batches
    of 1 token at entropy 3 and 3 tokens at entropy 1/3 gave 1.67 instead of 1.0."""
    tr = make_trainer(tmp_path, cls=gtrl.GXPOGRPOTrainer,
                      trainer_kwargs=dict(update="grpo", advantage_estimator="fade", backend="torch"))
    tr.reward_funcs = [fixed_rewards([1.0, 0.0, 0.0, 1.0])]
    tr.model.train()
    tr._fade_pending_reward, tr._fade_pending_n = 0.5, 4
    for total, tokens in ((3.0, 1.0), (1.0, 3.0)):
        tr._gxpo_entropy_stats = (torch.tensor(total), torch.tensor(tokens))
        tr._fade_observe_entropy()
    tr._generate_and_score_completions([{"prompt": "ab"}] * 4)
    assert tr._fade.steps == 1 and tr._fade.h_hat == pytest.approx(1.0, rel=1e-12)


def test_subclass_fade_resume_continues_the_controller(tmp_path):
    """Resuming from checkpoint-1 folds the first batch's reward and entropy into the controller at the second
    generation, as the uninterrupted run does. The entropies collected since the last generation were not saved,
    so the resumed run skipped that update (steps 0 instead of 1) and its alpha/delta drifted from then on."""
    kw = dict(update="grpo", advantage_estimator="fade", fade_kwargs={"p0": 0.3, "ema": 0.5}, backend="torch")
    full = make_trainer(tmp_path / "full", cls=gtrl.GXPOGRPOTrainer, trainer_kwargs=kw, save_strategy="steps",
                        save_steps=1)
    full.reward_funcs = [reward_binary]
    full.train()
    assert full._fade.steps == 1
    resumed = make_trainer(tmp_path / "resumed", cls=gtrl.GXPOGRPOTrainer, trainer_kwargs=kw)
    resumed.reward_funcs = [reward_binary]
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-1"))
    assert resumed._fade.state_dict() == full._fade.state_dict()
    assert resumed._fade_pending_reward == full._fade_pending_reward


def test_subclass_fade_resume_with_other_fade_kwargs_is_refused(tmp_path):
    """A checkpoint's FADE state replaced the trainer's configured hyper-parameters with the saved ones, silently
    (the update rule refuses a checkpoint of other settings): resumed with p0=0.4, the run went on with p0=0.3.
    Refused, naming the setting, before anything is loaded; the same settings resume."""
    kw = dict(update="grpo", advantage_estimator="fade", fade_kwargs={"p0": 0.3, "ema": 0.5}, backend="torch")
    full = make_trainer(tmp_path / "full", cls=gtrl.GXPOGRPOTrainer, trainer_kwargs=kw, save_strategy="steps",
                        save_steps=1, max_steps=1)
    full.reward_funcs = [reward_binary]
    full.train()
    ckpt = str(tmp_path / "full" / "out" / "checkpoint-1")
    other = make_trainer(tmp_path / "other", cls=gtrl.GXPOGRPOTrainer,
                         trainer_kwargs=dict(kw, fade_kwargs={"p0": 0.4, "ema": 0.5}))
    other.create_optimizer_and_scheduler(num_training_steps=2)
    before = other._fade.state_dict(), copy.deepcopy(other.optimizer.state_dict())
    with pytest.raises(ValueError, match=r"p0: checkpoint 0.3 vs fade_kwargs 0.4"):
        other._load_optimizer_and_scheduler(ckpt)
    assert (other._fade.state_dict(), other.optimizer.state_dict()) == before
    same = make_trainer(tmp_path / "same", cls=gtrl.GXPOGRPOTrainer, trainer_kwargs=kw)
    same.create_optimizer_and_scheduler(num_training_steps=2)
    same._load_optimizer_and_scheduler(ckpt)
    assert same._fade.state_dict() == full._fade.state_dict()


def test_subclass_fade_folds_in_every_generation_batch(tmp_path):
    """GXPO with steps_per_generation=1 < gradient_accumulation_steps=2: two generation batches per update, one
    entropy (the update's pass 0). The controller's update folds in both batches' mean reward; the first batch's
    used to be overwritten by the second's. ema=1 makes p_hat the folded-in reward itself."""
    tr = make_trainer(tmp_path, cls=gtrl.GXPOGRPOTrainer, gradient_accumulation_steps=2, steps_per_generation=1,
                      trainer_kwargs=dict(update="gxpo", update_kwargs={"gate": None, "backend": "torch"},
                                          advantage_estimator="fade", fade_kwargs={"ema": 1.0}, backend="torch"))
    tr.reward_funcs = [fixed_rewards([1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0])]
    tr.train()
    assert tr.state.global_step == 2 and tr._fade.steps == 1
    assert tr._fade.p_hat == pytest.approx((0.25 + 0.5) / 2, abs=1e-12)
    assert tr._fade_pending_reward == pytest.approx((0.75 + 0.0) / 2, abs=1e-12) and tr._fade_pending_n == 8


def test_subclass_dict_options_take_json_as_keywords(tmp_path):
    """update_kwargs / fade_kwargs take a dict or a JSON string as keywords too, as in GXPOGRPOConfig (a JSON
    string used to fail inside dict() / ** with a message naming neither option); bad ones name the option."""
    tr = make_trainer(tmp_path, cls=gtrl.GXPOGRPOTrainer,
                      trainer_kwargs=dict(update="sfpo", update_kwargs='{"K": 3}', advantage_estimator="fade",
                                          fade_kwargs='{"p0": 0.3}', backend="torch"))
    assert tr._gxpo_update_kwargs == {"K": 3} and tr._fade.p0 == 0.3
    for kw, err, msg in [(dict(fade_kwargs={"pzero": 0.3}), TypeError, "fade_kwargs: .*pzero"),
                         (dict(fade_kwargs="[1, 2]"), TypeError, "fade_kwargs must be a dict"),
                         (dict(update_kwargs="{K: 3}"), ValueError, "update_kwargs must be a dict")]:
        with pytest.raises(err, match=msg):
            make_trainer(tmp_path, cls=gtrl.GXPOGRPOTrainer,
                         trainer_kwargs=dict(advantage_estimator="fade", backend="torch", **kw))


@pytest.mark.parametrize("cfg, kwargs, name", [
    (dict(), dict(update="adam"), "update must be one of"),
    (dict(), dict(advantage_estimator="rloo"), "advantage_estimator"),
    (dict(multi_objective_aggregation="normalize_then_sum"), dict(advantage_estimator="fade"),
     "multi_objective_aggregation"),
    (dict(loss_type="vespo"), dict(update="grpo"), "loss_type='vespo'"),
    (dict(loss_type="dr_grpo", max_completion_length=None), dict(update="gxpo"), "max_completion_length=None"),
])
def test_subclass_refusals(tmp_path, cfg, kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_trainer(tmp_path, cls=gtrl.GXPOGRPOTrainer, trainer_kwargs=kwargs, **cfg)


def test_loss_close_to_trl_under_bf16_autocast(tmp_path):
    """bf16 autocast (TRL's default on GPU): both heads take bf16 operands; TRL rounds its logit tiles and
    dlogits to bf16 on CPU while ours accumulate in fp32, so agreement is to bf16 precision only."""
    tr = make_trainer(tmp_path, bf16=True, loss_type="grpo", beta=0.05)
    inputs = make_batch(tr)
    tr.model.train()
    ref = loss_and_grads(tr, lambda m, x: GRPOTrainer._compute_loss(tr, m, x), inputs)
    gtrl.enable_gxpo_loss(tr, backend="torch")
    ours = loss_and_grads(tr, tr._compute_loss, inputs)
    torch.testing.assert_close(ours[0], ref[0], rtol=2e-3, atol=2e-4)
    g_ref = torch.cat([g.flatten() for g in ref[1].values()])
    g_ours = torch.cat([ours[1][n].flatten() for n in ref[1]])
    cos = torch.nn.functional.cosine_similarity(g_ref.double(), g_ours.double(), dim=0)
    assert cos > 0.9999 and abs(g_ours.norm() / g_ref.norm() - 1) < 5e-3, (float(cos), float(g_ours.norm()))


@pytest.mark.parametrize("path", ["hidden", "logits"])
def test_cast_lm_head_to_fp32_under_bf16_autocast(tmp_path, path):
    """cast_lm_head_to_fp32 under bf16 autocast: TRL's loss head projects in fp32 outside autocast, so with it
    both paths agree with TRL's per-token log-probs to fp32 rounding. The logits path used to run the model's
    own (fp32-cast) lm_head inside the trainer's autocast region, i.e. in bf16 again: errors of ~1e-3."""
    tr = make_trainer(tmp_path, bf16=True, cast_lm_head_to_fp32=True, temperature=0.7)
    inputs = make_batch(tr)
    gtrl.enable_gxpo_loss(tr, loss_path=path, backend="torch")
    tr.model.train()
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        want, want_ent, _ = GRPOTrainer._get_per_token_logps_and_entropies(tr, tr.model, ids, am, T,
                                                                          compute_entropy=True)
        got, got_ent, _ = gtrl.policy_token_logprobs(tr, tr.model, inputs)
    m = inputs["completion_mask"].bool()
    torch.testing.assert_close(got[m], want[m], rtol=0, atol=1e-5)
    torch.testing.assert_close(got_ent[m], want_ent[m], rtol=0, atol=2e-5)


@pytest.mark.slow
def test_subclass_gxpo_under_ddp(tmp_path):
    """Two CPU processes (DDP over gloo): the rule's three passes all-reduce their gradients, so both ranks
    end with identical parameters after the updates; FADE's controller is the same on both ranks."""
    import os
    import subprocess
    import sys
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_trl_ddp_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           worker, str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt") for i in (0, 1))
    assert r0["steps"] == r1["steps"] == 2 and r0["passes"] == r1["passes"] == 6
    assert torch.equal(r0["flat"], r1["flat"])
    # FADE: one controller from the gathered rewards and the all-reduced entropy, the same on both ranks; each
    # rank's advantages are its slice of the whole batch's FADE advantages (groups span the ranks)
    assert r0["fade"] == r1["fade"] and r0["fade"]["steps"] == 1
    assert r0["fade_pending_reward"] == r1["fade_pending_reward"]
    for (a0, full0), (a1, full1) in zip(r0["batches"], r1["batches"]):
        assert torch.equal(full0, full1) and torch.equal(torch.cat([a0, a1]), full0.to(a0.dtype))


@pytest.mark.parametrize("kw,exc,text", [
    (dict(update="gxpo", update_kwargs={"KK": 3}), TypeError, "update_kwargs.*KK"),
    (dict(update="sfpo", update_kwargs={"K": 0}), ValueError, "K must be"),
    (dict(update="grpo", backend="cuda"), ValueError, "backend"),
])
def test_bad_rule_options_fail_at_construction(tmp_path, kw, exc, text):
    """They used to pass the constructor and fail at the first training step, after generation."""
    with pytest.raises(exc, match=text):
        make_trainer(tmp_path, cls=gtrl.GXPOGRPOTrainer, max_steps=1, trainer_kwargs=kw)


def test_subclass_resume_warns_about_update_state_it_cannot_use(tmp_path):
    """A checkpoint saved with FADE resumed by a trainer without it (and the reverse, and a checkpoint without the
    update state file at all) used to be taken silently: FADE's controller was dropped or started afresh."""
    fade = dict(update="grpo", advantage_estimator="fade", backend="torch")
    full = make_trainer(tmp_path / "full", cls=gtrl.GXPOGRPOTrainer, trainer_kwargs=fade, save_strategy="steps",
                        save_steps=1, max_steps=1)
    full.reward_funcs = [reward_binary]
    full.train()
    ckpt = tmp_path / "full" / "out" / "checkpoint-1"
    plain = make_trainer(tmp_path / "plain", cls=gtrl.GXPOGRPOTrainer, trainer_kwargs=dict(backend="torch"))
    plain.create_optimizer_and_scheduler(num_training_steps=2)       # what train() builds before it loads these
    with pytest.warns(UserWarning, match="holds FADE's controller state but this trainer does not use FADE"):
        plain._load_optimizer_and_scheduler(str(ckpt))
    plain.save_model(str(tmp_path / "plain_ckpt"))                   # a folder without the update state file
    torch.save(plain.gxpo_state_dict(), tmp_path / "plain_state.pt")          # a state saved without FADE
    again = make_trainer(tmp_path / "again", cls=gtrl.GXPOGRPOTrainer, trainer_kwargs=fade)
    again.create_optimizer_and_scheduler(num_training_steps=2)
    with pytest.warns(UserWarning, match="no gxpo_update_state.pt"):
        again._load_optimizer_and_scheduler(str(tmp_path / "plain_ckpt"))
    (tmp_path / "plain_ckpt" / "gxpo_update_state.pt").write_bytes((tmp_path / "plain_state.pt").read_bytes())
    with pytest.warns(UserWarning, match="no FADE controller state"):
        again._load_optimizer_and_scheduler(str(tmp_path / "plain_ckpt"))
    assert again._fade.steps == 0
