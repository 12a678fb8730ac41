"""Maths with verifiable answers: problem generators, answer extraction and normalisation, checking.

The generators make problems whose answer is known exactly (a Fraction), so a model's solution
can be verified without a judge: rejection sampling keeps the solutions that reach it, the
evaluation counts exact matches, and online training uses the check as a reward. Every problem
is a pure function of (kind, seed, index): a held-out set drawn with another seed is fixed
forever, and the question texts of two sets can be compared for overlap.

Kinds (all multi-step except the plainest arithmetic):
- arithmetic: integer expressions with + - x / and brackets, division always exact;
- word: shopping with change, two-leg journeys, sharing, fractions of a book, ages, discounts,
  recipes scaled (2-3 steps each, integer or decimal answers);
- algebra: linear equations (answers may be fractions), a(x - b) = c, and 2x2 systems.

Answers are read from a reply the way maths evaluations do (the last \\boxed{...}, else "the
answer is ...", "Answer: ...", "#### ...", else the last number of the last line) and compared as
exact rationals: 3/4, 0.75, \\frac{3}{4}, \\dfrac34 and "$0.75" are the same answer; 1,234 is
1234; units and trailing words are dropped.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable

KINDS = ("arithmetic", "word", "algebra")
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class Problem:
    id: str
    kind: str
    question: str
    answer: Fraction
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def answer_text(self) -> str:
        return format_number(self.answer)

    def messages(self) -> list[dict]:
        """The chat prompt: the maths system prompt of Qwen2.5-Math, then the question."""
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": self.question}]

    def to_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "question": self.question, "answer": self.answer_text}


def format_number(value: Fraction) -> str:
    """Canonical text: integers plainly, terminating decimals as decimals, else a/b."""
    if value.denominator == 1:
        return str(value.numerator)
    d = value.denominator
    while d % 2 == 0:
        d //= 2
    while d % 5 == 0:
        d //= 5
    if d == 1:  # terminates
        digits = 0
        while (value * 10 ** digits).denominator != 1:
            digits += 1
        return f"{float(value):.{digits}f}"
    return f"{value.numerator}/{value.denominator}"


# ----------------------------------------------------------------------------------------------------
# Generators


NAMES = [("Ava", "she"), ("Ben", "he"), ("Chen", "he"), ("Dara", "she"), ("Emeka", "he"), ("Fatima", "she"),
         ("Gus", "he"), ("Hana", "she"), ("Ivan", "he"), ("Jade", "she"), ("Kofi", "he"), ("Lena", "she"),
         ("Mateo", "he"), ("Nia", "she"), ("Omar", "he"), ("Priya", "she"), ("Quinn", "she"), ("Ravi", "he")]
ITEMS = [("notebook", "notebooks"), ("apple", "apples"), ("pencil", "pencils"), ("ticket", "tickets"),
         ("sandwich", "sandwiches"), ("marble", "marbles"), ("sticker", "stickers"), ("cookie", "cookies")]


def _arithmetic(rng: random.Random) -> tuple[str, Fraction, dict]:
    """An integer expression of 3-4 numbers; every division exact, the result an integer."""
    while True:
        a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 12)
        shape = rng.randrange(6)
        if shape == 0:
            text, value = f"{a} + {b} \u00d7 {c}", a + b * c
        elif shape == 1:
            text, value = f"({a} + {b}) \u00d7 {c}", (a + b) * c
        elif shape == 2:
            text, value = f"{a * c} \u00f7 {c} + {b}", a + b
        elif shape == 3:
            d = rng.randint(2, 9)
            text, value = f"{a} \u00d7 {c} - {b} \u00d7 {d}", a * c - b * d
        elif shape == 4:
            d = rng.randint(2, 9)
            text, value = f"({a * d} - {b * d}) \u00f7 {d} + {c}", a - b + c
        else:
            d = rng.randint(2, 40)
            text, value = f"{a} \u00d7 ({b} - {c}) + {d}", a * (b - c) + d
        return f"What is {text}?", Fraction(value), {"expression": text}


def _word(rng: random.Random) -> tuple[str, Fraction, dict]:
    name, pronoun = rng.choice(NAMES)
    item, items = rng.choice(ITEMS)
    shape = rng.randrange(7)
    if shape == 0:
        count, price = rng.randint(2, 9), rng.randint(2, 15)
        bill = next(b for b in (10, 20, 50, 100, 200) if b >= count * price + 1)
        q = (f"{name} buys {count} {items} that cost ${price} each and pays with a ${bill} bill. "
             f"How much change, in dollars, does {pronoun} get back?")
        return q, Fraction(bill - count * price), {"template": "change"}
    if shape == 1:
        v1, t1, v2, t2 = rng.randint(3, 12) * 5, rng.randint(1, 4), rng.randint(3, 12) * 5, rng.randint(1, 4)
        q = (f"A train travels at {v1} km per hour for {t1} hours, then at {v2} km per hour for {t2} hours. "
             "How many kilometres does it travel in total?")
        return q, Fraction(v1 * t1 + v2 * t2), {"template": "journey"}
    if shape == 2:
        friends, each, more = rng.randint(2, 6), rng.randint(2, 8), rng.randint(3, 20)
        start = friends * each + rng.randint(1, 30)
        q = (f"{name} has {start} {items}. {pronoun.capitalize()} gives {each} {items} to each of {friends} friends "
             f"and then buys {more} more. How many {items} does {name} have now?")
        return q, Fraction(start - friends * each + more), {"template": "sharing"}
    if shape == 3:
        first, second = rng.choice([(Fraction(1, 4), Fraction(1, 3)), (Fraction(1, 3), Fraction(1, 2)),
                                    (Fraction(2, 5), Fraction(1, 2)), (Fraction(1, 5), Fraction(1, 4)),
                                    (Fraction(1, 2), Fraction(2, 3))])
        unit = first.denominator * second.denominator
        pages = unit * rng.randint(2, 12)
        rest = pages - pages * first
        left = rest - rest * second
        q = (f"A book has {pages} pages. {name} reads {first} of the book on Monday and {second} of the remaining "
             "pages on Tuesday. How many pages are left to read?")
        return q, Fraction(left), {"template": "book"}
    if shape == 4:
        younger, gap, years = rng.randint(3, 30), rng.randint(2, 15), rng.randint(2, 10)
        other = rng.choice([n for n, _ in NAMES if n != name])
        total = 2 * younger + gap + 2 * years
        q = (f"{name} is {gap} years older than {other}. In {years} years, the sum of their ages will be {total}. "
             f"How old is {other} now?")
        return q, Fraction(younger), {"template": "ages"}
    if shape == 5:
        price, percent = rng.randint(4, 80) * 5, rng.choice([10, 15, 20, 25, 30, 40, 50])
        q = (f"A jacket costs ${price}. It is on sale for {percent}% off. What is the sale price in dollars?")
        return q, Fraction(price) * (100 - percent) / 100, {"template": "discount"}
    cups, people, wanted = rng.randint(2, 6), rng.choice([2, 4, 6]), rng.choice([3, 6, 8, 9, 12])
    q = (f"A recipe uses {cups} cups of flour to make pancakes for {people} people. "
         f"How many cups of flour are needed for {wanted} people?")
    return q, Fraction(cups * wanted, people), {"template": "recipe"}


def _algebra(rng: random.Random) -> tuple[str, Fraction, dict]:
    shape = rng.randrange(3)
    if shape == 0:
        a, b = rng.choice([2, 3, 4, 5, 6, 7, 8, 9]), rng.randint(-20, 20)
        x = Fraction(rng.randint(-12, 12), rng.choice([1, 1, 1, 2, 3, 4]))
        c = a * x + b
        if c.denominator != 1:
            x, c = Fraction(round(x)), a * round(x) + b
        sign = "+" if b >= 0 else "-"
        return f"Solve for x: {a}x {sign} {abs(b)} = {c}", x, {"template": "linear"}
    if shape == 1:
        a, b, x = rng.randint(2, 9), rng.randint(1, 15), rng.randint(-10, 20)
        return f"Solve for x: {a}(x - {b}) = {a * (x - b)}", Fraction(x), {"template": "bracket"}
    x, y = rng.randint(-10, 15), rng.randint(-10, 15)
    a, b = rng.randint(1, 5), rng.randint(1, 5)
    ax, by = f"{a if a > 1 else ''}x", f"{b if b > 1 else ''}y"  # "x", not "1x"
    return (f"If x + y = {x + y} and {ax} - {by} = {a * x - b * y}, what is the value of x?", Fraction(x),
            {"template": "system"})


GENERATORS: dict[str, Callable[[random.Random], tuple[str, Fraction, dict]]] = {
    "arithmetic": _arithmetic, "word": _word, "algebra": _algebra}


def generate_problems(count: int, *, seed: int, kinds: tuple[str, ...] = KINDS) -> list[Problem]:
    """`count` problems, kinds in turn; problem i depends only on (seed, i). Duplicated question
    texts are skipped, so every problem of a set is distinct."""
    unknown = [k for k in kinds if k not in GENERATORS]
    if unknown or not kinds:
        raise ValueError(f"unknown maths problem kinds {unknown}; choose from {list(GENERATORS)}")
    problems, seen, i = [], set(), 0
    while len(problems) < count:
        kind = kinds[i % len(kinds)]
        rng = random.Random(f"qwen2-maths/{seed}/{i}")
        question, answer, meta = GENERATORS[kind](rng)
        i += 1
        if question in seen:
            continue
        seen.add(question)
        problems.append(Problem(f"{kind}-{seed}-{i - 1}", kind, question, answer, meta))
        if i > 50 * count + 1000:
            raise ValueError(f"could not draw {count} distinct problems of kinds {kinds}")
    return problems


# ----------------------------------------------------------------------------------------------------
# Reading answers


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS = re.compile(r"(?:final answer|the answer|answer)\s*(?:is|:|=)\s*(.+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+\s+\d+\s*/\s*\d+|-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*-?\d+)?|-?\.\d+")


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (nested braces balanced), or None."""
    found = None
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                found = text[start:i]
                break
    return found


