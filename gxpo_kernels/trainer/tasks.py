"""Toy tasks with verifiable rewards, generated on the fly from a fixed seed.

Each task yields (prompt, answer) text pairs, split into three disjoint pools by a hash of the problem:
``val`` (held-out validation), ``sft`` (warm start) and ``train`` (RL prompts). The checker gives reward 1 iff
the response text before the first EOS equals the answer *and* an EOS was emitted; anything else (wrong,
malformed, truncated) scores 0.

Tasks:
  ``addition``  ``a+b=`` -> digits of a+b, a, b uniform in [10, 999]
  ``sort``      ``3,14,2=`` -> ``2,3,14``: 3-5 numbers in [0, 99], ascending
  ``jsonl``     a user's JSONL file of ``{"prompt": ..., "answer": ...}`` records (``JsonlTask``), with the
                ``math`` reward: answer equivalence by ``math-verify`` (the checker TRL's accuracy reward uses)
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
from decimal import Decimal
from typing import Dict, List, Optional, Sequence, Tuple

SPLITS = ("train", "val", "sft")


class CharTokenizer:
    """Character-level tokenizer: ids 0, 1, 2 are PAD, BOS, EOS; then one id per character of ``alphabet``."""

    PAD, BOS, EOS = 0, 1, 2

    def __init__(self, alphabet: str = "0123456789+=,"):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet has repeated characters: {alphabet!r}")
        self.alphabet = alphabet
        self._to_id = {c: i + 3 for i, c in enumerate(alphabet)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id = self.PAD, self.BOS, self.EOS

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) + 3

    def encode_prompt(self, text: str) -> List[int]:
        """BOS followed by one id per character (ValueError on a character outside the alphabet)."""
        try:
            return [self.BOS] + [self._to_id[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the tokenizer alphabet {self.alphabet!r}") from None

    def encode_answer(self, text: str) -> List[int]:
        return [self._to_id[c] for c in text] + [self.EOS]

    def decode_response(self, ids: Sequence[int]) -> Tuple[str, bool]:
        """Return (text before the first EOS, whether an EOS was emitted). PAD/BOS inside the text -> '\\x00'."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.EOS:
                return "".join(out), True
            out.append(self.alphabet[i - 3] if i >= 3 and i - 3 < len(self.alphabet) else "\x00")
        return "".join(out), False


class HFTokenizerAdapter:
    """Wraps a Hugging Face tokenizer (for ``--model PATH`` directories that ship one) in the same interface."""

    def __init__(self, tok, chat_template: bool = True):
        self.tok = tok
        # instruction models are trained on their chat format: use it when the tokenizer ships one
        self.use_chat = bool(chat_template and getattr(tok, "chat_template", None))
        if tok.eos_token_id is None:
            raise ValueError("the model's tokenizer has no eos_token_id; the checker needs one")
        self.eos_token_id = tok.eos_token_id
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.bos_token_id = tok.bos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def encode_prompt(self, text: str) -> List[int]:
        if self.use_chat:
            text = self.tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                add_generation_prompt=True)
            return self.tok.encode(text, add_special_tokens=False)   # the template holds its own BOS
        ids = self.tok.encode(text, add_special_tokens=False)
        return ([self.bos_token_id] if self.bos_token_id is not None else []) + ids

    def encode_answer(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False) + [self.eos_token_id]

    def decode_response(self, ids: Sequence[int]) -> Tuple[str, bool]:
        ids = [int(i) for i in ids]
        if self.eos_token_id in ids:
            cut = ids.index(self.eos_token_id)
            return self.tok.decode(ids[:cut], skip_special_tokens=False), True
        return self.tok.decode(ids, skip_special_tokens=False), False


