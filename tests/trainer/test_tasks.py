"""Guards the toy tasks and rollout plumbing of the trainer.

- exact answers for addition (3- and 2-digit) and sort; the checker scores wrong, malformed and truncated (no EOS) outputs 0;
- generation is deterministic per seed, and the train / val / sft pools are disjoint;
- the character tokenizer round-trips and stops at the first EOS;
- response masks end at the first EOS (later tokens become PAD), and left padding does not change the
  logits when position_ids come from the attention mask.
"""

import dataclasses
import importlib.util
import re

import pytest
import torch

from gxpo_kernels.trainer.model import build_tiny_model, tiny_config_dict
from gxpo_kernels.trainer.rollout import encode_prompts, position_ids, response_logits, response_mask
from gxpo_kernels.trainer.tasks import SPLITS, Addition2Task, AdditionTask, CharTokenizer, SortTask, get_task, score


@pytest.mark.parametrize("task, hi", [(AdditionTask(), 999), (Addition2Task(), 99)])
def test_addition_answers_exact(task, hi):
    seen = set()
    for prompt, ans in task.sample(400, "train", seed=3):
        a, b = prompt[:-1].split("+")
        assert prompt.endswith("=") and 10 <= int(a) <= hi and 10 <= int(b) <= hi
        assert ans == str(int(a) + int(b)) and len(ans) <= task.max_answer_chars
        seen.add(max(int(a), int(b)) > 99)
    assert (True in seen) is (hi > 99)   # three-digit operands exactly when the task has them


def test_sort_answers_exact():
    t = SortTask()
    for prompt, ans in t.sample(200, "train", seed=3):
        nums = [int(x) for x in prompt[:-1].split(",")]
        assert 3 <= len(nums) <= 5 and all(0 <= x <= 99 for x in nums)
        assert [int(x) for x in ans.split(",")] == sorted(nums)
        assert ans == ",".join(str(x) for x in sorted(nums))   # no spaces, no leading zeros


@pytest.mark.parametrize("name", ["addition", "addition2", "sort"])
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


def test_distinct_draw_beyond_the_split_fails_fast():
    """Asking for more distinct problems than a split holds stops once new ones stop coming: --val_size 10**9 on
    two-digit addition (2029 val problems) used to loop for ~2e11 draws; every split is still drawn whole."""
    import time
    t = Addition2Task()
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"could not draw 1000000000 distinct 'val' .*\(found 2029\)"):
        t.sample(10 ** 9, "val", seed=0, distinct=True)
    assert time.perf_counter() - t0 < 10
    whole = t.sample(2029, "val", seed=0, distinct=True)
    assert len(set(whole)) == 2029 and t.sample(1024, "val", seed=0, distinct=True) == whole[:1024]


def test_default_val_size_takes_a_small_split_whole():
    """With --val_size left at its default (None), validation takes 2048 problems, or the whole val split when it
    holds fewer: `train --task addition2` failed at start-up with the old default 2048 (the split holds 2029). An
    explicit size the split cannot fill is still refused."""
    from gxpo_kernels.trainer.config import TrainConfig
    from gxpo_kernels.trainer.tasks import DEFAULT_VAL_SIZE, validation_set
    cfg = TrainConfig(task="addition2").validate()
    assert cfg.val_size is None
    val = validation_set(cfg, Addition2Task())
    assert val == Addition2Task().sample(2029, "val", seed=0, distinct=True) and len(set(val)) == 2029
    big = validation_set(TrainConfig(task="addition").validate(), AdditionTask())
    assert big == AdditionTask().sample(DEFAULT_VAL_SIZE, "val", seed=0, distinct=True)
    with pytest.raises(ValueError, match="pass --val_size 2029 or less"):
        validation_set(TrainConfig(task="addition2", val_size=2030).validate(), Addition2Task())