def extract_answer(response: str) -> str | None:
    """The final answer a reply states, as text; None if it states none."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed.strip()
    if "####" in response:  # GSM8K's convention
        tail = response.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0] if tail else None
    matches = list(_ANSWER_IS.finditer(response))
    if matches:
        return matches[-1].group(1).strip()
    lines = [line for line in response.strip().splitlines() if line.strip()]
    if lines:
        numbers = _NUMBER.findall(_strip_latex(lines[-1]))
        if numbers:
            return numbers[-1]
    return None


def _strip_latex(text: str) -> str:
    number = r"\s*(-?\d+(?:\.\d+)?)\s*"
    text = re.sub(r"\\[dt]?frac\s*\{" + number + r"\}\s*\{" + number + r"\}", r"\1/\2", text)  # plain numbers
    text = re.sub(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"(\1)/(\2)", text)
    text = re.sub(r"\\[dt]?frac\s*(\d)\s*(\d)", r"\1/\2", text)  # \frac34
    text = re.sub(r"\\text\s*\{([^{}]*)\}|\\mathrm\s*\{([^{}]*)\}", lambda m: m.group(1) or m.group(2) or "", text)
    text = text.replace("\\$", "$").replace("\\%", "%").replace("\\!", "").replace("\\,", "").replace("{,}", ",")
    text = re.sub(r"\\(left|right|displaystyle|quad|qquad)\b", "", text)
    return text.replace("\u2212", "-").replace("$", "")


def parse_number(text: str | None) -> Fraction | None:
    """An answer's exact value, or None if it is not a single number. Accepts integers with
    thousands separators, decimals, fractions (a/b, \\frac, mixed "1 1/2"), a leading "x =",
    currency, a percent sign (read as the number shown: 25% -> 25) and trailing units or words."""
    if text is None:
        return None
    text = _strip_latex(text).strip().rstrip(".")
    text = re.sub(r"^[a-zA-Z]\s*=\s*", "", text)  # "x = 5"
    text = text.replace("(", "").replace(")", "") if re.fullmatch(r"[\s()\d/.,-]+", text) else text
    text = re.sub(r"^(?:[$\u20ac\u00a3\u00a5]\s*|[A-Za-z]+\s+)*", "", text)  # "$5", "USD 5", "about 5"
    mixed = re.match(r"^(-?\d+)\s+(\d+)\s*/\s*(\d+)", text)
    if mixed:
        whole, num, den = (int(g) for g in mixed.groups())
        if den == 0:
            return None
        return (abs(whole) + Fraction(num, den)) * (-1 if whole < 0 else 1)
    match = re.match(r"^(-?\d[\d,]*(?:\.\d+)?|-?\.\d+)(?:\s*/\s*(-?\d+(?:\.\d+)?))?", text)
    if not match:
        return None
    head = match.group(1).rstrip(",")  # "42, since ..." is 42
    if "," in head:
        groups = head.lstrip("-").split(".")[0].split(",")
        if not all(len(g) == 3 for g in groups[1:]) or not groups[0] or len(groups[0]) > 3:
            return None  # "1,2" is a list, not a thousands separator
        head = head.replace(",", "")
    value = Fraction(head)
    if match.group(2) is not None:
        denominator = Fraction(match.group(2))
        if denominator == 0:
            return None
        value /= denominator
    rest = text[match.end():].strip()
    if re.match(r"^[\d]", rest):  # "5 6": two numbers, not one answer
        return None
    return value


def is_correct(response: str, answer: Fraction) -> bool:
    """Whether the reply's stated final answer equals `answer` exactly."""
    value = parse_number(extract_answer(response))
    return value is not None and value == answer


