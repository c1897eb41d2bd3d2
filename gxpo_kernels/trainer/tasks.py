"""Toy tasks with verifiable rewards, generated on the fly from a fixed seed.

Each task yields (prompt, answer) text pairs, split into three disjoint pools by a hash of the problem:
``val`` (held-out validation), ``sft`` (warm start) and ``train`` (RL prompts). The checker gives reward 1 iff
the response text before the first EOS equals the answer *and* an EOS was emitted; anything else (wrong,
malformed, truncated) scores 0.

Tasks:
  ``addition``  ``a+b=`` -> digits of a+b, a, b uniform in [10, 999] (spec toy-task.md)
  ``sort``      ``3,14,2=`` -> ``2,3,14``: 3-5 numbers in [0, 99], ascending
"""
from __future__ import annotations

import hashlib
import random
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

    def __init__(self, tok):
        self.tok = tok
        if tok.eos_token_id is None:
            raise ValueError("the model's tokenizer has no eos_token_id; the checker needs one")
        self.eos_token_id = tok.eos_token_id
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.bos_token_id = tok.bos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def encode_prompt(self, text: str) -> List[int]:
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
        out, seen, tries = [], set(), 0
        while len(out) < n:
            tries += 1
            if tries > 200 * n + 10000:
                raise ValueError(f"could not draw {n} distinct {split!r} problems for task {self.name!r}")
            p = self._sample(rng)
            if self.split(p) != split:
                continue
            k = self.key(p)
            if distinct and k in seen:
                continue
            seen.add(k)
            out.append((self.prompt(p), self.answer(p)))
        return out

    def reward(self, response_text: str, has_eos: bool, answer: str) -> float:
        """1.0 iff an EOS was emitted and the text before it equals the answer exactly; else 0.0."""
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


class SortTask(Task):
    name = "sort"
    max_answer_chars = 14   # five two-digit numbers and four commas

    def _sample(self, rng):
        return tuple(rng.randint(0, 99) for _ in range(rng.randint(3, 5)))

    def prompt(self, p):
        return ",".join(map(str, p)) + "="

    def answer(self, p):
        return ",".join(map(str, sorted(p)))


TASKS: Dict[str, type] = {"addition": AdditionTask, "sort": SortTask}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]()


def score(task: Task, tokenizer, response_ids, answers: Sequence[str]) -> List[float]:
    """Rewards for a batch of response id rows (generation output after the prompt)."""
    out = []
    for ids, ans in zip(response_ids, answers):
        text, has_eos = tokenizer.decode_response(ids)
        out.append(task.reward(text, has_eos, ans))
    return out


def make_tokenizer(task: Task, hf_tokenizer: Optional[object] = None):
    return CharTokenizer(task.alphabet) if hf_tokenizer is None else HFTokenizerAdapter(hf_tokenizer)