@pytest.mark.parametrize("task", [AdditionTask(), Addition2Task(), SortTask()])
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


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_response_logits_run_the_head_on_the_response_positions_only(arch):
    """The lm_head runs on the T + 1 positions that score the response (logits_to_keep), not on the prompt's:
    the full (B, Lp + T, V) logits used to be built and kept alive by the returned view (through the logits
    loss's backward too). The returned logits equal the matching slice of a full forward."""
    t = AdditionTask()
    tok = CharTokenizer(t.alphabet)
    model = build_tiny_model(tiny_config_dict(tok.vocab_size, arch, hidden=32, intermediate=64), tok,
                             torch.device("cpu"), seed=0).eval()
    ids, attn = encode_prompts(tok, ["12+34=", "999+999=", "7+8="], "cpu")
    resp, mask = response_mask(torch.tensor([[4, 5, tok.EOS, tok.PAD]] * 3), tok.EOS, tok.PAD)
    shapes = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    with torch.no_grad():
        got = response_logits(model, ids, attn, resp, mask)
    hook.remove()
    assert shapes == [(3, resp.shape[1] + 1, tok.vocab_size)]
    assert got.shape == (3, resp.shape[1], tok.vocab_size)
    full, am = torch.cat([ids, resp], 1), torch.cat([attn, mask.long()], 1)
    with torch.no_grad():
        whole = model(input_ids=full, attention_mask=am, position_ids=position_ids(am), use_cache=False).logits
    torch.testing.assert_close(got, whole[:, ids.shape[1] - 1:-1], rtol=1e-5, atol=1e-5)


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