def _split_of(key: str, val_frac: float, sft_frac: float) -> str:
    """Deterministic split by a hash of the problem, so the pools are disjoint by construction."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2.0 ** 64
    if h < val_frac:
        return "val"
    if h < val_frac + sft_frac:
        return "sft"
    return "train"


class SplitTooSmallError(ValueError):
    """A split holds fewer distinct problems than were asked for; ``found``: how many it holds."""

    def __init__(self, message: str, found: int):
        super().__init__(message)
        self.found = found

    def __reduce__(self):   # pickles whole (a worker process may raise it)
        return type(self), (str(self), self.found)


class Task:
    """Base class: subclasses define ``name``, ``alphabet``, ``max_answer_chars``, ``_sample`` and ``answer``."""

    name = "task"
    alphabet = "0123456789+=,"
    max_answer_chars = 4
    val_frac, sft_frac = 0.25, 0.25   # fraction of the problem space in each held-out pool

    def _sample(self, rng: random.Random):
        raise NotImplementedError

    def prompt(self, problem) -> str:
        raise NotImplementedError

    def answer(self, problem) -> str:
        raise NotImplementedError

    def key(self, problem) -> str:
        return self.prompt(problem)

    def split(self, problem) -> str:
        return _split_of(f"{self.name}:{self.key(problem)}", self.val_frac, self.sft_frac)

    def sample(self, n: int, split: str, seed: int, distinct: bool = False) -> List[Tuple[str, str]]:
        """``n`` (prompt, answer) pairs from pool ``split``; deterministic in ``seed``."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        rng = random.Random(f"{self.name}/{split}/{seed}")
        out, seen, misses = [], set(), 0
        while len(out) < n:
            # give up once new problems stop coming (the split holds fewer than n): a bound on the draws since
            # the last new one, far above what the last problem of a split takes (~ the problem-space size)
            if misses > 10000 + 100 * len(out):
                raise SplitTooSmallError(f"could not draw {n} distinct {split!r} problems for task "
                                         f"{self.name!r} (found {len(out)})", len(out))
            p = self._sample(rng)
            k = self.key(p) if self.split(p) == split else None
            if k is None or (distinct and k in seen):
                misses += 1
                continue
            misses = 0
            seen.add(k)
            out.append((self.prompt(p), self.answer(p)))
        return out

    reward_mode = "exact"

    def reward(self, response_text: str, has_eos: bool, answer: str) -> float:
        """``exact``: 1.0 iff an EOS was emitted and the text before it equals the answer exactly.
        ``math``: 1.0 iff math-verify finds the response's final answer equivalent to ``answer`` (the response
        is graded even without EOS, as the math-reward protocols do). Else 0.0."""
        if self.reward_mode == "math":
            return math_reward(response_text, answer)
        return 1.0 if has_eos and response_text == answer else 0.0


class AdditionTask(Task):
    name = "addition"
    max_answer_chars = 4

    def _sample(self, rng):
        return rng.randint(10, 999), rng.randint(10, 999)

    def prompt(self, p):
        return f"{p[0]}+{p[1]}="

    def answer(self, p):
        return str(p[0] + p[1])


class Addition2Task(AdditionTask):
    """Two-digit addition (8,100 problems): GRPO's fast rise on the tiny model ends within a few hundred steps."""
    name = "addition2"
    max_answer_chars = 3

    def _sample(self, rng):
        return rng.randint(10, 99), rng.randint(10, 99)


class SortTask(Task):
    name = "sort"
    max_answer_chars = 14   # five two-digit numbers and four commas

    def _sample(self, rng):
        return tuple(rng.randint(0, 99) for _ in range(rng.randint(3, 5)))

    def prompt(self, p):
        return ",".join(map(str, p)) + "="

    def answer(self, p):
        return ",".join(map(str, sorted(p)))


def _has_math_delimiters(text: str) -> bool:
    """Whether ``text`` marks its math itself: an unescaped ``$``, or ``\\(`` / ``\\[``."""
    return re.search(r"(?<!\\)\$", text) is not None or "\\(" in text or "\\[" in text


def _math_verify():
    """math-verify's ``(parse, verify)``; ValueError naming the extra when it is not installed."""
    try:
        from math_verify import parse, verify
    except ImportError:
        raise ValueError("the math reward needs math-verify: pip install 'gxpo-kernels[math]' (or --reward "
                         "exact)") from None
    return parse, verify


def math_reward(response_text: str, answer: str) -> float:
    """1.0 iff ``math_verify.verify(parse(answer), parse(response))`` (LaTeX/expression extraction, boxed
    answers preferred, numeric tolerance of math-verify's defaults); 0.0 when either side does not parse.

    A reference answer without math delimiters (MATH's ``2\\sqrt{3}``, ``\\dfrac{1}{2}``, ``\\pi``, or ``42``)
    is parsed as one inline-math expression, ``$answer$``; one with delimiters as it stands."""
    parse, verify = _math_verify()
    # bare LaTeX parsed as it stands loses what math-verify cannot find without delimiters: 2\sqrt{3} -> 2
    gold = parse(answer) if _has_math_delimiters(answer) else (parse(f"${answer}$") or parse(answer))
    if not gold:
        return 0.0
    pred = parse(response_text)
    return 1.0 if pred and verify(gold, pred) else 0.0


