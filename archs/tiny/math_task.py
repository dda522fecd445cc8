"""Synthetic arithmetic word problems, each with two ways to answer it.

The careful way is a worked solution that spells out every column of every operation (units
first, with carries and borrows written down), so that a model of a few million parameters can
learn each step instead of having to guess whole sums. The quick way writes the answer at once
(`<think>quick</think>\\boxed{85}`), which a model this small gets right on one-column problems
and seldom beyond. The warm-up mixes both, so the warm model picks either way; the reward pays
only correct answers, and GRPO learns to answer carefully (docs/tiny_model.md).

Train and test sets are disjoint by construction: every problem has a canonical key (its level
and numbers) and the key's hash decides the split, so a test problem's numbers never appear in
training, whatever its wording.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

SYSTEM_PROMPT = "Solve step by step. Put the final answer in \\boxed{}."

LEVELS = (1, 2, 3, 4, 5)
# The task's level mix (train and test alike): one- and two-column sums and differences, where the
# careful way is reliable for a model this small and the quick way is not (beyond one column).
# Levels 4 and 5 (products, two steps) stay available through `levels=`.
LEVEL_WEIGHTS = (0.2, 0.4, 0.4, 0.0, 0.0)
QUICK_THOUGHT = "quick"  # the whole reasoning of a quick answer
NAMES = ("Ann", "Ben", "Cal", "Dee", "Eli", "Fay", "Gus", "Ida", "Joe", "Kim", "Lou", "Max")
OBJECTS = ("apples", "books", "coins", "pens", "cards", "eggs", "shells", "stamps")


@dataclass(frozen=True)
class MathProblem:
    question: str
    answer: str  # gold, as a plain integer string
    solution: str  # worked solution: "<think>...</think>\boxed{answer}"
    level: int
    key: str  # canonical identity used for the train/test split

    @property
    def quick_solution(self) -> str:
        """The answer at once, with no worked steps: "<think>quick</think>\\boxed{answer}"."""
        return f"<think>{QUICK_THOUGHT}</think>\\boxed{{{self.answer}}}"


def is_quick(completion: str) -> bool:
    """Whether a completion answers the quick way (its reasoning is only QUICK_THOUGHT)."""
    return completion.lstrip().startswith(f"<think>{QUICK_THOUGHT}</think>")


# --------------------------------------------------------------------------- column arithmetic


def _digits(n: int, width: int) -> list[int]:
    """Digits of n, units first, zero-padded to width."""
    return [(n // 10**i) % 10 for i in range(width)]


# Each column step ends with " so <digits>": the result's digits found so far (prepended, units
# first; appended in long division). The closing result then copies the last of them instead of
# gathering digits from every column in reverse, the step a model this small got wrong most.


def worked_add(a: int, b: int) -> str:
    """'47+38: 7+8=15 c1 so 5; 4+3+1=8 so 85 =85'."""
    width = max(len(str(a)), len(str(b)))
    da, db = _digits(a, width), _digits(b, width)
    steps, carry, found = [], 0, ""
    for x, y in zip(da, db):
        s = x + y + carry
        lhs = f"{x}+{y}" + (f"+{carry}" if carry else "")
        carry = s // 10
        found = f"{s % 10}{found}"
        steps.append(f"{lhs}={s}" + (f" c{carry}" if carry else "") + f" so {found}")
    return f"{a}+{b}: " + "; ".join(steps) + f" ={a + b}"


def worked_sub(a: int, b: int) -> str:
    """'52-27: 2-7 b1 12-7=5 so 5; 5-1-2=2 so 25 =25' (requires a >= b)."""
    assert a >= b
    width = len(str(a))
    da, db = _digits(a, width), _digits(b, width)
    steps, borrow, found = [], 0, ""
    for x, y in zip(da, db):
        top = f"{x}-{borrow}" if borrow else f"{x}"
        x_eff = x - borrow
        if x_eff < y:
            d = x_eff + 10 - y
            step = f"{top}-{y} b1 {x_eff + 10}-{y}={d}"
            borrow = 1
        else:
            d = x_eff - y
            step = f"{top}-{y}={d}"
            borrow = 0
        found = f"{d}{found}"
        steps.append(f"{step} so {found}")
    return f"{a}-{b}: " + "; ".join(steps) + f" ={a - b}"


def worked_mul(a: int, b: int) -> str:
    """One-digit a times b: '3*47: 3*7=21 c2 so 1; 3*4+2=14 c1 so 41 =141'."""
    assert 0 <= a <= 9
    steps, carry, found = [], 0, ""
    for y in _digits(b, len(str(b))):
        s = a * y + carry
        lhs = f"{a}*{y}" + (f"+{carry}" if carry else "")
        carry = s // 10
        found = f"{s % 10}{found}"
        steps.append(f"{lhs}={s}" + (f" c{carry}" if carry else "") + f" so {found}")
    return f"{a}*{b}: " + "; ".join(steps) + f" ={a * b}"


def worked_div(a: int, d: int) -> str:
    """Long division by one digit, leading digit first: '72/3: 7/3=2 r1 so 2; 12/3=4 r0 so 24 =24'."""
    assert 2 <= d <= 9 and a % d == 0
    steps, rem, found = [], 0, ""
    for ch in str(a):
        cur = rem * 10 + int(ch)
        found += str(cur // d)
        steps.append(f"{cur}/{d}={cur // d} r{cur % d} so {found}")
        rem = cur % d
    return f"{a}/{d}: " + "; ".join(steps) + f" ={a // d}"


# --------------------------------------------------------------------------- problem generators


def _gen_level(level: int, rng: random.Random) -> tuple[str, tuple, str, list[str], int]:
    """Returns (kind, numbers, question template, worked lines, answer)."""
    if level == 1:  # one column: single digits
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        if rng.random() < 0.5:
            return "add", (a, b), "{n} has {a} {o}. {n} gets {b} more. How many {o} does {n} have now?", [worked_add(a, b)], a + b
        a, b = max(a, b), min(a, b)
        return "sub", (a, b), "{n} has {a} {o}. {n} gives away {b}. How many {o} are left?", [worked_sub(a, b)], a - b
    if level == 2:  # two columns: a two-digit and a one-digit number
        a, b = rng.randint(10, 49), rng.randint(1, 9)
        if rng.random() < 0.5:
            return "add", (a, b), "{n} has {a} {o}. {n} gets {b} more. How many {o} does {n} have now?", [worked_add(a, b)], a + b
        return "sub", (a, b), "{n} has {a} {o}. {n} gives away {b}. How many {o} are left?", [worked_sub(a, b)], a - b
    if level == 3:  # two two-digit numbers, or a fraction of a quantity
        if rng.random() < 0.6:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            if rng.random() < 0.5:
                return "add", (a, b), "A box holds {a} {o} and another holds {b} {o}. How many {o} are there in all?", [worked_add(a, b)], a + b
            a, b = max(a, b), min(a, b)
            return "sub", (a, b), "{n} had {a} {o} and lost {b} of them. How many {o} does {n} have?", [worked_sub(a, b)], a - b
        d = rng.choice((2, 3, 4, 5))
        q = rng.randint(2, 19)
        frac = {2: "half", 3: "a third", 4: "a quarter", 5: "a fifth"}[d]
        return f"div{d}", (d * q, d), "{n} has {a} {o} and keeps " + frac + " of them. How many {o} does {n} keep?", [worked_div(d * q, d)], q
    if level == 4:  # one-digit times two-digit
        a, b = rng.randint(2, 9), rng.randint(11, 49)
        return "mul", (a, b), "{n} buys {a} bags with {b} {o} in each bag. How many {o} does {n} buy?", [worked_mul(a, b)], a * b
    if level == 5:  # two steps: add then subtract
        a, b = rng.randint(10, 69), rng.randint(2, 29)
        c = rng.randint(2, a + b - 1)
        s = a + b
        return "addsub", (a, b, c), "{n} has {a} {o}, finds {b} more and then gives {c} away. How many {o} are left?", [worked_add(a, b), worked_sub(s, c)], s - c
    raise ValueError(f"unknown level {level!r}; levels are {LEVELS}")


def column_steps(problem: MathProblem) -> list[str]:
    """The column steps of a worked solution ("7+8=15 c1", "12/3=4 r0"), without operands, the digits
    found so far, or results."""
    work = problem.solution.removeprefix("<think>").split("</think>")[0]
    return [step.split(" so ")[0] for line in work.split(" | ")
            for step in line.split(": ", 1)[1].rsplit(" =", 1)[0].split("; ")]


def drill_text(rng: random.Random, n_steps: int, levels: tuple[int, ...] = LEVELS,
               level_weights: tuple[float, ...] | None = None) -> str:
    """`n_steps` column steps of random training problems, joined as in a worked solution: the
    single-digit facts, carries and borrows a model this small learns slowest in context."""
    steps: list[str] = []
    weights = level_weights if level_weights is not None else (LEVEL_WEIGHTS if tuple(levels) == LEVELS else None)
    while len(steps) < n_steps:
        p = make_problem(rng.choices(levels, weights=weights)[0], rng)
        if not _is_test_key(p.key, 0.1):
            steps += column_steps(p)
    return "; ".join(steps[:n_steps])


def _is_test_key(key: str, test_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return (h % 10_000) < test_fraction * 10_000


def make_problem(level: int, rng: random.Random) -> MathProblem:
    kind, nums, template, lines, answer = _gen_level(level, rng)
    names = dict(zip("abc", nums))
    question = template.format(n=rng.choice(NAMES), o=rng.choice(OBJECTS), **names)
    key = f"{level}:{kind}:" + ",".join(map(str, nums))
    solution = "<think>" + " | ".join(lines) + "</think>\\boxed{" + str(answer) + "}"
    return MathProblem(question, str(answer), solution, level, key)


def generate_problems(
    n: int,
    split: str = "train",
    seed: int = 0,
    levels: tuple[int, ...] = LEVELS,
    level_weights: tuple[float, ...] | None = None,
    test_fraction: float = 0.1,
    unique: bool = False,
) -> list[MathProblem]:
    """n problems of the given split ('train' or 'test'), deterministic for a seed.

    Levels are mixed by LEVEL_WEIGHTS unless `level_weights` (or a subset of `levels`) is given.
    unique=True never repeats a question (for test sets; the same numbers may recur in other
    words, so the level mix stays that of the task). Stops early if the split runs out.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad:
        raise ValueError(f"unknown levels {bad}; levels are {LEVELS}")
    if level_weights is None and tuple(levels) == LEVELS:
        level_weights = LEVEL_WEIGHTS  # the task's mix; a subset of levels is drawn uniformly
    if level_weights is not None and len(level_weights) != len(levels):
        raise ValueError(f"level_weights {tuple(level_weights)} must have one weight per level {tuple(levels)}")
    rng = random.Random(f"{seed}:{split}")
    want_test = split == "test"
    out: list[MathProblem] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n and attempts < 200 * n:
        attempts += 1
        level = rng.choices(levels, weights=level_weights)[0]
        p = make_problem(level, rng)
        if _is_test_key(p.key, test_fraction) != want_test:
            continue
        if unique:
            if p.question in seen:
                continue
            seen.add(p.question)
        out.append(p)
    return out


def as_chat(problem: MathProblem, system_prompt: str = SYSTEM_PROMPT) -> list[dict]:
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": problem.question},
    ]