# ---------------------------------------------------------------------------------------------------------
# Real tasks: a local model folder with its own tokenizer + a JSONL dataset, math answer-equivalence reward
# ---------------------------------------------------------------------------------------------------------
HAS_MATH_VERIFY = importlib.util.find_spec("math_verify") is not None
needs_math_verify = pytest.mark.skipif(not HAS_MATH_VERIFY, reason="needs math-verify (the [math] extra)")
CHAT = ("{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _save_tiny_model_with_tokenizer(folder, chat_template=CHAT, arch="qwen2", spare_rows=16,
                                    special=(("pad_token", "<pad>"), ("bos_token", "<bos>"), ("eos_token", "<eos>"))):
    """A byte-level BPE tokenizer trained on a few sentences + a random tiny Qwen2 (or Llama: its folder's
    tokenizer loads without the Qwen2 tokenizer's default EOS) of its vocab + ``spare_rows``, saved."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([f"What is {a}+{b}? The answer is \\boxed{{{a + b}}}." for a in range(30) for b in range(9)],
                            vocab_size=300, special_tokens=["<pad>", "<bos>", "<eos>", "<|user|>", "<|assistant|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, **dict(special))
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(folder)
    # spare embedding rows, as real models have: AutoTokenizer may add a special token once config.json exists
    conf_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    conf = conf_cls(vocab_size=len(tok) + spare_rows, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                    tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model_cls(conf).save_pretrained(folder)
    return tok


def _write_jsonl(path, n=40, split=True):
    import json
    rows = []
    for i in range(n):
        rec = {"question": f"What is {i}+{i % 7}?", "solution": str(i + i % 7)}
        if split:
            rec["split"] = "test" if i % 4 == 0 else "train"
        rows.append(json.dumps(rec))
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("gold, response, want", [
    ("\\frac{1}{2}", "so the answer is \\boxed{0.5}", 1.0),
    ("0.5", "The answer is $\\frac{1}{2}$", 1.0),
    ("42", "After some work: \\boxed{42}", 1.0),
    ("42", "\\boxed{43}", 0.0),
    ("x^2+2x+1", "\\boxed{(x+1)^2}", 1.0),
    ("7", "no number here", 0.0),
    # MATH-style references: LaTeX without delimiters. Parsed as they stand, 2\sqrt{3} used to read as 2 (so
    # \boxed{2} scored 1 and the right answer 0) and \sqrt{2}, \pi, \dfrac{1}{2} did not parse (every response 0)
    ("2\\sqrt{3}", "The answer is \\boxed{2\\sqrt{3}}", 1.0),
    ("2\\sqrt{3}", "The answer is \\boxed{2}", 0.0),
    ("\\sqrt{2}", "\\boxed{\\sqrt{2}}", 1.0),
    ("\\dfrac{1}{2}", "\\boxed{\\frac{1}{2}}", 1.0),
    ("\\pi", "\\boxed{\\pi}", 1.0),
    ("x=\\pm 2", "\\boxed{2}", 0.0),
    ("\\text{(A)}", "\\boxed{\\text{(A)}}", 1.0),
    ("\\$18", "\\boxed{18}", 1.0),                      # an escaped dollar sign is no delimiter
    ("$2\\sqrt{3}$", "\\boxed{2\\sqrt{3}}", 1.0),     # delimited references are parsed as they stand
    ("\\(2\\sqrt{3}\\)", "\\boxed{2\\sqrt{3}}", 1.0),
    ("\\boxed{2\\sqrt{3}}", "so \\boxed{2\\sqrt{3}}", 1.0),
])
@needs_math_verify
def test_math_reward_answer_equivalence(gold, response, want):
    from gxpo_kernels.trainer.tasks import math_reward
    assert math_reward(response, gold) == want


def test_jsonl_task_splits_sampling_and_errors(tmp_path):
    from gxpo_kernels.trainer.tasks import JsonlTask
    p = _write_jsonl(tmp_path / "d.jsonl", n=40)
    t = JsonlTask(str(p), "question", "solution")
    assert len(t.pools["val"]) == 10 and len(t.pools["train"]) == 30 and t.reward_mode == "math"
    val = t.sample(100, "val", seed=0, distinct=True)      # capped at the pool, no repeats
    assert len(val) == 10 and len(set(val)) == 10 and val == t.sample(100, "val", seed=0, distinct=True)
    train = t.sample(64, "train", seed=1)
    assert len(train) == 64 and set(train) <= set(t.pools["train"])
    if HAS_MATH_VERIFY:                                                   # (the math reward needs the extra)
        assert t.reward("The sum is \\boxed{5}", False, "5") == 1.0      # math: graded without EOS too
    # a file without split fields is split by a hash of the prompt
    h = JsonlTask(str(_write_jsonl(tmp_path / "h.jsonl", n=200, split=False)), "question", "solution", "exact")
    assert all(h.pools[s] for s in ("train", "val")) and sum(map(len, h.pools.values())) == 200
    assert h.reward("5", True, "5") == 1.0 and h.reward("5", False, "5") == 0.0
    bad = tmp_path / "bad.jsonl"
    for text, match in [('{"question": "q"}\n', "needs the fields"), ("not json\n", "not a JSON object"),
                        ('{"question": 3, "solution": "1"}\n', "must be a string"),
                        ('{"question": "q", "solution": "1", "split": "train"}\n', "val split")]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=match):
            JsonlTask(str(bad), "question", "solution")


def test_chat_template_wraps_prompts(tmp_path):
    from transformers import AutoTokenizer
    from gxpo_kernels.trainer.tasks import HFTokenizerAdapter
    _save_tiny_model_with_tokenizer(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    with_chat, plain = HFTokenizerAdapter(hf), HFTokenizerAdapter(hf, chat_template=False)
    ids = with_chat.encode_prompt("What is 2+2?")
    assert with_chat.use_chat and not plain.use_chat
    assert ids[0] == hf.convert_tokens_to_ids("<|user|>") and ids[-1] == hf.convert_tokens_to_ids("<|assistant|>")
    assert hf.decode(ids) == "<|user|>What is 2+2?<|assistant|>"
    assert plain.encode_prompt("What is 2+2?")[0] == hf.bos_token_id


@needs_math_verify
def test_train_on_local_model_and_jsonl_end_to_end(tmp_path):
    """`train --model DIR --dataset FILE`: chat template, math reward, n samples per prompt, pass@k."""
    import json
    from gxpo_kernels.cli import main
    model = tmp_path / "model"
    _save_tiny_model_with_tokenizer(model)
    data = _write_jsonl(tmp_path / "d.jsonl", n=40)
    out = tmp_path / "o"
    main(["train", "--model", str(model), "--dataset", str(data), "--prompt_field", "question",
          "--answer_field", "solution", "--max_steps", "2", "--num_generations", "3", "--prompts", "2",
          "--max_completion_length", "6", "--eval_steps", "2", "--val_size", "8", "--pass1_size", "4",
          "--pass1_n", "3", "--pass_k", "1", "3", "--val_temperature", "0.7", "--sft_max_steps", "0",
          "--out", str(out), "--no_progress", "--quiet"])
    recs = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    cfg = json.loads((out / "config.json").read_text())["train"]
    assert cfg["dataset"] == str(data) and cfg["group"] == 3 and cfg["max_new_tokens"] == 6
    assert [r["step"] for r in recs] == [0, 1, 2]
    v = recs[-1]["val"]
    assert len(v["per_prompt"]) == 8 and 0 <= v["pass1"] <= v["pass@3"] <= 1
    assert all(r["response_len"] <= 6 for r in recs[1:])


def test_pass_at_k_estimator():
    from math import comb
    from gxpo_kernels.trainer.loop import pass_at_k
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - comb(3, 3) / comb(5, 3))
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_generation_ignores_the_models_own_sampling_settings():
    """Rollouts sample from softmax(logits / T), the distribution the old log-probs score, and validation decodes
    greedily, whatever the model's generation_config holds (a --model folder's generation_config.json often sets
    repetition_penalty, e.g. 1.05 for Qwen2.5 instruction models). Those settings used to reach ``generate``:
    with them a sampled token's probability differed from the scored one by up to 1.5 nats here."""
    from gxpo_kernels.trainer.rollout import generate

    t = AdditionTask()
    tok = CharTokenizer(t.alphabet)
    model = build_tiny_model(tiny_config_dict(tok.vocab_size, hidden=32, intermediate=64), tok,
                             torch.device("cpu"), seed=1).eval()
    ids, attn = encode_prompts(tok, ["12+34=", "999+999=", "10+10="], "cpu")

    def run():
        out = {}
        for do_sample, temperature in [(True, 1.0), (True, 0.7), (False, 1.0)]:
            torch.manual_seed(0)
            out[do_sample, temperature] = generate(model, tok, ids, attn, max_new_tokens=6, do_sample=do_sample,
                                                   temperature=temperature, num_return_sequences=4 if do_sample else 1)
        return out

    plain = run()
    gc = model.generation_config
    gc.repetition_penalty, gc.no_repeat_ngram_size, gc.min_new_tokens, gc.suppress_tokens = 3.0, 1, 4, [5]
    polluted = run()
    for key, want in plain.items():
        assert torch.equal(polluted[key], want), key
    assert model.generation_config is gc and gc.repetition_penalty == 3.0     # the model's own config is restored