def _has_lone_surrogate(text: str) -> bool:
    """Whether ``text`` holds a code point in U+D800..U+DFFF (JSON can escape one; UTF-8 cannot encode it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _number_text(x: float) -> str:
    """A JSON number in positional notation: ``str`` writes 1e-07 and 1e+20, which math-verify reads as
    e - 7 and e + 20 (Euler's number), and which no response states that way for the exact reward."""
    return format(Decimal(repr(x)), "f")


class JsonlTask(Task):
    """A user's dataset: one JSON object per line with a prompt and an answer field (any other keys ignored).

    UTF-8 (a leading byte-order mark is skipped), blank lines skipped; the prompt is a non-empty string, the
    answer a non-empty string or a finite number. A bad line is a ValueError naming ``path`` and the line.

    A number answer is used as written in positional notation (JSON ``1e-7`` -> ``0.0000001``, ``2.5e3`` ->
    ``2500.0``). Splits: a record's own ``split`` field (``train``, ``val``/``test``/``validation``, ``sft``;
    another value is an error) when it has one, else the hash split of the prompt (25% val, 25% sft, 50%
    train). ``sample`` draws with replacement for training and, with ``distinct=True`` (validation), returns
    the pool's first ``n`` records in a seeded shuffle (fewer when the pool is smaller).
    """

    name = "jsonl"
    alphabet = ""
    max_answer_chars = 511   # default completion cap of 512 tokens; set --max_completion_length for more

    def __init__(self, path: str, prompt_field: str = "prompt", answer_field: str = "answer",
                 reward: str = "math"):
        self.path, self.reward_mode = path, reward
        self.pools: Dict[str, List[Tuple[str, str]]] = {s: [] for s in SPLITS}
        # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first record;
        # surrogateescape: a byte that is not UTF-8 becomes a lone surrogate, reported with its line below
        with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
            for i, line in enumerate(f, 1):
                if _has_lone_surrogate(line):
                    raise ValueError(f"{path}:{i}: not UTF-8 text (save the file as UTF-8)")
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    raise ValueError(f"{path}:{i}: not a JSON object") from None
                if not isinstance(rec, dict):
                    raise ValueError(f"{path}:{i}: not a JSON object (a JSON {type(rec).__name__})")
                missing = [k for k in (prompt_field, answer_field) if k not in rec]
                if missing:
                    raise ValueError(f"{path}:{i}: a record needs the fields {prompt_field!r} and {answer_field!r}; "
                                     f"this one lacks {' and '.join(map(repr, missing))} (its fields: "
                                     f"{', '.join(map(repr, list(rec)[:8])) or 'none'}; see --prompt_field and "
                                     "--answer_field)")
                p, a = rec[prompt_field], rec[answer_field]
                if not isinstance(p, str) or not isinstance(a, (str, int, float)) or isinstance(a, bool):
                    raise ValueError(f"{path}:{i}: {prompt_field!r} must be a string and {answer_field!r} a "
                                     "string or number")
                if isinstance(a, float) and not math.isfinite(a):
                    raise ValueError(f"{path}:{i}: {answer_field!r} is {a}, not a finite number")
                for name, v in ((prompt_field, p), (answer_field, a)):
                    if isinstance(v, str) and not v.strip():
                        raise ValueError(f"{path}:{i}: {name!r} is empty")
                    if isinstance(v, str) and _has_lone_surrogate(v):   # a JSON \ud800 escape: no tokenizer takes it
                        raise ValueError(f"{path}:{i}: {name!r} holds an unpaired UTF-16 surrogate escape")
                split = rec.get("split")
                if split is None:
                    split = _split_of(f"jsonl:{p}", self.val_frac, self.sft_frac)
                else:
                    if isinstance(split, str):
                        split = {"test": "val", "validation": "val"}.get(split, split)
                    if split not in SPLITS:   # a test record must not land in the train pool by the hash
                        raise ValueError(f"{path}:{i}: unknown split {rec['split']!r}; use train, val (or test, "
                                         "validation) or sft, or leave the field out for the hash split")
                self.pools[split].append((p, _number_text(a) if isinstance(a, float) else str(a)))
        # what the records hold, whatever the file's layout: part of the warm-start cache key
        self.digest = hashlib.sha256(json.dumps(self.pools, sort_keys=True).encode()).hexdigest()[:16]
        if not self.pools["train"] or not self.pools["val"]:
            raise ValueError(f"{path}: need records in both the train and the val split "
                             f"(got {len(self.pools['train'])} train, {len(self.pools['val'])} val)")

    def sample(self, n: int, split: str, seed: int, distinct: bool = False) -> List[Tuple[str, str]]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        pool = self.pools[split]
        if not pool:
            raise ValueError(f"{self.path}: the {split!r} split is empty")
        rng = random.Random(f"jsonl/{split}/{seed}")
        if distinct:
            return rng.sample(pool, min(n, len(pool)))
        return [pool[rng.randrange(len(pool))] for _ in range(n)]


TASKS: Dict[str, type] = {"addition": AdditionTask, "addition2": Addition2Task, "sort": SortTask}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)} (or give --dataset)")
    return TASKS[name]()


