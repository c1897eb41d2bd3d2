"""Rollouts: left-padded prompts -> ``model.generate`` samples -> rewards, masks and old log-probs.

Shapes: P prompts x G samples = B rows; prompt length Lp (left padded), response length T.
``logits[:, t]`` of the loss op scores ``tokens[:, t]``: the causal shift is done here, by taking the model's
outputs at positions Lp-1 .. Lp+T-2 for the response tokens at Lp .. Lp+T-1.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .._utils import resolve_backend
from ..ops.grpo.op import grpo_loss
from ..ops.logprobs.op import token_logprobs as _token_logprobs
from .model import amp
from .tasks import Task, score


def loss_backend(device) -> str:
    """Triton on CUDA; the PyTorch path on the CPU even under TRITON_INTERPRET=1 (the interpreter is a test
    tool, far too slow to train with)."""
    return resolve_backend("auto", device, interpret=False)


def token_logprobs(logits, tokens, temperature=1.0, mask=None):
    """(B, T, V), (B, T) -> per-token log pi and entropy, (B, T) fp32."""
    logp, ent = _token_logprobs(logits, tokens, temperature, mask=mask, backend=loss_backend(logits.device))
    return logp.float(), ent.float()


def policy_loss(logits, tokens, advantages, mask, old_logprobs, loss_kwargs: dict, ref_logprobs=None):
    """The fused GRPO loss op (``gxpo_kernels.ops.grpo_loss``) -> (loss, metrics)."""
    return grpo_loss(logits, tokens, advantages, mask, old_logprobs, ref_logprobs,
                     backend=loss_backend(logits.device), **loss_kwargs)


def encode_prompts(tokenizer, prompts: Sequence[str], device) -> tuple:
    """Left-pad the encoded prompts: (ids (P, Lp) int64, attention mask (P, Lp) int64)."""
    enc = [tokenizer.encode_prompt(p) for p in prompts]
    L = max(len(e) for e in enc)
    ids = torch.full((len(enc), L), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(enc), L), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, L - len(e):] = torch.tensor(e)
        mask[i, L - len(e):] = 1
    return ids.to(device), mask.to(device)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding (``generate`` builds the same ones itself)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def response_mask(resp: torch.Tensor, eos_id: int, pad_id: int):
    """Keep tokens up to and including the first EOS; later tokens become PAD with mask 0."""
    is_eos = resp == eos_id
    after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0     # strictly after the first EOS
    mask = ~after
    resp = torch.where(mask, resp, torch.full_like(resp, pad_id))
    return resp, mask


@contextlib.contextmanager
def _plain_generation_config(model, tokenizer):
    """``model.generate`` fills every option it is not given from ``model.generation_config`` (a ``--model``
    folder's generation_config.json: repetition_penalty, no_repeat_ngram_size, suppress_tokens, min_new_tokens,
    typical_p, ...), and those reshape the sampling distribution away from softmax(logits / T), the one the old
    log-probs and the loss score. Swap in a config that holds only the special tokens for the call."""
    from transformers import GenerationConfig

    saved = getattr(model, "generation_config", None)
    model.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                               bos_token_id=getattr(tokenizer, "bos_token_id", None))
    try:
        yield
    finally:
        model.generation_config = saved


@torch.no_grad()
def generate(model, tokenizer, ids, attn, *, max_new_tokens: int, do_sample: bool, temperature: float = 1.0,
             num_return_sequences: int = 1, synced_gpus: bool = False) -> torch.Tensor:
    """Response ids (B, T) after the prompt, B = P * num_return_sequences (each prompt's samples contiguous).

    Plain sampling from softmax(logits / temperature), or plain greedy decoding: the logits processors of the
    model's own generation config (repetition penalty, n-gram bans, suppressed tokens, ...) are not applied.
    ``synced_gpus``: keep forwarding until every rank is done (ZeRO-3 gathers parameters collectively inside
    each forward, so all ranks must run the same number of them)."""
    kw = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences,
              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True)
    if synced_gpus:
        kw["synced_gpus"] = True
    if do_sample:  # plain sampling so rollouts match the training log-softmax at this temperature
        kw.update(temperature=temperature, top_k=0, top_p=1.0)
    with _plain_generation_config(model, tokenizer):
        out = model.generate(input_ids=ids, attention_mask=attn, **kw)
    resp = out[:, ids.shape[1]:]
    if resp.shape[1] == 0:
        resp = torch.full((out.shape[0], 1), tokenizer.pad_token_id, dtype=out.dtype, device=out.device)
    return resp


def response_logits(model, prompt_ids, prompt_attn, resp, resp_mask):
    """Forward the full sequences; return logits (B, T, V) where ``[:, t]`` scores ``resp[:, t]``.

    The lm_head runs on the last T + 1 positions only (``logits_to_keep``): the prompt positions' logits would
    be (B, Lp, V) computed for nothing, and kept alive by the returned view (through the loss's backward, whose
    slice gradient would be a zero-filled (B, Lp + T, V) tensor)."""
    full = torch.cat([prompt_ids, resp], 1)
    attn = torch.cat([prompt_attn, resp_mask.long()], 1)
    T = resp.shape[1]
    out = model(input_ids=full, attention_mask=attn, position_ids=position_ids(attn), use_cache=False,
                logits_to_keep=T + 1)
    return out.logits[:, :T]          # positions Lp - 1 .. Lp + T - 2


# Element budget of the logits of one no-grad log-prob forward (rows x (T + 1) x V; 2**30 = 2 GiB in bf16):
# ``rollout_logprobs`` runs the rows in as few chunks as keep each under it (one chunk when the batch fits).
LOGPROB_CHUNK_ELEMENTS = 2 ** 30


def rollout_logprobs(model, ids, attn, resp, mask, temperature: float, synced_gpus: bool = False):
    """No-grad log pi and entropy ((B, T) fp32 each) of ``resp`` after the prompts ``ids`` / ``attn`` (B, Lp),
    forwarded in row chunks whose logits stay under ``LOGPROB_CHUNK_ELEMENTS``, or of one row where one row's
    exceed it (V = 151,936 at T + 1 = 3,073 is 4.7e8 logits per row). ``synced_gpus``: every rank runs the
    largest chunk count of all ranks (ZeRO-3 and FSDP gather parameters collectively inside each forward)."""
    B, L = resp.shape[0], resp.shape[1] + 1      # ``response_logits`` keeps the logits of T + 1 positions
    n = -(-B // max(1, LOGPROB_CHUNK_ELEMENTS // (L * model.config.vocab_size)))   # chunks of <= that many rows
    if synced_gpus:
        import torch.distributed as dist
        t = torch.tensor([n], device=resp.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        n = int(t)
    out = [token_logprobs(response_logits(model, *part), part[2], temperature, mask=part[3])
           for part in zip(ids.tensor_split(n), attn.tensor_split(n), resp.tensor_split(n), mask.tensor_split(n))]
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


@dataclass
class Rollout:
    prompt_ids: torch.Tensor   # (B, Lp) left padded, each prompt repeated G times
    prompt_attn: torch.Tensor  # (B, Lp)
    resp: torch.Tensor         # (B, T) response ids, PAD after the first EOS
    mask: torch.Tensor         # (B, T) bool, response tokens incl. the first EOS
    rewards: torch.Tensor      # (B,) fp32 in {0, 1}
    old_logp: torch.Tensor     # (B, T) fp32, log pi_old from a no-grad forward right after sampling
    entropy: float             # mean token entropy of the rollout policy over the mask
    ref_logp: Optional[torch.Tensor] = None   # (B, T) fp32, log pi_ref of the KL penalty (None: no penalty)


def rollout(model, tokenizer, task: Task, pairs: List[tuple], G: int, max_new_tokens: int,
            temperature: float = 1.0, *, ref_model=None, synced_gpus: bool = False, use_amp: bool = True) -> Rollout:
    """Sample G responses per prompt, score them, and take old log-probs (and the reference model's, for the KL
    penalty, when ``ref_model`` is given). ``use_amp=False`` computes in the weights' dtype (DeepSpeed engines own
    their precision); ``synced_gpus``: see ``generate``."""
    device = next(model.parameters()).device
    ids, attn = encode_prompts(tokenizer, [p for p, _ in pairs], device)
    was_training = model.training
    model.eval()
    amp_ = amp if use_amp else (lambda d: contextlib.nullcontext())
    with amp_(device):
        resp = generate(model, tokenizer, ids, attn, max_new_tokens=max_new_tokens, do_sample=True,
                        temperature=temperature, num_return_sequences=G, synced_gpus=synced_gpus)
    resp, mask = response_mask(resp, tokenizer.eos_token_id, tokenizer.pad_token_id)
    answers = [a for _, a in pairs for _ in range(G)]
    rewards = torch.tensor(score(task, tokenizer, resp.tolist(), answers), dtype=torch.float32, device=device)
    ids, attn = ids.repeat_interleave(G, 0), attn.repeat_interleave(G, 0)
    with torch.no_grad(), amp_(device):
        old_logp, ent = rollout_logprobs(model, ids, attn, resp, mask, temperature, synced_gpus)
        ref_logp = None
        if ref_model is not None:
            ref_logp = rollout_logprobs(ref_model, ids, attn, resp, mask, temperature, synced_gpus)[0]
    model.train(was_training)
    m = mask.float()
    entropy = float((torch.where(mask, ent, torch.zeros_like(ent)).sum() / m.sum().clamp(min=1)))
    return Rollout(ids, attn, resp, mask, rewards, old_logp.detach(), entropy, ref_logp)


@torch.no_grad()
def evaluate(model, tokenizer, task: Task, pairs: List[tuple], max_new_tokens: int, *, batch_size: int = 1024,
             do_sample: bool = False, n: int = 1, temperature: float = 1.0, synced_gpus: bool = False,
             use_amp: bool = True) -> List[float]:
    """Per-prompt exact-match score over ``pairs``: greedy (0/1), or the mean over ``n`` samples (pass@1).
    ``synced_gpus`` / ``use_amp``: see ``rollout``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    per_prompt: List[float] = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        ids, attn = encode_prompts(tokenizer, [p for p, _ in chunk], device)
        with amp(device) if use_amp else contextlib.nullcontext():
            resp = generate(model, tokenizer, ids, attn, max_new_tokens=max_new_tokens, do_sample=do_sample,
                            temperature=temperature, num_return_sequences=n, synced_gpus=synced_gpus)
        answers = [a for _, a in chunk for _ in range(n)]
        r = score(task, tokenizer, resp.tolist(), answers)
        per_prompt += [sum(r[j * n:(j + 1) * n]) / n for j in range(len(chunk))]
    model.train(was_training)
    return per_prompt