def test_jsonl_number_answers_are_written_positionally(tmp_path):
    """A JSON number answer used to become ``str(float)``: 1e-07 or 1e+20, which math-verify parses as
    e - 7 and e + 20 (Euler's number), so the right answer 0.0000001 scored 0."""
    import json
    from gxpo_kernels.trainer.tasks import JsonlTask, math_reward
    answers = [1e-7, 1e20, 2.5e3, 1.5e-5, 0.1, 7, "1e-07"]
    want = ["0.0000001", "100000000000000000000", "2500.0", "0.000015", "0.1", "7", "1e-07"]
    p = tmp_path / "n.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": a, "split": "train"}) + "\n"
                         for i, a in enumerate(answers)) + '{"prompt": "v", "answer": 1, "split": "val"}\n')
    t = JsonlTask(str(p))
    assert [a for _, a in t.pools["train"]] == want
    if HAS_MATH_VERIFY:                                                   # (the math reward needs the extra)
        assert t.reward("so \\boxed{0.0000001}", True, t.pools["train"][0][1]) == 1.0
        assert t.reward("so \\boxed{100000000000000000000}", True, t.pools["train"][1][1]) == 1.0
        assert math_reward("so \\boxed{0.0000001}", str(1e-7)) == 0.0    # what the old answer text did
    p.write_text('{"prompt": "q", "answer": NaN, "split": "train"}\n')
    with pytest.raises(ValueError, match="finite"):
        JsonlTask(str(p))


