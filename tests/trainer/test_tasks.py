"""Guards the toy tasks and rollout plumbing of the trainer.

- exact answers for addition and sort; the checker scores wrong, malformed and truncated (no EOS) outputs 0;
- generation is deterministic per seed, and the train / val / sft pools are disjoint;
- the character tokenizer round-trips and stops at the first EOS;
- response masks end at the first EOS (later tokens become PAD), and left padding does not change the
  logits when position_ids come from the attention mask.
"""

import pytest
import torch

from gxpo_kernels.trainer.model import build_tiny_model, tiny_config_dict
from gxpo_kernels.trainer.rollout import encode_prompts, position_ids, response_logits, response_mask
from gxpo_kernels.trainer.tasks import SPLITS, AdditionTask, CharTokenizer, SortTask, get_task, score


def test_addition_answers_exact():
    t = AdditionTask()
    for prompt, ans in t.sample(200, "train", seed=3):
        a, b = prompt[:-1].split("+")
        assert prompt.endswith("=") and 10 <= int(a) <= 999 and 10 <= int(b) <= 999
        assert ans == str(int(a) + int(b))


def test_sort_answers_exact():
    t = SortTask()
    for prompt, ans in t.sample(200, "train", seed=3):
        nums = [int(x) for x in prompt[:-1].split(",")]
        assert 3 <= len(nums) <= 5 and all(0 <= x <= 99 for x in nums)
        assert [int(x) for x in ans.split(",")] == sorted(nums)
        assert ans == ",".join(str(x) for x in sorted(nums))   # no spaces, no leading zeros


@pytest.mark.parametrize("name", ["addition", "sort"])
def test_deterministic_per_seed_and_disjoint_splits(name):
    t = get_task(name)
    assert t.sample(50, "train", seed=7) == t.sample(50, "train", seed=7)
    assert t.sample(50, "train", seed=7) != t.sample(50, "train", seed=8)
    pools = {s: {p for p, _ in t.sample(400, s, seed=1)} for s in SPLITS}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            assert not (pools[a] & pools[b]), f"{a} and {b} share prompts"
    val = t.sample(300, "val", seed=0, distinct=True)
    assert len({p for p, _ in val}) == 300


@pytest.mark.parametrize("task", [AdditionTask(), SortTask()])
def test_checker_scores(task):
    tok = CharTokenizer(task.alphabet)
    prompt, ans = task.sample(1, "val", seed=0)[0]
    ids = tok.encode_answer(ans)                       # answer + EOS
    wrong = ans[:-1] + ("1" if ans[-1] != "1" else "2")
    cases = {
        "exact": (ids + [tok.PAD], 1.0),
        "no_eos_truncated": (ids[:-1], 0.0),            # right text but the answer never ended
        "wrong": (tok.encode_answer(wrong), 0.0),
        "extra_char": (tok.encode_answer(ans + "0"), 0.0),
        "leading_zero": (tok.encode_answer("0" + ans), 0.0),
        "pad_inside": ([ids[0], tok.PAD] + ids[1:], 0.0),   # malformed: a non-character id inside the text
        "bos_inside": ([tok.BOS] + ids, 0.0),
        "empty": ([tok.EOS], 0.0),
        "after_eos_ignored": (ids + tok.encode_answer("999"), 1.0),
    }
    for name, (row, want) in cases.items():
        assert score(task, tok, [row], [ans]) == [want], name


def test_tokenizer_round_trip_and_errors():
    tok = CharTokenizer("0123456789+=,")
    assert tok.vocab_size == 16
    ids = tok.encode_prompt("12+34=")
    assert ids[0] == tok.BOS and len(ids) == 7
    assert tok.decode_response(tok.encode_answer("46")) == ("46", True)
    assert tok.decode_response(tok.encode_answer("46")[:-1]) == ("46", False)
    with pytest.raises(ValueError, match="alphabet"):
        tok.encode_prompt("1-2=")
    with pytest.raises(ValueError, match="unknown task"):
        get_task("multiplication")
    with pytest.raises(ValueError, match="split"):
        AdditionTask().sample(3, "test", seed=0)


def test_response_mask_stops_at_first_eos():
    tok = CharTokenizer()
    E, P = tok.EOS, tok.PAD
    resp = torch.tensor([[5, 6, E, 7, E], [5, 5, 5, 5, 5], [E, 4, 4, 4, 4]])
    out, mask = response_mask(resp, E, P)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert out.tolist() == [[5, 6, E, P, P], [5, 5, 5, 5, 5], [E, P, P, P, P]]


def test_left_padding_matches_unpadded():
    t = AdditionTask()
    tok = CharTokenizer(t.alphabet)
    model = build_tiny_model(tiny_config_dict(tok.vocab_size, hidden=32, intermediate=64), tok,
                             torch.device("cpu"), seed=0).eval()
    prompts = ["12+34=", "999+999="]                 # different lengths: the first row is left padded
    ids, attn = encode_prompts(tok, prompts, "cpu")
    assert attn[0, 0] == 0 and attn[1].all()
    assert position_ids(attn)[0].tolist()[-7:] == list(range(7))
    resp = torch.tensor([[4, 5, 6, tok.EOS, tok.PAD]] * 2)
    resp, mask = response_mask(resp, tok.EOS, tok.PAD)
    with torch.no_grad():
        batched = response_logits(model, ids, attn, resp, mask)
        for i, p in enumerate(prompts):
            one_ids, one_attn = encode_prompts(tok, [p], "cpu")
            alone = response_logits(model, one_ids, one_attn, resp[i:i + 1], mask[i:i + 1])
            torch.testing.assert_close(batched[i, :4], alone[0, :4], atol=1e-5, rtol=1e-5)


def test_training_forward_matches_generate_scores():
    """The causal shift and position ids of the training forward reproduce the logits ``generate`` sampled
    from (left-padded batch), so old log-probs and the loss score the right tokens."""
    from gxpo_kernels.trainer.rollout import token_logprobs

    t = AdditionTask()
    tok = CharTokenizer(t.alphabet)
    model = build_tiny_model(tiny_config_dict(tok.vocab_size, hidden=32, intermediate=64), tok,
                             torch.device("cpu"), seed=1).eval()
    ids, attn = encode_prompts(tok, ["12+34=", "999+999=", "10+10="], "cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, top_k=0, top_p=1.0,
                             temperature=1.0, max_new_tokens=5, pad_token_id=tok.PAD, eos_token_id=tok.EOS,
                             return_dict_in_generate=True, output_logits=True)
        resp, mask = response_mask(out.sequences[:, ids.shape[1]:], tok.EOS, tok.PAD)
        gen_logits = torch.stack(out.logits, 1)                      # (B, T, V) raw logits per new token
        ref = torch.log_softmax(gen_logits.float(), -1).gather(-1, resp.unsqueeze(-1)).squeeze(-1)
        logp, _ = token_logprobs(response_logits(model, ids, attn, resp, mask), resp, 1.0, mask=mask)
    torch.testing.assert_close(torch.where(mask, logp, 0.0), torch.where(mask, ref, 0.0), atol=1e-4, rtol=1e-4)