# ----------------------------------------------------------------------------------------------------
# Evaluation


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound at 0 and at n)."""
    if total == 0:
        return 0.0, 1.0
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def evaluate(pretrained, problems: list[Problem], *, max_new_tokens: int = 512, progress: bool = True) -> dict:
    """Greedy exact-match accuracy: overall and per kind, with 95% Wilson intervals, and the
    per-problem records (question, expected, extracted, correct)."""
    from qwen2.inference.batch import sample_chats
    from qwen2.inference.sampling import SamplingParams

    replies = sample_chats(pretrained, [p.messages() for p in problems], k=1,
                           params=SamplingParams(max_new_tokens=max_new_tokens), progress=progress,
                           description="maths eval")
    records = []
    for problem, (reply,) in zip(problems, replies):
        extracted = extract_answer(reply.text)
        value = parse_number(extracted)
        records.append({**problem.to_dict(), "extracted": extracted, "finish_reason": reply.finish_reason,
                        "correct": value is not None and value == problem.answer, "response": reply.text})

    def score(rows: list[dict]) -> dict:
        right = sum(r["correct"] for r in rows)
        low, high = wilson_interval(right, len(rows))
        return {"correct": right, "total": len(rows), "accuracy": right / max(len(rows), 1), "ci95": [low, high]}

    kinds = sorted({p.kind for p in problems})
    return {"overall": score(records), "by_kind": {k: score([r for r in records if r["kind"] == k]) for k in kinds},
            "records": records}


def paired_difference(before: list[bool], after: list[bool], z: float = 1.96) -> dict:
    """After minus before on the same problems: the difference in accuracy with a 95% interval
    (Wald on the paired differences) and the discordant counts (McNemar's b, c)."""
    if len(before) != len(after) or not before:
        raise ValueError("paired_difference needs two equally long, non-empty lists")
    n = len(before)
    gained = sum(1 for b, a in zip(before, after) if a and not b)
    lost = sum(1 for b, a in zip(before, after) if b and not a)
    diff = (gained - lost) / n
    variance = ((gained + lost) / n - diff * diff) / n
    half = z * math.sqrt(max(variance, 0.0))
    return {"difference": diff, "ci95": [diff - half, diff + half], "gained": gained, "lost": lost, "n": n}


def reward(response: str, answer: Fraction, finish_reason: str = "stop") -> float:
    """The verifier as a reward: 1 for a finished reply whose final answer is right, else 0."""
    return 1.0 if finish_reason == "stop" and is_correct(response, answer) else 0.0