def test_jsonl_split_field_values(tmp_path):
    """``validation`` (the Hugging Face name) places a record in val; an unknown split value is an error. Both
    used to fall through to the hash split, which puts about half of such test records into the train pool."""
    import json
    from gxpo_kernels.trainer.tasks import JsonlTask
    p = tmp_path / "s.jsonl"
    rows = [{"prompt": f"t{i}", "answer": "1", "split": "train"} for i in range(4)]
    rows += [{"prompt": f"v{i}", "answer": "2", "split": "validation"} for i in range(40)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = JsonlTask(str(p))
    assert len(t.pools["val"]) == 40 and len(t.pools["train"]) == 4 and not t.pools["sft"]
    for bad in ["dev", "Test", 3]:
        p.write_text("".join(json.dumps(r) + "\n" for r in rows + [{"prompt": "x", "answer": "1", "split": bad}]))
        with pytest.raises(ValueError, match="unknown split"):
            JsonlTask(str(p))


def _jsonl_bytes(extra: bytes = b"", prefix: bytes = b"", eol: bytes = b"\n") -> bytes:
    import json
    rows = [json.dumps({"prompt": f"q{i}", "answer": str(i), "split": "test" if i % 3 == 0 else "train"}).encode()
            for i in range(6)]
    return prefix + eol.join(rows) + eol + extra


@pytest.mark.parametrize("name, data", [
    ("bom", _jsonl_bytes(prefix=b"\xef\xbb\xbf")),              # a UTF-8 byte-order mark (Windows editors)
    ("crlf", _jsonl_bytes(eol=b"\r\n")),
    ("cr", _jsonl_bytes(eol=b"\r")),
    ("blank lines", _jsonl_bytes(prefix=b"\n \n", eol=b"\n\n")),
])
def test_jsonl_file_formats_that_load(tmp_path, name, data):
    """A BOM at the start of the file used to be read as part of the first record: 'd.jsonl:1: not a JSON
    object' for a valid file."""
    from gxpo_kernels.trainer.tasks import JsonlTask
    p = tmp_path / "d.jsonl"
    p.write_bytes(data)
    t = JsonlTask(str(p), reward="exact")
    assert t.pools["val"] == [("q0", "0"), ("q3", "3")]
    assert t.pools["train"] == [("q1", "1"), ("q2", "2"), ("q4", "4"), ("q5", "5")]


@pytest.mark.parametrize("extra, match", [
    ('{"prompt": "caf\xe9", "answer": "1"}\n'.encode("latin-1"), r"d\.jsonl:7: not UTF-8"),
    (b'{"prompt": "z\\ud800", "answer": "1"}\n', r"d\.jsonl:7: 'prompt' holds an unpaired UTF-16 surrogate"),
    (b'{"prompt": "z", "answer": "\\udc00"}\n', r"d\.jsonl:7: 'answer' holds an unpaired"),
    (b'[1, 2]\n', r"d\.jsonl:7: not a JSON object \(a JSON list\)"),
    (b'{"problem": "z", "answer": "1"}\n', r"d\.jsonl:7: .* lacks 'prompt' \(its fields: 'problem', 'answer'"),
    (b'{"prompt": "", "answer": "1"}\n', r"d\.jsonl:7: 'prompt' is empty"),
    (b'{"prompt": "z", "answer": " "}\n', r"d\.jsonl:7: 'answer' is empty"),
])
def test_jsonl_bad_records_name_the_file_and_line(tmp_path, extra, match):
    """Each used to escape as another error: a UnicodeDecodeError / UnicodeEncodeError naming neither the file
    nor the line, a list record reported as missing fields, and an empty prompt or answer accepted (an empty
    answer scores every response 0 under the math reward; an empty raw prompt gave a row of padding alone)."""
    from gxpo_kernels.trainer.tasks import JsonlTask
    p = tmp_path / "d.jsonl"
    p.write_bytes(_jsonl_bytes(extra))
    with pytest.raises(ValueError, match=match):
        JsonlTask(str(p), reward="exact")


@pytest.mark.parametrize("kind, match", [
    ("no eos", r"--model '.*m': the model's tokenizer has no eos_token_id"),
    ("small vocab", r"--model '.*m': vocab 290 is smaller than the tokenizer's 300"),
    ("failing chat template", r"--model '.*m': cannot encode the prompt .*TemplateError: needs a system turn.*"
                              "--no_chat_template"),
    ("no tokenizer", r"--model '.*m': a --dataset task needs a --model folder with a tokenizer"),
])
def test_model_tokenizer_problems_fail_before_overwrite(tmp_path, capsys, kind, match):
    """A tokenizer the run cannot use (no EOS, more ids than the model's embedding rows, a chat template that
    raises, none at all) used to be found only when the run built its policy, after ``--overwrite`` had emptied
    ``--out``: the earlier run was gone for a one-line error (and a template error was a traceback)."""
    import os
    from gxpo_kernels.cli import main
    m = tmp_path / "m"
    special = (("pad_token", "<pad>"), ("bos_token", "<bos>")) + ((("eos_token", "<eos>"),) if kind != "no eos" else ())
    template = "{{ raise_exception('needs a system turn') }}" if kind == "failing chat template" else CHAT
    _save_tiny_model_with_tokenizer(m, template, arch="llama", special=special,
                                    spare_rows=-10 if kind == "small vocab" else 16)
    if kind == "no tokenizer":
        for f in os.listdir(m):
            if f.startswith("tokenizer") or f.startswith("chat_template"):
                os.remove(m / f)
    data, out = _write_jsonl(tmp_path / "d.jsonl", n=12), tmp_path / "o"
    out.mkdir()
    (out / "records.jsonl").write_text('{"step": 0}\n')
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", str(m), "--dataset", str(data), "--prompt_field", "question", "--answer_field",
              "solution", "--max_steps", "1", "--sft_max_steps", "0", "--out", str(out), "--overwrite",
              "--no_progress"])
    assert e.value.code == 2
    assert (out / "records.jsonl").read_text() == '{"step": 0}\n'    # the earlier run is still there
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(match, err[0]), err              # one line: no model was loaded