def make_task(cfg) -> Task:
    """The task of a ``TrainConfig``: its JSONL dataset when ``cfg.dataset`` is set, else the toy task; the
    reward is ``cfg.reward`` when set (``exact`` / ``math``)."""
    if cfg.dataset is not None:
        task = JsonlTask(cfg.dataset, cfg.prompt_field, cfg.answer_field, cfg.reward or "math")
    else:
        task = get_task(cfg.task)
        if cfg.reward is not None:
            task.reward_mode = cfg.reward
    if task.reward_mode == "math":
        _math_verify()   # now, not at the first reward: check_inputs runs before --overwrite empties --out
    return task


DEFAULT_VAL_SIZE = 2048


def validation_set(cfg, task: Task) -> List[Tuple[str, str]]:
    """A run's fixed validation prompts: ``cfg.val_size`` distinct (prompt, answer) pairs of the val split; with
    ``val_size`` None, ``DEFAULT_VAL_SIZE`` of them, or the whole split when it holds fewer (a small task's
    default run must not fail on a size nobody asked for)."""
    try:
        return task.sample(DEFAULT_VAL_SIZE if cfg.val_size is None else cfg.val_size, "val", seed=0, distinct=True)
    except SplitTooSmallError as e:
        if cfg.val_size is None:   # the same draws, stopped at the split's size
            return task.sample(e.found, "val", seed=0, distinct=True)
        raise ValueError(f"val_size {cfg.val_size}: {e}; pass --val_size {e.found} or less") from None
    except ValueError as e:
        raise ValueError(f"val_size {cfg.val_size}: {e}") from None


def check_inputs(cfg) -> None:
    """Read up front what a run of ``cfg`` (a ``TrainConfig``) reads from its task: the ``--dataset`` file, the
    validation set and the warm start's split. The CLI and the speedup runner call it before ``--overwrite``
    empties ``--out``, so a bad file or size never costs the earlier run."""
    task = make_task(cfg)
    val = validation_set(cfg, task)
    if cfg.sft.max_steps > 0:
        try:
            task.sample(1, "sft", seed=cfg.init_seed)
        except ValueError as e:
            raise ValueError(f"{e} (the warm start trains on it; --sft_max_steps 0 skips the warm start)") from None
    if cfg.model is not None:
        from .model import check_local_model, load_local_tokenizer
        conf = check_local_model(cfg.model)
        tok = model_tokenizer(cfg, task, load_local_tokenizer(cfg.model), getattr(conf, "vocab_size", None))
        try:
            tok.encode_prompt(val[0][0])
        except Exception as e:   # a chat template may raise anything (jinja2's TemplateError, ...)
            raise ValueError(f"--model {cfg.model!r}: cannot encode the prompt {val[0][0][:60]!r} "
                             f"({type(e).__name__}: {str(e)[:200]}); --no_chat_template sends raw text") from None


def score(task: Task, tokenizer, response_ids, answers: Sequence[str]) -> List[float]:
    """Rewards for a batch of response id rows (generation output after the prompt)."""
    out = []
    for ids, ans in zip(response_ids, answers):
        text, has_eos = tokenizer.decode_response(ids)
        out.append(task.reward(text, has_eos, ans))
    return out


def model_tokenizer(cfg, task: Task, hf_tokenizer: Optional[object], model_vocab: Optional[int]):
    """The tokenizer of a ``--model`` run (``cfg.model`` set): the folder's own through ``HFTokenizerAdapter``
    (the built-in character tokenizer for a toy task when the folder ships none). ValueError naming the folder
    when it has no tokenizer for a dataset, the tokenizer has no EOS, or it has more ids than the model's
    ``model_vocab`` embedding rows (None: unknown, not checked)."""
    try:
        tok = make_tokenizer(task, hf_tokenizer, cfg.chat_template)
    except ValueError as e:
        raise ValueError(f"--model {cfg.model!r}: {e}") from None
    if model_vocab is not None and tok.vocab_size > model_vocab:
        raise ValueError(f"--model {cfg.model!r}: vocab {model_vocab} is smaller than the tokenizer's "
                         f"{tok.vocab_size}")
    return tok


def make_tokenizer(task: Task, hf_tokenizer: Optional[object] = None, chat_template: bool = True):
    if hf_tokenizer is None:
        if isinstance(task, JsonlTask):
            raise ValueError("a --dataset task needs a --model folder with a tokenizer")
        return CharTokenizer(task.alphabet)
    return HFTokenizerAdapter(hf_tokenizer, chat_template)