def test_sft_split_missing_names_the_way_out(tmp_path):
    """A train/test file has no sft records; the warm start is on by default. The error says how to skip it."""
    from gxpo_kernels.trainer.config import TrainConfig
    from gxpo_kernels.trainer.tasks import check_inputs
    m = tmp_path / "m"
    _save_tiny_model_with_tokenizer(m)
    cfg = TrainConfig(model=str(m), dataset=str(_write_jsonl(tmp_path / "d.jsonl", n=12)), prompt_field="question",
                      answer_field="solution", val_size=4)
    with pytest.raises(ValueError, match=r"'sft' split is empty .*--sft_max_steps 0"):
        check_inputs(cfg)
    check_inputs(cfg.replace(sft=dataclasses.replace(cfg.sft, max_steps=0)))


def test_warm_start_cache_follows_the_dataset_records(tmp_path):
    """The cache key of a --model run's warm start held the dataset's path, not its records: after the file was
    edited, or with another --answer_field, the run loaded the warm start trained on the old answers."""
    import json
    from gxpo_kernels.trainer.config import SFTConfig, TrainConfig
    from gxpo_kernels.trainer.loop import prepare_warm_start
    m, data = tmp_path / "m", tmp_path / "d.jsonl"
    _save_tiny_model_with_tokenizer(m)

    def write(offset, path=data):
        path.write_text("".join(json.dumps({"q": f"What is {i}+{i % 7}?", "a": str(i + i % 7 + offset), "b": "0"})
                                + "\n" for i in range(40)))
    cfg = TrainConfig(model=str(m), dataset=str(data), prompt_field="q", answer_field="a", val_size=4,
                      max_new_tokens=3, cache_dir=str(tmp_path / "cache"), quiet=True, device="cpu",
                      sft=SFTConfig(max_steps=1, batch_size=3, check_every=1, check_size=2, pool_size=6))
    write(0)
    assert prepare_warm_start(cfg)["cached"] is False
    assert prepare_warm_start(cfg)["cached"] is True                      # same records: the cache
    write(100)
    assert prepare_warm_start(cfg)["cached"] is False                     # edited answers: trained anew
    assert prepare_warm_start(cfg.replace(answer_field="b"))["cached"] is False
    assert prepare_warm_start(cfg.replace(reward="exact"))["cached"] is False   # the check's reward
    write(100, tmp_path / "copy.jsonl")
    assert prepare_warm_start(cfg.replace(dataset=str(tmp_path / "copy.jsonl")))["cached"] is True


def test_missing_math_verify_fails_before_overwrite(tmp_path, capsys, monkeypatch):
    """Without the [math] extra, a --dataset run (math reward by default) used to fail at its first reward,
    after --overwrite had emptied --out."""
    import sys
    from gxpo_kernels.cli import main
    from gxpo_kernels.trainer.tasks import math_reward
    m, out = tmp_path / "m", tmp_path / "o"
    _save_tiny_model_with_tokenizer(m)
    data = _write_jsonl(tmp_path / "d.jsonl", n=12)
    out.mkdir()
    (out / "records.jsonl").write_text('{"step": 0}\n')
    monkeypatch.setitem(sys.modules, "math_verify", None)                # import math_verify -> ImportError
    argv = ["train", "--model", str(m), "--dataset", str(data), "--prompt_field", "question", "--answer_field",
            "solution", "--max_steps", "1", "--sft_max_steps", "0", "--val_size", "4", "--pass1_size", "0",
            "--max_completion_length", "3", "--out", str(out), "--overwrite", "--no_progress", "--quiet"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and (out / "records.jsonl").read_text() == '{"step": 0}\n'
    assert "math reward needs math-verify" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"gxpo-kernels\[math\]"):
        math_reward("\\boxed{1}", "1")
    assert main(argv + ["--reward", "exact"]) == 0                          # the exact reward needs no extra
