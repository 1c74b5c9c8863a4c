#!/usr/bin/env python3
"""Deterministic sample-data generator for the post-training project.

Usage:  python data/make_data.py [--out data] [--seed 0]

Writes one-JSON-object-per-line files into --out (default: this script's folder):
  math_{train,test}.jsonl   word problems / equations / conversions / fractions with step-by-step solutions
  code_{train,test}.jsonl   small HumanEval/MBPP-style function tasks with asserts and reference solutions
  chat_{train,test}.jsonl   single- and multi-turn general conversations
  agent_{train,test}.jsonl  tool-use traces for the tools calculator / convert_units / lookup
  pref_{train,test}.jsonl   preference pairs {prompt, chosen, rejected}
  math_transfer.jsonl       held-out math of kinds and phrasings that no training file has (test only)
  lookup_table.json         the fact table behind the `lookup` tool

Determinism: every dataset uses its own random.Random instance seeded from --seed; nothing
iterates over sets or depends on hash(). Only the standard library is used.
Evaluators can `import make_data` and call `run_tool(name, arguments)` to execute the tools.
"""
import argparse
import itertools
import json
import math
import random
import re
import sys
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: verify.py
import verify as V  # noqa: E402

# ----------------------------------------------------------------------------- shared helpers

def norm(text):
    """Normalised form of a question/prompt used for de-duplication and train/test overlap checks."""
    return " ".join(re.findall(r"[a-z0-9]+|[-+*/=%]", text.lower()))


def fmt(x, as_fraction=False):
    """Format a number as a bare answer: 12, 2.5 or (with as_fraction) 3/4."""
    x = Fraction(x)
    if x.denominator == 1:
        return str(x.numerator)
    if as_fraction:
        return f"{x.numerator}/{x.denominator}"
    return f"{float(x):.6f}".rstrip("0").rstrip(".")


def join_and(parts):
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def split_pool(rng, make_one, key, n_train, n_test, exclude=()):
    """Draw items until n_train + n_test distinct ones (by normalised key) exist, shuffle, split.

    Because the pool is de-duplicated before splitting, train and test can never overlap.
    Keys in `exclude` (normalised) are rejected too, e.g. other datasets' test questions."""
    pool, seen, tries = [], set(exclude), 0  # `seen` is only used for membership tests, never iterated
    while len(pool) < n_train + n_test:
        tries += 1
        if tries > 200 * (n_train + n_test):
            raise RuntimeError(f"could not draw enough distinct items ({len(pool)} so far)")
        item = make_one(rng)
        k = norm(key(item))
        if k not in seen:
            seen.add(k)
            pool.append(item)
    rng.shuffle(pool)
    return pool[n_test:], pool[:n_test]


NAMES = ["Ava", "Ben", "Chloe", "David", "Emma", "Farah", "George", "Hana", "Ivan", "Jade", "Kofi", "Lena",
         "Mateo", "Nina", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Yuki", "Zoe", "Leo"]
ITEMS = [("pencil", "pencils"), ("notebook", "notebooks"), ("apple", "apples"), ("sandwich", "sandwiches"),
         ("book", "books"), ("toy car", "toy cars"), ("cupcake", "cupcakes"), ("bottle of juice", "bottles of juice"),
         ("ticket", "tickets"), ("ball", "balls"), ("candle", "candles"), ("mug", "mugs")]
THINGS = ["candies", "stickers", "marbles", "cookies", "stamps", "cards", "strawberries", "crayons"]

# ----------------------------------------------------------------------------- 1. math
# Each generator takes (rng, difficulty) and returns (question, steps, answer_string).

def math_shopping(rng, d):
    who = rng.choice(NAMES)
    kinds = rng.sample(ITEMS, 1 if d <= 2 else 2 if d <= 4 else 3)
    buys = [(rng.randint(2, 6 if d < 4 else 12), rng.randint(1, [5, 9, 12, 20, 25][d - 1]), pl) for _, pl in kinds]
    listing = join_and([f"{q} {pl} at ${p} each" for q, p, pl in buys])
    steps = [f"The {pl} cost {q} * {p} = {q * p} dollars." for q, p, pl in buys]
    total = sum(q * p for q, p, _ in buys)
    if len(buys) > 1:
        steps.append(f"The total cost is {' + '.join(str(q * p) for q, p, _ in buys)} = {total} dollars.")
    opener = rng.choice([f"{who} buys {listing}.", f"At the shop, {who} picks up {listing}.",
                         f"{who} goes to the market and gets {listing}."])
    if d == 1:
        ask = rng.choice([f"How much does {who} spend in total?", "What is the total cost in dollars?",
                          f"How many dollars does {who} pay?"])
        return f"{opener} {ask}", steps, str(total)
    bill = rng.choice([b for b in (10, 20, 50, 100, 200, 500, 1000) if b > total][:2])
    steps.append(f"The change is {bill} - {total} = {bill - total} dollars.")
    ask = rng.choice([f"How much change does {who} get?", f"How much money does {who} get back?",
                      f"How many dollars of change should {who} receive?"])
    return f"{opener} {who} pays with a ${bill} bill. {ask}", steps, str(bill - total)


def math_ages(rng, d):
    a, b = rng.sample(NAMES, 2)
    x, k, t = rng.randint(4, 15), rng.randint(2, 6 + 3 * d), rng.randint(2, 10)
    if d == 1:
        q = rng.choice([f"{a} is {x} years old. {b} is {k} years older than {a}. How old is {b}?",
                        f"{a} is {x} years old and {b} is {k} years older. What is {b}'s age?",
                        f"{b} is {k} years older than {a}, who is {x}. How old is {b}?"])
        return q, [f"{b} is {x} + {k} = {x + k} years old."], str(x + k)
    if d == 2:
        q = rng.choice([f"{a} is {x} years old. {b} is {k} years older than {a}. How old will {b} be in {t} years?",
                        f"{b} is {k} years older than {a}. {a} is {x} now. How old will {b} be {t} years from now?"])
        return q, [f"{b} is now {x} + {k} = {x + k} years old.",
                   f"In {t} years {b} will be {x + k} + {t} = {x + k + t}."], str(x + k + t)
    if d == 3:
        rel, m, x = rng.choice(["mother", "father", "aunt", "uncle"]), rng.randint(3, 4), rng.randint(8, 14)
        q = f"{a} is {x} years old. {a}'s {rel} is {m} times as old as {a}. How old will the {rel} be in {t} years?"
        return q, [f"The {rel} is {x} * {m} = {x * m} years old now.",
                   f"In {t} years the {rel} will be {x * m} + {t} = {x * m + t}."], str(x * m + t)
    if d == 4:
        q = f"{a} is {x} years old and {b} is {k} years older. What will the sum of their ages be in {t} years?"
        return q, [f"{b} is {x} + {k} = {x + k} years old.", f"In {t} years {a} will be {x} + {t} = {x + t}.",
                   f"In {t} years {b} will be {x + k} + {t} = {x + k + t}.",
                   f"The sum is {x + t} + {x + k + t} = {2 * x + k + 2 * t}."], str(2 * x + k + 2 * t)
    y = rng.randint(5, 30)
    s = 2 * y + k
    q = rng.choice([f"The sum of the ages of {a} and {b} is {s}. {a} is {k} years older than {b}. How old is {a}?",
                    f"{a} and {b} are {s} years old together, and {a} is {k} years older than {b}. How old is {a}?"])
    return q, [f"Without the age difference, {s} - {k} = {2 * y} is twice {b}'s age.",
               f"{b} is {2 * y} / 2 = {y} years old.", f"{a} is {y} + {k} = {y + k} years old."], str(y + k)


def math_rates(rng, d):
    who = rng.choice(NAMES)
    veh, lo, hi = rng.choice([("car", 4, 9), ("train", 6, 12), ("bus", 3, 6), ("cyclist", 1, 2)])
    s = rng.randint(lo, hi) * 10
    if d == 1:
        r, t = rng.randint(2, 12), rng.randint(2, 6)
        return rng.choice([
            (f"A {veh} travels at {s} km/h for {t} hours. How far does it go in km?",
             [f"Distance = speed * time = {s} * {t} = {s * t} km."], str(s * t)),
            (f"A printer prints {r} pages per minute. How many pages does it print in {t} minutes?",
             [f"It prints {r} * {t} = {r * t} pages."], str(r * t)),
            (f"{who} reads {r} pages every day. How many pages does {who} read in {t} days?",
             [f"{who} reads {r} * {t} = {r * t} pages."], str(r * t))])
    if d == 2:
        t = rng.randint(2, 5)
        q = rng.choice([f"A {veh} travels {s * t} km in {t} hours. What is its average speed in km/h?",
                        f"{who} drives {s * t} km in {t} hours. How fast is {who} driving on average, in km/h?"])
        return q, [f"Speed = distance / time = {s * t} / {t} = {s} km/h."], str(s)
    if d == 3:
        t = Fraction(rng.choice([1, 3, 5, 7, 9]), 2) if rng.random() < 0.5 else Fraction(rng.randint(2, 5))
        dist = s * t
        q = f"A {veh} needs to cover {fmt(dist)} km at {s} km/h. How many hours does the trip take?"
        return q, [f"Time = distance / speed = {fmt(dist)} / {s} = {fmt(t)} hours."], fmt(t)
    s2 = rng.randint(lo, hi) * 10
    if d == 4:
        t1, t2 = rng.randint(1, 3), rng.randint(1, 3)
    else:  # total time 2, 4 or 5 hours keeps the average speed a terminating decimal
        t1, t2 = rng.choice([(1, 1), (1, 3), (3, 1), (2, 2), (2, 3), (3, 2), (1, 4), (4, 1)])
    total = s * t1 + s2 * t2
    steps = [f"The first part is {s} * {t1} = {s * t1} km.", f"The second part is {s2} * {t2} = {s2 * t2} km.",
             f"The total distance is {s * t1} + {s2 * t2} = {total} km."]
    hrs = lambda t: f"{t} hour" if t == 1 else f"{t} hours"
    q = f"A {veh} travels at {s} km/h for {hrs(t1)} and then at {s2} km/h for {hrs(t2)}."
    if d == 4:
        return q + rng.choice([" How many km does it travel in total?", " How far does it go altogether, in km?"]), steps, str(total)
    avg = Fraction(total, t1 + t2)
    steps += [f"The total time is {t1} + {t2} = {t1 + t2} hours.",
              f"The average speed is {total} / {t1 + t2} = {fmt(avg)} km/h."]
    return q + " What is its average speed in km/h?", steps, fmt(avg)


def math_sharing(rng, d):
    who, thing = rng.choice(NAMES), rng.choice(THINGS)
    k, each = rng.randint(2, 4 + d), rng.randint(2, 5 + 3 * d)
    if d == 1:
        q = rng.choice([f"{who} has {k * each} {thing} and shares them equally among {k} friends. How many does each friend get?",
                        f"{k * each} {thing} are split equally between {k} children. How many {thing} does each child get?",
                        f"{who} puts {k * each} {thing} into {k} equal groups. How many {thing} are in each group?"])
        return q, [f"Each gets {k * each} / {k} = {each} {thing}."], str(each)
    if d == 2:
        keep = rng.randint(1, 9)
        q = f"{who} has {k * each + keep} {thing}, keeps {keep} and shares the rest equally among {k} friends. How many does each friend get?"
        return q, [f"{who} shares {k * each + keep} - {keep} = {k * each} {thing}.",
                   f"Each friend gets {k * each} / {k} = {each}."], str(each)
    if d == 3:
        rem = rng.randint(1, k - 1)
        n = k * each + rem
        if rng.random() < 0.5:
            q = f"{who} packs {n} {thing} into bags of {k}. How many {thing} are left over?"
            return q, [f"{n} / {k} = {each} full bags with a remainder.",
                       f"{each} bags hold {each} * {k} = {each * k} {thing}.", f"Left over: {n} - {each * k} = {rem}."], str(rem)
        q = f"{n} students need to travel in cars that each carry {k} students. How many cars are needed?"
        return q, [f"{n} / {k} = {each} with remainder {rem}.",
                   f"The remaining {rem} students need one more car, so {each} + 1 = {each + 1} cars."], str(each + 1)
    if d == 4:
        while True:  # pick packs * per so that it splits evenly among k friends (k different from both)
            packs, per = rng.randint(2, 6), rng.randint(3, 12)
            ks = [k for k in range(2, 10) if (packs * per) % k == 0 and k not in (packs, per)]
            if ks:
                k = rng.choice(ks)
                break
        q = f"{who} buys {packs} packs of {thing} with {per} in each pack and shares them equally among {k} friends. How many does each friend get?"
        return q, [f"There are {packs} * {per} = {packs * per} {thing}.", f"Each friend gets {packs * per} / {k} = {packs * per // k}."], str(packs * per // k)
    f = rng.randint(2, 4)
    total = f * k * each
    q = f"{who} has {total} {thing}. {who} gives 1/{f} of them to a sister and shares the rest equally among {k} friends. How many does each friend get?"
    return q, [f"The sister gets {total} / {f} = {total // f}.", f"The rest is {total} - {total // f} = {total - total // f}.",
               f"Each friend gets {total - total // f} / {k} = {fmt(Fraction(total - total // f, k))}."], fmt(Fraction(total - total // f, k))


def math_percent(rng, d):
    who = rng.choice(NAMES)
    item = rng.choice(["jacket", "bike", "lamp", "watch", "pair of shoes", "backpack", "chair", "guitar"])
    if d == 1:
        p, n = rng.choice([10, 50]), rng.randint(1, 9) * 10
        q = rng.choice([f"What is {p}% of {n}?", f"Find {p}% of {n}.", f"How much is {p} percent of {n}?"])
        return q, [f"{p}% of {n} is {n} * {p} / 100 = {fmt(Fraction(n * p, 100))}."], fmt(Fraction(n * p, 100))
    p, n = rng.choice([20, 25, 30, 40, 75]), rng.randint(1, 10) * 20
    part = n * p // 100
    if d == 2:
        q = rng.choice([f"A class has {n} students and {p}% of them wear glasses. How many students wear glasses?",
                        f"What is {p}% of {n}?", f"{who} scored {p}% on a test with {n} points. How many points did {who} get?"])
        return q, [f"{p}% of {n} is {n} * {p} / 100 = {part}."], str(part)
    steps = [f"The discount is {n} * {p} / 100 = {part} dollars.", f"The sale price is {n} - {part} = {n - part} dollars."]
    if d == 3:
        q = rng.choice([f"A {item} costs ${n}. It is on sale for {p}% off. What is the sale price in dollars?",
                        f"{who} wants a {item} that costs ${n}. The shop gives a {p}% discount. How much does {who} pay?"])
        return q, steps, str(n - part)
    if d == 4:
        k = rng.randint(2, 4)
        q = f"A {item} normally costs ${n}. Today everything is {p}% off. How much do {k} of them cost in dollars?"
        return q, steps + [f"{k} of them cost {k} * {n - part} = {k * (n - part)} dollars."], str(k * (n - part))
    n, up, down = rng.randint(1, 9) * 100, rng.choice([10, 20, 30, 50]), rng.choice([10, 20, 25, 50])
    mid = n + n * up // 100
    final = Fraction(mid * (100 - down), 100)
    q = f"A {item} costs ${n}. Its price goes up by {up}%, and later the new price is reduced by {down}%. What is the final price in dollars?"
    return q, [f"The increase is {n} * {up} / 100 = {n * up // 100}, so the new price is {n} + {n * up // 100} = {mid}.",
               f"The reduction is {mid} * {down} / 100 = {fmt(Fraction(mid * down, 100))}.",
               f"The final price is {mid} - {fmt(Fraction(mid * down, 100))} = {fmt(final)}."], fmt(final)


def _lin(a, var="x"):
    return var if a == 1 else f"{a}{var}"


def _signed(n):
    return f" + {n}" if n >= 0 else f" - {-n}"


def math_linear(rng, d):
    x = rng.randint(1, 15)
    if d == 1:
        b = rng.randint(1, 20)
        if rng.random() < 0.5:
            eq, steps = f"x + {b} = {x + b}", [f"Subtract {b} from both sides: x = {x + b} - {b} = {x}."]
        else:
            x += b
            eq, steps = f"x - {b} = {x - b}", [f"Add {b} to both sides: x = {x - b} + {b} = {x}."]
        ans = Fraction(x)
    elif d == 2:
        a = rng.randint(2, 9)
        c = a * x if rng.random() < 0.75 else rng.choice([c for c in range(1, a * 3) if c % a])
        ans = Fraction(c, a)
        eq, steps = f"{a}x = {c}", [f"Divide both sides by {a}: x = {c} / {a} = {fmt(ans, True)}."]
    elif d == 3:
        a, b = rng.randint(2, 9), rng.randint(-20, 20) or 5
        eq = f"{a}x{_signed(b)} = {a * x + b}"
        steps = [f"{'Subtract' if b >= 0 else 'Add'} {abs(b)} {'from' if b >= 0 else 'to'} both sides: {a}x = {a * x}.",
                 f"Divide both sides by {a}: x = {a * x} / {a} = {x}."]
        ans = Fraction(x)
    elif d == 4:
        a, b = rng.randint(3, 9), rng.randint(1, 20)
        c = rng.randint(1, a - 1)
        e = a * x + b - c * x
        eq = f"{a}x + {b} = {_lin(c)}{_signed(e)}"
        steps = [f"Subtract {_lin(c)} from both sides: {_lin(a - c)} + {b} = {e}.",
                 f"Subtract {b} from both sides: {_lin(a - c)} = {e} - {b} = {e - b}."]
        if a - c > 1:
            steps.append(f"Divide both sides by {a - c}: x = {e - b} / {a - c} = {x}.")
        ans = Fraction(x)
    else:
        a, b = rng.randint(2, 9), rng.randint(1, 10)
        if rng.random() < 0.5:
            eq = f"{a}(x + {b}) = {a * (x + b)}"
            steps = [f"Divide both sides by {a}: x + {b} = {x + b}.", f"Subtract {b} from both sides: x = {x + b} - {b} = {x}."]
        else:
            x = a * rng.randint(1, 8)
            eq = f"x/{a} + {b} = {x // a + b}"
            steps = [f"Subtract {b} from both sides: x/{a} = {x // a}.", f"Multiply both sides by {a}: x = {x // a} * {a} = {x}."]
        ans = Fraction(x)
    q = rng.choice([f"Solve for x: {eq}", f"Find x if {eq}.", f"What value of x satisfies {eq}?"])
    return q, steps, fmt(ans, as_fraction=True)


UNIT_PAIRS = [("kilometres", "metres", 1000, "kilometre"), ("metres", "centimetres", 100, "metre"),
              ("kilograms", "grams", 1000, "kilogram"), ("hours", "minutes", 60, "hour"),
              ("minutes", "seconds", 60, "minute"), ("litres", "millilitres", 1000, "litre")]
UNIT_CHAINS = [("hours", "minutes", "seconds", 60, 60), ("kilometres", "metres", "centimetres", 1000, 100),
               ("kilograms", "grams", "milligrams", 1000, 1000)]


def math_units(rng, d):
    big, small, f, big_sg = rng.choice(UNIT_PAIRS)
    ask = rng.choice(["How many {to} are in {v} {frm}?", "Convert {v} {frm} to {to}.", "{v} {frm} is equal to how many {to}?"])
    if d in (1, 2):
        v = Fraction(rng.randint(2, 12)) if d == 1 else rng.randint(1, 9) + Fraction(rng.choice([1, 2, 3]), 4)
        res = v * f
        return ask.format(v=fmt(v), frm=big, to=small), [
            f"There are {f} {small} in 1 {big_sg}, so {fmt(v)} {big} = {fmt(v)} * {f} = {fmt(res)} {small}."], fmt(res)
    if d == 3:
        v = rng.randint(1, 9) + Fraction(rng.choice([0, 1, 2]), 4)
        return ask.format(v=fmt(v * f), frm=small, to=big), [
            f"There are {f} {small} in 1 {big_sg}, so {fmt(v * f)} {small} = {fmt(v * f)} / {f} = {fmt(v)} {big_sg if v == 1 else big}."], fmt(v)
    if d == 4:
        a, b = rng.randint(2, 9), rng.randint(1, f - 1)
        q = rng.choice([f"How many {small} are in {a} {big} and {b} {small}?", f"Convert {a} {big} {b} {small} to {small}.",
                        f"A journey takes {a} {big} and {b} {small}. How long is that in {small}?" if big == "hours" else
                        f"Express {a} {big} and {b} {small} in {small}."])
        return q, [f"{a} {big} = {a} * {f} = {a * f} {small}.", f"Adding {b} {small} gives {a * f} + {b} = {a * f + b} {small}."], str(a * f + b)
    big, mid, small, f1, f2 = rng.choice(UNIT_CHAINS)
    v = rng.randint(2, 6)
    return ask.format(v=v, frm=big, to=small), [f"{v} {big} = {v} * {f1} = {v * f1} {mid}.",
                                                 f"{v * f1} {mid} = {v * f1} * {f2} = {v * f1 * f2} {small}."], str(v * f1 * f2)


def simplify_note(num, den):
    """'7/12', or '8/56 = 1/7' when the fraction can be simplified."""
    simple = fmt(Fraction(num, den), True)
    return f"{num}/{den}" if simple == f"{num}/{den}" else f"{num}/{den} = {simple}"


def math_fractions(rng, d):
    if d == 1:
        b = rng.randint(2, 6)
        a, k = rng.randint(1, b - 1), rng.randint(2, 10)
        who, thing = rng.choice(NAMES), rng.choice(THINGS)
        q = rng.choice([f"What is {a}/{b} of {b * k}?", f"Find {a}/{b} of {b * k}.",
                        f"{who} has {b * k} {thing} and gives away {a}/{b} of them. How many does {who} give away?"])
        steps = [f"1/{b} of {b * k} is {b * k} / {b} = {k}."] + ([f"{a}/{b} of {b * k} is {k} * {a} = {a * k}."] if a > 1 else [])
        return q, steps, str(a * k)
    if d == 2:
        b = rng.randint(3, 12)
        a, c = rng.randint(1, b - 1), rng.randint(1, b - 1)
        if rng.random() < 0.5 or a <= c:
            res, sym, word = Fraction(a + c, b), "+", f"add the numerators: {a} + {c} = {a + c}"
        else:
            res, sym, word = Fraction(a - c, b), "-", f"subtract the numerators: {a} - {c} = {a - c}"
        raw = f"{a + c if sym == '+' else a - c}/{b}"
        q = rng.choice([f"What is {a}/{b} {sym} {c}/{b}?", f"Calculate {a}/{b} {sym} {c}/{b}.", f"Work out {a}/{b} {sym} {c}/{b}."])
        steps = [f"The denominators are the same, so {word}.", f"The result is {raw}" +
                 (f", which simplifies to {fmt(res, True)}." if raw != fmt(res, True) else ".")]
        return q, steps, fmt(res, True)
    b, e = rng.sample(range(2, 9), 2)
    a, c = rng.randint(1, b - 1), rng.randint(1, e - 1)
    x, y = Fraction(a, b), Fraction(c, e)
    lcm = b * e // math.gcd(b, e)
    conv = f"Use the common denominator {lcm}: {a}/{b} = {a * lcm // b}/{lcm} and {c}/{e} = {c * lcm // e}/{lcm}."
    if d == 3:
        q = rng.choice([f"What is {a}/{b} + {c}/{e}?", f"Add {a}/{b} and {c}/{e}.", f"Calculate {a}/{b} + {c}/{e}."])
        return q, [conv, f"Add: {simplify_note(a * lcm // b + c * lcm // e, lcm)}."], fmt(x + y, True)
    if d == 4:
        q = rng.choice([f"What is {a}/{b} of {c}/{e}?", f"Multiply {a}/{b} by {c}/{e}.", f"What is {a}/{b} times {c}/{e}?"])
        return q, [f"Multiply the numerators: {a} * {c} = {a * c}.", f"Multiply the denominators: {b} * {e} = {b * e}.",
                   f"The product is {simplify_note(a * c, b * e)}."], fmt(x * y, True)
    while x + y >= 1:  # make sure something is left over
        a, c = max(1, a - 1), max(1, c - 1)
        x, y = Fraction(a, b), Fraction(c, e)
    conv = f"Use the common denominator {lcm}: {a}/{b} = {a * lcm // b}/{lcm} and {c}/{e} = {c * lcm // e}/{lcm}."
    p1, p2 = rng.sample(NAMES, 2)
    whole = rng.choice(["pizza", "cake", "pie", "chocolate bar"])
    q = rng.choice([f"{p1} eats {a}/{b} of a {whole} and {p2} eats {c}/{e} of it. What fraction of the {whole} is left?",
                    f"A {whole} is shared. {p1} takes {a}/{b} of it and {p2} takes {c}/{e}. What fraction remains?"])
    return q, [conv, f"Together they eat {simplify_note(a * lcm // b + c * lcm // e, lcm)}.",
               f"What is left is 1 - {fmt(x + y, True)} = {fmt(1 - x - y, True)}."], fmt(1 - x - y, True)


MATH_TYPES = [("shopping", math_shopping), ("ages", math_ages), ("rates", math_rates), ("sharing", math_sharing),
              ("percent", math_percent), ("linear_equation", math_linear), ("unit_conversion", math_units),
              ("fractions", math_fractions)]


def make_math(rng):
    kind, gen = rng.choice(MATH_TYPES)
    d = rng.choices([1, 2, 3, 4, 5], weights=[3, 3, 2, 2, 2])[0]
    q, steps, ans = gen(rng, d)
    return {"question": q, "solution": "\n".join(steps + [f"The answer is {ans}."]), "answer": ans,
            "difficulty": d, "type": kind}

# ----------------------------------------------------------------------------- 2. code
# Each family draws parameters and returns a task spec; build_code_task turns it into the record.

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lamp", "music", "green", "sun", "sky", "bread", "moon",
         "garden", "window", "level", "noon", "car", "a", "to", "elephant", "radar", "book", "tree", "orange", "rainbow", "picture"]


def rlist(r, lo=-5, hi=20, n_min=0, n_max=7):
    return [r.randint(lo, hi) for _ in range(r.randint(n_min, n_max))]


def rword(r, alphabet="abcdefgh", n_min=0, n_max=8):
    return "".join(r.choice(alphabet) for _ in range(r.randint(n_min, n_max)))


def rsentence(r, n_min=1, n_max=6):
    return " ".join(r.choice(WORDS) for _ in range(r.randint(n_min, n_max)))


def spec(entry, args, desc, body, oracle, gen, difficulty):
    return dict(entry=entry, args=args, desc=desc, body=body, oracle=oracle, gen=gen, difficulty=difficulty)


def c_add_k(r):
    k = r.randint(1, 30)
    if r.random() < 0.5:
        return spec("add_to_each", "xs", f"returns a new list with {k} added to every element.",
                    f"return [x + {k} for x in xs]", lambda xs: [x + k for x in xs], lambda r: (rlist(r),), 1)
    return spec("subtract_from_each", "xs", f"returns a new list with {k} subtracted from every element.",
                f"return [x - {k} for x in xs]", lambda xs: [x - k for x in xs], lambda r: (rlist(r),), 1)


def c_affine(r):
    a, b = r.randint(2, 9), r.randint(1, 15)
    return spec("scale_and_shift", "xs", f"returns a new list in which every element x is replaced by {a} * x + {b}.",
                f"return [{a} * x + {b} for x in xs]", lambda xs: [a * x + b for x in xs], lambda r: (rlist(r),), 1)


def c_count_char(r):
    c = r.choice("abcdefghijklmnopqrstuvwxyz")
    return spec("count_char", "s", f"returns how many times the character '{c}' appears in the string s.",
                f"return s.count('{c}')", lambda s: sum(ch == c for ch in s), lambda r: (rword(r, c + "xyzab"),), 1)


def c_sum_divisible(r):
    k, mode = r.randint(2, 9), r.choice(["sum", "count", "sum_not"])
    what = "the even numbers in xs" if k == 2 else f"the elements of xs that are divisible by {k}"
    if mode == "sum":
        return spec("sum_divisible", "xs", f"returns the sum of {what}.", f"return sum(x for x in xs if x % {k} == 0)",
                    lambda xs: sum(x for x in xs if x % k == 0), lambda r: (rlist(r, -10, 40),), 2)
    if mode == "count":
        return spec("count_divisible", "xs", f"returns how many of {what} there are.", f"return len([x for x in xs if x % {k} == 0])",
                    lambda xs: sum(1 for x in xs if x % k == 0), lambda r: (rlist(r, -10, 40),), 2)
    return spec("sum_not_divisible", "xs", f"returns the sum of the elements of xs that are NOT divisible by {k}.",
                f"return sum(x for x in xs if x % {k} != 0)", lambda xs: sum(xs) - sum(x for x in xs if x % k == 0),
                lambda r: (rlist(r, -10, 40),), 2)


def c_reverse_items(r):
    sep = r.choice([" ", ",", "-", ";", "|", "/", ":"])
    kind = r.choice(["order", "each", "upper"])
    gen = lambda r: (sep.join(r.choice(WORDS) for _ in range(r.randint(1, 5))),)
    intro = f"takes a string s whose items are separated by '{sep}' and returns"
    if kind == "order":
        return spec("reverse_items", "s", f"{intro} the items in reverse order, joined by '{sep}'.",
                    f"return {sep!r}.join(s.split({sep!r})[::-1])", lambda s: sep.join(list(reversed(s.split(sep)))), gen, 2)
    if kind == "each":
        return spec("reverse_each_item", "s", f"{intro} a string in which the letters of every item are reversed but the items stay in place.",
                    f"return {sep!r}.join(w[::-1] for w in s.split({sep!r}))", lambda s: sep.join("".join(reversed(w)) for w in s.split(sep)), gen, 2)
    return spec("capitalize_items", "s", f"{intro} a string in which the first letter of every item is upper-case, with the items joined by '{sep}'.",
                f"return {sep!r}.join(w[:1].upper() + w[1:] for w in s.split({sep!r}))",
                lambda s: sep.join(w.capitalize() for w in s.split(sep)), gen, 2)


def c_clamp(r):
    lo = r.randint(-10, 5)
    hi = lo + r.randint(3, 15)
    return spec("clamp_all", "xs", f"returns a new list where every element is clamped to the range [{lo}, {hi}] (values below {lo} become {lo}, values above {hi} become {hi}).",
                f"return [min(max(x, {lo}), {hi}) for x in xs]", lambda xs: [lo if x < lo else hi if x > hi else x for x in xs],
                lambda r: (rlist(r, -20, 30),), 2)


def c_fizz(r):
    a, b = r.sample([2, 3, 4, 5, 6, 7], 2)
    w1, w2 = r.sample(["Fizz", "Buzz", "Bang", "Pop", "Zap", "Boom", "Ping", "Tick"], 2)
    body = (f"if n % {a} == 0 and n % {b} == 0:\n    return '{w1}{w2}'\nif n % {a} == 0:\n    return '{w1}'\n"
            f"if n % {b} == 0:\n    return '{w2}'\nreturn str(n)")
    oracle = lambda n: (w1 if n % a == 0 else "") + (w2 if n % b == 0 else "") or str(n)
    return spec("label_number", "n", f"returns '{w1}{w2}' if n is divisible by both {a} and {b}, '{w1}' if n is divisible only by {a}, "
                f"'{w2}' if n is divisible only by {b}, and str(n) otherwise.", body, oracle, lambda r: (r.randint(1, 60),), 3)


def c_pair_extreme(r):
    gap, best, op = r.randint(1, 4), r.choice(["largest", "smallest"]), r.choice(["sum", "product"])
    sym, agg = ("+" if op == "sum" else "*"), (max if best == "largest" else min)
    where = "two adjacent elements" if gap == 1 else f"two elements that are exactly {gap} positions apart"
    return spec(f"{'max' if best == 'largest' else 'min'}_pair_{op}", "xs",
                f"returns the {best} {op} of {where} in the list xs, i.e. of xs[i] {sym} xs[i + {gap}] (xs has at least {gap + 1} elements).",
                f"return {agg.__name__}(xs[i] {sym} xs[i + {gap}] for i in range(len(xs) - {gap}))",
                lambda xs: agg([a + b if op == "sum" else a * b for a, b in zip(xs, xs[gap:])]),
                lambda r: (rlist(r, -10, 20, gap + 1, gap + 6),), 3)


def c_palindrome(r):
    if r.random() < 0.4:  # palindromic numbers in a given base
        b = r.randint(2, 10)
        def digits(n):
            out = []
            while True:
                n, d = divmod(n, b)
                out.append(d)
                if n == 0:
                    return out
        body = f"digits = []\nwhile True:\n    n, d = divmod(n, {b})\n    digits.append(d)\n    if n == 0:\n        break\nreturn digits == digits[::-1]"
        return spec("is_palindrome_in_base", "n", f"returns True if the digits of the non-negative integer n, written in base {b}, "
                    "read the same forwards and backwards, else False.", body, lambda n: digits(n) == list(reversed(digits(n))),
                    lambda r: (r.randint(0, 300),), 4)
    skip, fold = r.choice([" ", "-", ",", ".", "_", "*"]), r.random() < 0.5
    def gen(r):
        w = rword(r, "abcr" + skip, 1, 4)
        t = r.choice([w + w[::-1], w + "x" + w[::-1], w + "ab", w + skip + w[::-1]])
        return ("".join(ch.upper() if r.random() < 0.3 else ch for ch in t),)
    clean = lambda t: "".join(ch for ch in (t.lower() if fold else t) if ch != skip)
    return spec("is_palindrome", "s", f"returns True if the string s reads the same forwards and backwards after removing every {skip!r} "
                f"character{' and ignoring upper/lower case' if fold else ' (case-sensitive)'}, else False.",
                f"t = s{'.lower()' if fold else ''}.replace({skip!r}, '')\nreturn t == t[::-1]",
                lambda s: clean(s) == "".join(reversed(clean(s))), gen, 2)


def c_count_compare(r):
    t = r.randint(-10, 30)
    words, ops = ["greater than", "less than", "at least", "at most"], [">", "<", ">=", "<="]
    i = r.randrange(4)
    fns = [lambda x: x > t, lambda x: x < t, lambda x: x >= t, lambda x: x <= t]
    return spec("count_matching", "xs", f"returns how many elements of xs are {words[i]} {t}.",
                f"return sum(1 for x in xs if x {ops[i]} {t})", lambda xs: len([x for x in xs if fns[i](x)]),
                lambda r: (rlist(r, t - 10, t + 10),), 1)


def c_words_by_length(r):
    n = r.randint(2, 7)
    cond, test, fn = r.choice([(f"at least {n} letters", f">= {n}", lambda w: len(w) >= n),
                               (f"fewer than {n} letters", f"< {n}", lambda w: len(w) < n),
                               (f"exactly {n} letters", f"== {n}", lambda w: len(w) == n)])
    if r.random() < 0.5:
        return spec("select_words", "s", f"returns the list of words in s (separated by spaces) that have {cond}, in their original order.",
                    f"return [w for w in s.split() if len(w) {test}]", lambda s: [w for w in s.split(" ") if fn(w)], lambda r: (rsentence(r),), 2)
    return spec("count_words", "s", f"returns how many words in s (separated by spaces) have {cond}.",
                f"return sum(1 for w in s.split() if len(w) {test})", lambda s: len([w for w in s.split(" ") if fn(w)]), lambda r: (rsentence(r),), 2)


def c_power_sum(r):
    p = r.randint(2, 4)
    which, cond = r.choice([("", ""), ("positive ", " if x > 0"), ("negative ", " if x < 0"), ("odd ", " if x % 2 == 1")])
    keep = {"": lambda x: True, "positive ": lambda x: x > 0, "negative ": lambda x: x < 0, "odd ": lambda x: x % 2 == 1}[which]
    what = {2: "squares", 3: "cubes", 4: "fourth powers"}[p]
    return spec("power_sum", "xs", f"returns the sum of the {what} of the {which}elements of xs.", f"return sum(x ** {p} for x in xs{cond})",
                lambda xs: sum(x ** p for x in xs if keep(x)), lambda r: (rlist(r, -6, 6),), 2)


def c_digits(r):
    d = r.randint(0, 9)
    if r.random() < 0.5:
        return spec("count_digit", "n", f"returns how many times the digit {d} appears in the non-negative integer n.",
                    f"return str(n).count('{d}')", lambda n: sum(c == str(d) for c in str(n)),
                    lambda r: (int(str(r.randint(1, 9)) + rword(r, f"{d}0123456789", 0, 6)),), 2)
    d = min(d, 8)  # "greater than 9" would always give 0
    return spec("sum_digits_above", "n", f"returns the sum of the digits of the non-negative integer n that are greater than {d}.",
                f"return sum(int(c) for c in str(n) if int(c) > {d})", lambda n: sum(int(c) for c in str(n) if int(c) > d),
                lambda r: (r.randint(0, 10 ** 6),), 2)


def c_replace_char(r):
    a, b = r.sample("abcdefghijklmnopqrstuvwxyz", 2)
    return spec("replace_char", "s", f"returns a copy of the string s in which every '{a}' is replaced by '{b}'.",
                f"return s.replace('{a}', '{b}')", lambda s: "".join(b if ch == a else ch for ch in s),
                lambda r: (rword(r, a + "pqrs" + b),), 1)


def c_chunk(r):
    k, fill = r.randint(2, 6), r.choice([None, None, 0, -1, 9])
    chunks = lambda xs: [xs[i * k:(i + 1) * k] for i in range((len(xs) + k - 1) // k)]
    if fill is None:
        return spec("chunk", "xs", f"splits the list xs into consecutive chunks of length {k} (the last chunk may be shorter) and returns the list of chunks.",
                    f"return [xs[i:i + {k}] for i in range(0, len(xs), {k})]", chunks, lambda r: (rlist(r, 0, 9, 0, 11),), 3)
    return spec("chunk_padded", "xs", f"splits the list xs into consecutive chunks of length {k} and returns the list of chunks; "
                f"if the last chunk is too short, pad it with the value {fill} until it has length {k}.",
                f"out = [xs[i:i + {k}] for i in range(0, len(xs), {k})]\nif out:\n    out[-1] = out[-1] + [{fill}] * ({k} - len(out[-1]))\nreturn out",
                lambda xs: [c + [fill] * (k - len(c)) for c in chunks(xs)], lambda r: (rlist(r, 0, 9, 0, 11),), 4)


def c_rotate(r):
    k, left = r.randint(1, 9), r.random() < 0.5
    def oracle(xs):
        out = list(xs)
        for _ in range(k if out else 0):
            out = out[1:] + out[:1] if left else out[-1:] + out[:-1]
        return out
    body = f"if not xs:\n    return []\nk = {k} % len(xs)\n" + ("return xs[k:] + xs[:k]" if left else "return xs[len(xs) - k:] + xs[:len(xs) - k]")
    return spec(f"rotate_{'left' if left else 'right'}", "xs", f"returns the list xs rotated to the {'left' if left else 'right'} by {k} positions "
                "(elements wrap around; an empty list stays empty).", body, oracle, lambda r: (rlist(r, 0, 9, 0, 8),), 3)


def c_round_multiple(r):
    k, up = r.randint(2, 15), r.random() < 0.5
    if up:
        return spec("round_up_to_multiple", "n", f"returns the smallest multiple of {k} that is greater than or equal to the non-negative integer n.",
                    f"return (n + {k - 1}) // {k} * {k}", lambda n: next(m for m in range(n, n + k + 1) if m % k == 0),
                    lambda r: (r.randint(0, 100),), 2)
    return spec("round_down_to_multiple", "n", f"returns the largest multiple of {k} that is less than or equal to the non-negative integer n.",
                f"return n // {k} * {k}", lambda n: next(m for m in range(n, -1, -1) if m % k == 0), lambda r: (r.randint(0, 100),), 2)


def c_sum_multiples_below(r):
    a, b = sorted(r.sample(range(2, 10), 2))
    return spec("sum_multiples_below", "n", f"returns the sum of all positive integers less than n that are divisible by {a} or {b}.",
                f"return sum(i for i in range(1, n) if i % {a} == 0 or i % {b} == 0)",
                lambda n: sum(range(a, n, a)) + sum(range(b, n, b)) - sum(range(a * b // math.gcd(a, b), n, a * b // math.gcd(a, b))),
                lambda r: (r.randint(0, 60),), 3)


def c_caesar(r):
    k = r.randint(1, 25)
    body = (f"out = []\nfor ch in s:\n    if 'a' <= ch <= 'z':\n        out.append(chr((ord(ch) - ord('a') + {k}) % 26 + ord('a')))\n"
            "    else:\n        out.append(ch)\nreturn ''.join(out)")
    abc = "abcdefghijklmnopqrstuvwxyz"
    return spec("shift_letters", "s", f"shifts every lowercase letter in s forward by {k} places in the alphabet (wrapping around from 'z' to 'a') "
                "and leaves all other characters unchanged.", body, lambda s: "".join(abc[(abc.index(c) + k) % 26] if c in abc else c for c in s),
                lambda r: (rsentence(r, 1, 3) + r.choice(["", "!", " 42"]),), 4)


def c_kth(r):
    k, largest, distinct = r.randint(1, 4), r.random() < 0.5, r.random() < 0.5
    nth = ["", "", "second ", "third ", "fourth "][k]
    word = "largest" if largest else "smallest"
    if distinct:
        return spec(f"kth_{word}_distinct", "xs", f"returns the {nth}{word} distinct value in xs (duplicates count once; xs has at least {k} distinct values).",
                    f"return sorted(set(xs){', reverse=True' if largest else ''})[{k - 1}]",
                    lambda xs: sorted(dict.fromkeys(xs))[-k if largest else k - 1], lambda r: (rlist(r, -9, 9, k + 3, 9),), 3)
    return spec(f"kth_{word}", "xs", f"returns the {nth}{word} element of xs, counting duplicates separately (xs has at least {k} elements).",
                f"return sorted(xs{', reverse=True' if largest else ''})[{k - 1}]",
                lambda xs: sorted(xs)[len(xs) - k] if largest else sorted(xs)[k - 1], lambda r: (rlist(r, -9, 30, k, 8),), 3)


def c_prefix_mod(r):
    m = r.randint(5, 20)
    return spec("running_sums_mod", "xs", f"returns the list of running (prefix) sums of xs, each taken modulo {m}.",
                f"out, total = [], 0\nfor x in xs:\n    total += x\n    out.append(total % {m})\nreturn out",
                lambda xs: [sum(xs[:i + 1]) % m for i in range(len(xs))], lambda r: (rlist(r, 0, 25),), 3)


def c_remove_value(r):
    v = r.randint(-3, 15)
    return spec("remove_value", "xs", f"returns a new list with every occurrence of {v} removed from xs.",
                f"return [x for x in xs if x != {v}]", lambda xs: [x for x in xs if not x == v],
                lambda r: ([r.choice([v, v, r.randint(-3, 15)]) for _ in range(r.randint(0, 6))],), 1)


def c_fib_like(r):
    a, b = r.randint(0, 5), r.randint(1, 5)
    def oracle(n):
        seq = [a, b]
        while len(seq) <= n:
            seq.append(seq[-1] + seq[-2])
        return seq[n]
    return spec("sequence_term", "n", f"returns term number n (counting from 0) of the sequence that starts {a}, {b} and in which every later term "
                "is the sum of the two terms before it.", f"x, y = {a}, {b}\nfor _ in range(n):\n    x, y = y, x + y\nreturn x",
                oracle, lambda r: (r.randint(0, 15),), 4)


def c_count_pairs(r):
    t = r.randint(0, 20)
    body = f"count = 0\nfor i in range(len(xs)):\n    for j in range(i + 1, len(xs)):\n        if xs[i] + xs[j] == {t}:\n            count += 1\nreturn count"
    return spec("count_pairs_with_sum", "xs", f"returns the number of index pairs (i, j) with i < j such that xs[i] + xs[j] == {t}.", body,
                lambda xs: len([1 for i, x in enumerate(xs) for y in xs[i + 1:] if x + y == t]), lambda r: (rlist(r, 0, t, 0, 7),), 4)


def c_balanced(r):
    pairs, depth = r.choice(["()", "()[]", "()[]{}"]), r.choice([None, None, 1, 2, 3])
    opens, closes = pairs[0::2], pairs[1::2]
    body = (f"match = {dict(zip(closes, opens))!r}\nstack = []\nfor ch in s:\n    if ch in {opens!r}:\n        stack.append(ch)\n"
            + (f"        if len(stack) > {depth}:\n            return False\n" if depth else "")
            + "    elif not stack or stack.pop() != match[ch]:\n        return False\nreturn not stack")
    def oracle(s):
        prev, deepest, level = None, 0, 0
        for ch in s:
            level += 1 if ch in opens else -1
            deepest = max(deepest, level)
        while prev != s:
            prev = s
            for o, c in zip(opens, closes):
                s = s.replace(o + c, "")
        return s == "" and (depth is None or deepest <= depth)
    def gen(r):
        t = ""
        for _ in range(r.randint(0, 4)):
            i = r.randrange(len(opens))
            t = r.choice([opens[i] + t + closes[i], t + opens[i] + closes[i]])
        return (t if r.random() < 0.6 else rword(r, pairs, 1, 6),)
    limit = f" and no more than {depth} bracket{'s are' if depth > 1 else ' is'} ever open at the same time" if depth else ""
    return spec("is_balanced", "s", f"returns True if the brackets in s are properly matched and nested{limit}, else False. "
                f"s contains only the characters {pairs}.", body, oracle, gen, 5)


def c_run_length(r):
    sep = r.choice(["", "|", "-"])
    body = ("out = []\ni = 0\nwhile i < len(s):\n    j = i\n    while j < len(s) and s[j] == s[i]:\n        j += 1\n"
            f"    out.append(s[i] + str(j - i))\n    i = j\nreturn {sep!r}.join(out)")
    oracle = lambda s: sep.join(ch + str(len(list(run))) for ch, run in itertools.groupby(s))
    return spec("run_length_encode", "s", "returns the run-length encoding of s: every run of equal characters becomes the character followed by "
                f"the run length, and the pieces are joined with {sep!r} (e.g. 'aaab' -> {sep.join(['a3', 'b1'])!r}).",
                body, oracle, lambda r: ("".join(r.choice("abc") * r.randint(1, 4) for _ in range(r.randint(0, 4))),), 5)


CODE_FAMILIES = [c_add_k, c_affine, c_count_char, c_sum_divisible, c_reverse_items, c_clamp, c_fizz, c_pair_extreme,
                 c_palindrome, c_count_compare, c_words_by_length, c_power_sum, c_digits, c_replace_char, c_chunk, c_rotate,
                 c_round_multiple, c_sum_multiples_below, c_caesar, c_kth, c_prefix_mod, c_remove_value, c_fib_like,
                 c_count_pairs, c_balanced, c_run_length]


def check_code_task(task):
    """Run the reference solution against its own asserts in a fresh namespace; raise if anything fails."""
    ns = {}
    exec(task["solution"], ns)
    for test in task["tests"]:
        try:
            exec(test, ns)
        except Exception as exc:
            raise AssertionError(f"reference solution fails its test:\n{task['solution']}\n{test}\n{exc!r}") from exc


def make_code(rng):
    s = rng.choice(CODE_FAMILIES)(rng)
    head = f"def {s['entry']}({s['args']}):"
    want, tests, outputs = rng.randint(3, 5), [], []
    for _ in range(100):  # draw distinct inputs until we have 3-5 tests that do not all expect the same output
        inp = s["gen"](rng)
        call = f"{s['entry']}({', '.join(repr(a) for a in inp)})"
        expected = repr(s["oracle"](*inp))
        if any(t.startswith(f"assert {call} ==") for t in tests):
            continue
        if len(tests) == want - 1 and len(set(outputs + [expected])) == 1:
            continue  # keep looking for a test with a different expected output
        tests.append(f"assert {call} == {expected}")
        outputs.append(expected)
        if len(tests) == want:
            break
    assert len(tests) == want, f"could not draw enough distinct tests for {s['entry']}"
    task = {"prompt": f"Write a Python function `{s['entry']}({s['args']})` that {s['desc']}\n\n{head}", "entry_point": s["entry"],
            "tests": tests, "solution": head + "\n" + "\n".join("    " + line for line in s["body"].split("\n")) + "\n",
            "difficulty": s["difficulty"]}
    check_code_task(task)
    return task

# ----------------------------------------------------------------------------- 3. chat
# Small fact tables; fields separated by "|".

DEFINITIONS = [l.split("|") for l in """ephemeral|lasting for a very short time|fleeting|The beauty of the sunset was ephemeral.
benevolent|kind and well-meaning|kind|The benevolent teacher stayed late to help her students.
candid|honest and direct|frank|She gave a candid answer about her mistakes.
diligent|careful and hard-working|hard-working|He is a diligent student who never misses a deadline.
frugal|careful not to waste money or resources|thrifty|Being frugal helped them save for a new house.
gregarious|enjoying the company of other people|sociable|My gregarious cousin talks to everyone at parties.
meticulous|showing great attention to detail|thorough|The meticulous chef weighed every ingredient.
nostalgia|a warm longing for the past|wistfulness|Old photos fill me with nostalgia.
resilient|able to recover quickly from difficulties|tough|The resilient team bounced back after losing the first game.
ubiquitous|found everywhere|omnipresent|Smartphones have become ubiquitous.
verbose|using more words than needed|wordy|The report was so verbose that nobody finished reading it.
ambiguous|open to more than one interpretation|unclear|The instructions were ambiguous, so we asked for help.
procrastinate|to delay doing something that should be done|postpone|I tend to procrastinate when a task feels too big.
serendipity|finding something good by chance|happy accident|Meeting my best friend on a delayed train was pure serendipity.
pragmatic|dealing with problems in a practical way|practical|She took a pragmatic approach and fixed the biggest problem first.
eloquent|fluent and persuasive in speaking or writing|articulate|He gave an eloquent speech at the wedding.
tenacious|determined and not giving up easily|persistent|The tenacious climber reached the summit on her third attempt.
humble|having a modest view of your own importance|modest|Despite winning, the champion stayed humble.
lucid|clear and easy to understand|clear|The teacher gave a lucid explanation of fractions.
abundant|existing in large quantities|plentiful|Fresh fruit is abundant in summer.
cautious|careful to avoid danger or mistakes|careful|Be cautious when crossing a busy road.
obsolete|no longer used because something newer exists|outdated|Fax machines are almost obsolete.
punctual|arriving or happening at the agreed time|prompt|She is always punctual for meetings.
generous|willing to give more than is expected|giving|Our generous neighbour shared vegetables from his garden.
fragile|easily broken or damaged|delicate|Handle the glass vase carefully because it is fragile.
migrate|to move from one region to another, often with the seasons|relocate|Many birds migrate south for the winter.
empathy|the ability to understand and share the feelings of another person|compassion|Showing empathy helps friends feel understood.
curious|eager to know or learn something|inquisitive|The curious child asked how rainbows form.""".split("\n")]

SCIENCE = [l.split("|") for l in """Why is the sky blue?|The sky looks blue because air molecules scatter the short blue wavelengths of sunlight much more than the longer red ones, so blue light reaches our eyes from every direction.
What is photosynthesis?|Photosynthesis is the process plants use to turn sunlight, water and carbon dioxide into sugar and oxygen.
How many planets are in our solar system?|There are eight planets in our solar system: Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune.
At what temperature does water boil?|At sea level, water boils at 100 degrees Celsius, which is 212 degrees Fahrenheit.
Why do we have seasons?|We have seasons because Earth's axis is tilted, so each hemisphere gets more direct sunlight for part of the year and less for the rest.
What is the largest planet in our solar system?|Jupiter is the largest planet in our solar system. It is a gas giant more than eleven times wider than Earth.
How long does it take Earth to go around the Sun?|Earth takes about 365.25 days to orbit the Sun, which is why we add a leap day every four years.
What are the three common states of matter?|The three common states of matter are solid, liquid and gas.
What gas do humans need to breathe?|Humans need oxygen to breathe. Our lungs take it from the air and our blood carries it around the body.
What is the chemical formula for water?|The chemical formula for water is H2O: two hydrogen atoms bonded to one oxygen atom.
What causes the phases of the Moon?|The Moon's phases come from how much of its sunlit half we can see from Earth as it orbits us over about a month.
How fast does light travel?|Light travels at about 300,000 kilometres per second in a vacuum.
Why does ice float on water?|Ice floats because it is less dense than liquid water; water molecules spread out into an open crystal pattern when they freeze.
How many bones are in the adult human body?|An adult human body has 206 bones.
At what temperature does water freeze?|Water freezes at 0 degrees Celsius, which is 32 degrees Fahrenheit.
What is the hardest natural material?|Diamond is the hardest natural material. It is made of carbon atoms in a very strong crystal structure.
What is the main gas in Earth's atmosphere?|The main gas in Earth's atmosphere is nitrogen, which makes up about 78 percent of the air.
Which organ pumps blood around the body?|The heart pumps blood around the body, delivering oxygen and nutrients to every cell.
How does a rainbow form?|A rainbow forms when sunlight enters raindrops, bends and reflects inside them, and splits into its different colours.
What is the closest star to Earth?|The closest star to Earth is the Sun. The next closest is Proxima Centauri, about 4.2 light-years away.
Why do leaves change colour in autumn?|In autumn trees stop making green chlorophyll, so the yellow and orange pigments in the leaves become visible.
What is an atom?|An atom is the smallest unit of a chemical element. It has a nucleus of protons and neutrons surrounded by electrons.
Why do bees matter to farmers?|Bees pollinate many crops, carrying pollen from flower to flower so that plants can produce fruit and seeds.
What makes thunder?|Thunder is the sound of air expanding very quickly after being heated by a lightning bolt.
How far away is the Moon?|The Moon is on average about 384,400 kilometres from Earth.""".split("\n")]

CITIES = [l.split("|") for l in """Paris|France|French|the euro|the Eiffel Tower, the Louvre and Montmartre|croissants and crepes
Rome|Italy|Italian|the euro|the Colosseum, the Roman Forum and the Trevi Fountain|fresh pasta and gelato
Tokyo|Japan|Japanese|the Japanese yen|the Senso-ji temple, Shibuya Crossing and the Meiji Shrine|sushi and ramen
London|the United Kingdom|English|the pound sterling|the British Museum, the Tower of London and Buckingham Palace|fish and chips
Madrid|Spain|Spanish|the euro|the Prado Museum, the Royal Palace and Retiro Park|tapas and churros
Berlin|Germany|German|the euro|the Brandenburg Gate, Museum Island and the East Side Gallery|currywurst and pretzels
Amsterdam|the Netherlands|Dutch|the euro|the Rijksmuseum, the Anne Frank House and the canals|stroopwafels and Dutch cheese
Athens|Greece|Greek|the euro|the Acropolis, the Ancient Agora and the Plaka district|souvlaki and Greek salad
Lisbon|Portugal|Portuguese|the euro|Belem Tower, the Alfama district and Jeronimos Monastery|custard tarts and grilled sardines
Cairo|Egypt|Arabic|the Egyptian pound|the Pyramids of Giza, the Sphinx and the Egyptian Museum|koshari and falafel
New York|the United States|English|the US dollar|Central Park, the Statue of Liberty and Times Square|pizza and bagels
Mexico City|Mexico|Spanish|the Mexican peso|the Zocalo, Chapultepec Park and the nearby pyramids of Teotihuacan|tacos and tamales
Sydney|Australia|English|the Australian dollar|the Sydney Opera House, the Harbour Bridge and Bondi Beach|fresh seafood and meat pies
Bangkok|Thailand|Thai|the Thai baht|the Grand Palace, Wat Pho and the floating markets|pad thai and mango sticky rice
Istanbul|Turkey|Turkish|the Turkish lira|the Hagia Sophia, the Blue Mosque and the Grand Bazaar|kebabs and baklava
Prague|the Czech Republic|Czech|the Czech koruna|Prague Castle, the Charles Bridge and the Old Town Square|goulash and dumplings
Vienna|Austria|German|the euro|Schonbrunn Palace, St. Stephen's Cathedral and the State Opera|Wiener schnitzel and Sachertorte
Seoul|South Korea|Korean|the South Korean won|Gyeongbokgung Palace, Bukchon Hanok Village and N Seoul Tower|kimchi and bibimbap
Buenos Aires|Argentina|Spanish|the Argentine peso|the Recoleta Cemetery, La Boca and the Teatro Colon|grilled steak and empanadas
Rio de Janeiro|Brazil|Portuguese|the Brazilian real|Christ the Redeemer, Sugarloaf Mountain and Copacabana Beach|feijoada and cheese bread
Dublin|Ireland|English and Irish|the euro|Trinity College, Dublin Castle and St. Stephen's Green|Irish stew and soda bread
Marrakech|Morocco|Arabic and Berber|the Moroccan dirham|Jemaa el-Fnaa square, the Bahia Palace and the Majorelle Garden|tagine and couscous""".split("\n")]

RECIPES = [l.split("|") for l in """pancakes|flour, milk, eggs, a little sugar, baking powder and a pinch of salt|Whisk everything into a smooth batter, pour small amounts into a hot greased pan, and flip each pancake when bubbles appear on top.|about 20 minutes
boiled eggs|eggs and water|Lower the eggs into boiling water, cook them for 7 minutes for a soft yolk or 10 minutes for a hard yolk, then cool them in cold water.|about 10 to 15 minutes
a simple tomato pasta|pasta, canned tomatoes, garlic, olive oil, salt and fresh basil|Boil the pasta in salted water. Meanwhile, fry sliced garlic in olive oil, add the tomatoes and simmer for 10 minutes, then toss with the pasta and basil.|about 25 minutes
scrambled eggs|eggs, butter, salt and pepper|Beat the eggs with a pinch of salt, melt butter in a pan over low heat, and stir the eggs gently until they are just set.|about 5 minutes
guacamole|ripe avocados, lime juice, onion, tomato, coriander and salt|Mash the avocados, then stir in lime juice, finely chopped onion, tomato and coriander, and season with salt.|about 10 minutes
white rice|rice, water and salt|Rinse the rice, add about twice as much water and a pinch of salt, bring it to a boil, then cover and simmer on low heat for 15 minutes and let it rest for 5.|about 25 minutes
vegetable soup|onion, carrots, celery, potatoes, vegetable stock, salt and pepper|Soften chopped onion, carrot and celery in a little oil, add diced potatoes and stock, and simmer until everything is tender.|about 40 minutes
banana bread|ripe bananas, flour, sugar, eggs, melted butter and baking soda|Mash the bananas, mix in the butter, sugar and eggs, fold in the flour and baking soda, and bake at 175 degrees Celsius for about an hour.|about 1 hour and 15 minutes
a cheese omelette|eggs, butter, grated cheese, salt and pepper|Beat the eggs, pour them into a buttered pan, let them set, sprinkle cheese over one half and fold the omelette over.|about 10 minutes
hummus|canned chickpeas, tahini, lemon juice, garlic, olive oil and salt|Blend everything until smooth, adding a splash of water if it is too thick.|about 10 minutes
French toast|sliced bread, eggs, milk, cinnamon and butter|Dip the bread in eggs beaten with milk and cinnamon, then fry it in butter until golden on both sides.|about 15 minutes
a green salad|lettuce, cucumber, tomatoes, olive oil, lemon juice and salt|Wash and chop the vegetables, then toss them with olive oil, lemon juice and a pinch of salt just before serving.|about 10 minutes""".split("\n")]

ADVICE = [l.split("|") for l in """How can I sleep better?|go to bed at the same time every night|avoid screens for an hour before bed|keep your bedroom cool, dark and quiet
How can I focus better when studying?|put your phone in another room|work in 25-minute blocks with short breaks|start with the hardest topic while you are fresh
How do I stay motivated to exercise?|pick an activity you actually enjoy|schedule workouts like appointments|track your progress so you can see it
How can I save money each month?|write down everything you spend for a month|set up an automatic transfer to savings on payday|cook at home more often
How do I prepare for a job interview?|research the company and the role|practise answers to common questions out loud|prepare two or three questions to ask them
How can I reduce stress?|take a short walk outside every day|practise slow, deep breathing for a few minutes|talk to someone you trust about what is bothering you
How do I make friends in a new city?|join a club or class around a hobby you like|say yes to invitations, even small ones|volunteer for a local cause
How can I drink more water during the day?|keep a refillable bottle with you|drink a glass with every meal|add a slice of lemon or cucumber for flavour
How do I start learning a new language?|practise for a few minutes every day|learn the most common words first|listen to simple podcasts or shows in that language
How can I be more productive in the morning?|prepare your things the night before|do your most important task first|avoid checking email for the first hour
How do I keep my houseplants alive?|check the soil before watering instead of following a fixed schedule|put each plant in the right amount of light|use pots with drainage holes
How can I get better at public speaking?|rehearse out loud several times|start with a small, friendly audience|slow down and pause between your main points""".split("\n")]

EMAILS = [  # (purpose as the user says it, subject, body, short body, closing line, suitable recipients)
    ("asking for a day off on {day}", "Request for a day off on {day}",
     "I would like to request a day off on {day} for a personal matter. I will make sure my work is covered before then.",
     "Could I please take {day} off for a personal matter? My work will be covered.", "Thank you for considering my request.", ["manager"]),
    ("asking to move our meeting to {day}", "Rescheduling our meeting",
     "Something has come up and I will not be able to attend our meeting at the planned time. Would it be possible to move it to {day}?",
     "Could we move our meeting to {day}? Something has come up.", "I apologise for the inconvenience.", ["manager", "colleague", "professor", "teacher"]),
    ("thanking them for their help with {thing}", "Thank you",
     "I wanted to say thank you for your help with {thing}. I really appreciate the time and effort you put in.",
     "Thank you so much for your help with {thing}. I really appreciate it.", "With many thanks,", ["manager", "colleague", "professor", "teacher", "neighbour"]),
    ("asking for a short extension on {thing}", "Request for an extension",
     "I am writing to ask whether I could have a short extension on {thing}. I want to make sure the work is done properly, and I can submit it by {day}.",
     "Could I please have an extension on {thing} until {day}?", "Thank you for your understanding.", ["manager", "professor", "teacher"]),
    ("letting them know I will be late on {day}", "Running late on {day}",
     "I wanted to let you know that I will be about 30 minutes late on {day} because of an appointment. I apologise for any inconvenience.",
     "Just a note that I will be about 30 minutes late on {day}. Sorry for the inconvenience.", "Thank you for your understanding.", ["manager", "colleague", "teacher"]),
    ("inviting them to a small get-together on {day}", "Invitation for {day}",
     "I would love to invite you to a small get-together at my place on {day} evening. It would be lovely to see you, so please let me know if you can make it.",
     "Would you like to come to a small get-together at my place on {day} evening?", "Warm wishes,", ["colleague", "neighbour"]),
    ("asking them to fix the heating in my flat", "Heating not working",
     "The heating in my flat has stopped working. Could you please arrange for someone to look at it as soon as possible? I am at home most evenings.",
     "Could you please arrange a repair for the heating in my flat? It has stopped working.", "Thank you for your help.", ["landlord"]),
]
TITLES = ["Ms. Lee", "Mr. Patel", "Dr. Garcia", "Ms. Novak", "Mr. Okafor", "Mrs. Chen", "Mr. Silva", "Ms. Haddad"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
REPORTS = ["the project report", "the presentation", "the budget proposal", "the research essay", "the lab assignment"]

SMALL_TALK = [l.split("|") for l in """Hi! How are you today?|I'm doing well, thank you for asking! How can I help you today?
Good morning!|Good morning! I hope your day is off to a great start. What can I do for you?
Hello there.|Hello! It's nice to hear from you. What would you like to talk about?
What's your favourite colour?|I don't have personal preferences, but many people love blue because it reminds them of the sky and the sea. What's yours?
I'm bored. Any ideas?|How about going for a short walk, trying a new recipe, reading a few chapters of a book or learning a simple card trick?
Can you tell me a joke?|Sure! Why did the scarecrow win an award? Because he was outstanding in his field.
What can you do?|I can answer questions, explain ideas, help you write things like emails, give simple advice and chat about everyday topics.
I just got a new puppy!|Congratulations! Puppies bring so much joy. Have you picked a name yet?
It's raining again today.|Rainy days can be a nice excuse to stay in with a warm drink and a good book or film.
I passed my exam!|Congratulations! All your hard work paid off, and you should be proud of yourself.
I had a long day at work.|I'm sorry to hear that. Try to take some time this evening to rest and do something you enjoy.
Do you like music?|I can't listen to music myself, but I'm happy to talk about it! What kind of music do you enjoy?""".split("\n")]

THANKS_USER = ["Thanks!", "Thank you, that helps.", "Great, thanks a lot!", "Perfect, thank you."]
THANKS_BOT = ["You're welcome! Let me know if there's anything else I can help with.", "Happy to help! Have a great day.",
              "Glad I could help!", "Any time! Feel free to ask if you have more questions."]
CHAT_SYSTEMS = ["You are a helpful assistant.", "You are a friendly and concise assistant.",
                "You are a knowledgeable assistant. Keep your answers short and accurate.", "You are a polite assistant who gives clear answers."]


def lower_first(s):
    return s[0].lower() + s[1:]


def chat_turns(rng):
    """Return (topic, base difficulty, list of (user, assistant) turns); turn 1 stands alone, later turns follow up."""
    topic = rng.choice(["definition", "science", "travel", "cooking", "advice", "email", "small_talk"])
    if topic == "definition":
        w, meaning, syn, ex = rng.choice(DEFINITIONS)
        q = rng.choice([f"What does '{w}' mean?", f"Can you define the word '{w}'?", f"What is the meaning of '{w}'?", f"Define '{w}', please.",
                        f"I keep hearing the word '{w}'. What does it mean?", f"What's the definition of '{w}'?",
                        f"I came across '{w}' in a book. What does it mean?"])
        return topic, 1, [(q, f"'{w.capitalize()}' means {meaning}."), ("Can you use it in a sentence?", f"Sure: \"{ex}\""),
                          ("What is a word with a similar meaning?", f"A word with a similar meaning is '{syn}'.")]
    if topic == "science":
        (q, a), (_, a2) = rng.sample(SCIENCE, 2)
        q = rng.choice([q, f"Quick question: {lower_first(q)}", f"I've always wondered, {lower_first(q)}", f"Can you explain this? {q}",
                        f"My kid asked me this and I didn't know: {lower_first(q)}", f"Here's a science question. {q}", f"Hi! {q}"])
        return topic, 2, [(q, a), (rng.choice(["Interesting! Can you tell me another fact?", "Cool. Tell me something else about science."]),
                                   f"Sure! {a2}")]
    if topic == "travel":
        city, country, lang, cur, sights, food = rng.choice(CITIES)
        aspects = [([f"I'm visiting {city} next month. What should I see?", f"What are the must-see sights in {city}?",
                     f"I have three days in {city}. What are the best things to visit?"],
                    "What should I see there?", f"{city} has a lot to offer! Don't miss {sights}."),
                   ([f"What language do people speak in {city}?", f"Which language is spoken in {city}?",
                     f"I'm travelling to {city}. Which language will I hear there?"],
                    "What language do they speak there?", f"In {city}, people mainly speak {lang}. Learning a few polite phrases is always appreciated."),
                   ([f"What currency is used in {city}?", f"What money should I bring to {city}?", f"Which currency do I need for a trip to {city}?"],
                    "And what currency do they use?", f"{city} is in {country}, which uses {cur}."),
                   ([f"What food should I try in {city}?", f"What local dishes should I eat in {city}?",
                     f"I love trying local food. What should I eat in {city}?"],
                    "What food should I try there?", f"In {city}, be sure to try {food}.")]
        rng.shuffle(aspects)
        return topic, 1, [(rng.choice(aspects[0][0]), aspects[0][2])] + [(a[1], a[2]) for a in aspects[1:3]]
    if topic == "cooking":
        dish, ingr, method, time = rng.choice(RECIPES)
        how = (rng.choice([f"How do I make {dish}?", f"Can you give me a simple recipe for {dish}?", f"What's the easiest way to make {dish}?",
                           f"I want to cook {dish} tonight. How do I do it?", f"Can you explain how to make {dish}?"]),
               f"Here's a simple way to make {dish}: {method}")
        what = (rng.choice([f"What ingredients do I need for {dish}?", f"What do I need to make {dish}?",
                            f"I'm going shopping. What should I buy to make {dish}?"]), f"For {dish} you need {ingr}.")
        turns = [how, ("What ingredients do I need?", what[1])] if rng.random() < 0.6 else [what, ("How do I make it?", how[1])]
        return topic, 2, turns + [("How long does it take?", f"It takes {time} from start to finish.")]
    if topic == "advice":
        q, t1, t2, t3 = rng.choice(ADVICE)
        q = rng.choice([q, f"I need some advice. {q}", f"Hi! {q}", f"Any tips? {q}", f"I've been struggling lately. {q}",
                        f"Could you give me some advice? {q}"])
        return topic, 2, [(q, f"Here are a few tips: {t1}, {t2}, and {t3}."),
                          ("Which one should I start with?", f"I'd start with the first one: {t1}. Small, steady changes are the easiest to keep.")]
    if topic == "email":
        purpose, subject, body, short, closing, rels = rng.choice(EMAILS)
        rel, name, day, thing = rng.choice(rels), rng.choice(TITLES), rng.choice(DAYS), rng.choice(REPORTS)
        fill = lambda s: s.format(day=day, thing=thing)
        q = rng.choice([f"Write a short polite email to my {rel}, {name}, {fill(purpose)}.",
                        f"Can you help me write an email to {name}, my {rel}, {fill(purpose)}?",
                        f"Please draft a polite email to my {rel} {name} {fill(purpose)}."])
        email = f"Subject: {fill(subject)}\n\nDear {name},\n\n{fill(body)}\n\n{closing}\n\nBest regards,\n[Your name]"
        return topic, 3, [(q, f"Here is a draft you can use:\n\n{email}"),
                          ("Can you make it shorter?", f"Of course:\n\nDear {name},\n\n{fill(short)}\n\nBest regards,\n[Your name]")]
    q, a = rng.choice(SMALL_TALK)
    fact_q, fact_a = rng.choice(SCIENCE)
    return topic, 1, [(q, a), (fact_q, fact_a)]


def make_chat(rng):
    topic, base, turns = chat_turns(rng)
    n = min(len(turns), rng.choices([1, 2, 3], weights=[5, 3, 2])[0])
    turns = turns[:n]
    if n < 3 and rng.random() < 0.25:
        turns = turns + [(rng.choice(THANKS_USER), rng.choice(THANKS_BOT))]
    msgs = [{"role": "system", "content": rng.choice(CHAT_SYSTEMS)}] if rng.random() < 0.4 else []
    for u, a in turns:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return {"messages": msgs, "domain": "chat", "difficulty": min(5, base + n - 1)}


def first_user(rec):
    return next(m["content"] for m in rec["messages"] if m["role"] == "user")

# ----------------------------------------------------------------------------- 4. agent (tools)

LOOKUP_TABLE = {
    "capital of France": "Paris", "capital of Japan": "Tokyo", "capital of Italy": "Rome", "capital of Spain": "Madrid",
    "capital of Germany": "Berlin", "capital of Canada": "Ottawa", "capital of Australia": "Canberra", "capital of Egypt": "Cairo",
    "capital of Brazil": "Brasilia", "capital of Kenya": "Nairobi", "capital of India": "New Delhi", "capital of Mexico": "Mexico City",
    "boiling point of water": "100 degrees Celsius", "freezing point of water": "0 degrees Celsius",
    "speed of light": "299,792 kilometres per second", "speed of sound in air": "343 metres per second",
    "largest planet": "Jupiter", "closest planet to the Sun": "Mercury", "number of planets in the solar system": "8",
    "chemical symbol for gold": "Au", "chemical symbol for iron": "Fe", "chemical symbol for sodium": "Na",
    "chemical formula of water": "H2O", "atomic number of carbon": "6", "atomic number of oxygen": "8",
    "number of days in a leap year": "366", "number of days in a week": "7", "number of hours in a day": "24",
    "number of legs on a spider": "8", "number of players on a soccer team": "11", "number of sides of a hexagon": "6",
    "number of bones in the adult human body": "206", "number of continents": "7", "tallest mountain on Earth": "Mount Everest",
    "largest ocean": "the Pacific Ocean", "author of Hamlet": "William Shakespeare", "painter of the Mona Lisa": "Leonardo da Vinci",
    "year of the first Moon landing": "1969", "normal human body temperature": "37 degrees Celsius", "currency of Japan": "the yen",
}

UNIT_FACTORS = {"km": Fraction(1000), "m": Fraction(1), "cm": Fraction(1, 100), "mm": Fraction(1, 1000),  # to metres
                "kg": Fraction(1000), "g": Fraction(1),                                                  # to grams
                "h": Fraction(3600), "min": Fraction(60), "s": Fraction(1)}                             # to seconds
UNIT_KIND = {"km": "length", "m": "length", "cm": "length", "mm": "length", "kg": "mass", "g": "mass", "h": "time", "min": "time", "s": "time"}
UNIT_NAMES = {"km": "kilometres", "m": "metres", "cm": "centimetres", "mm": "millimetres", "kg": "kilograms", "g": "grams",
              "h": "hours", "min": "minutes", "s": "seconds"}

TOOLS = [
    {"type": "function", "function": {"name": "calculator", "description": "Evaluate an arithmetic expression using + - * / and parentheses.",
     "parameters": {"type": "object", "properties": {"expression": {"type": "string", "description": "for example (2 + 3) * 4"}},
                    "required": ["expression"]}}},
    {"type": "function", "function": {"name": "convert_units", "description": "Convert a value between units of length (km, m, cm, mm), mass (kg, g) or time (h, min, s).",
     "parameters": {"type": "object", "properties": {"value": {"type": "number"}, "from_unit": {"type": "string", "enum": list(UNIT_FACTORS)},
                    "to_unit": {"type": "string", "enum": list(UNIT_FACTORS)}}, "required": ["value", "from_unit", "to_unit"]}}},
    {"type": "function", "function": {"name": "lookup", "description": "Look up a fact by key in a small reference table, e.g. 'capital of France'.",
     "parameters": {"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]}}},
]


def amount(number, unit):
    """'2.5 kilometres', '1 hour' (singular for exactly 1)."""
    name = UNIT_NAMES[unit]
    return f"{number} {name[:-1] if number == '1' else name}"


def num_str(x):
    """Tool output format for numbers: integers without '.0', otherwise at most 6 decimals."""
    s = f"{float(x):.6f}".rstrip("0").rstrip(".")
    return "0" if s == "-0" else s


def calculator(expression):
    """The calculator tool: + - * / ( ) over numbers, exactly (verify.eval_arith: no eval)."""
    try:
        return num_str(V.eval_arith(str(expression)))
    except ValueError as e:
        return "error: division by zero" if "division by zero" in str(e) else "error: invalid expression"


def convert_units(value, from_unit, to_unit):
    if from_unit not in UNIT_FACTORS or to_unit not in UNIT_FACTORS or UNIT_KIND[from_unit] != UNIT_KIND[to_unit]:
        return f"error: cannot convert {from_unit} to {to_unit}"
    return num_str(Fraction(str(value)) * UNIT_FACTORS[from_unit] / UNIT_FACTORS[to_unit])


def lookup(key):
    wanted = " ".join(str(key).lower().strip(" ?.").split())
    for k, v in LOOKUP_TABLE.items():
        if k.lower() == wanted:
            return v
    return f"error: no entry for '{key}'"


def run_tool(name, arguments):
    """Execute one of the three tools; arguments is a dict (as stored in the traces)."""
    return {"calculator": calculator, "convert_units": convert_units, "lookup": lookup}[name](**arguments)


AGENT_SYSTEMS = ["You are a helpful assistant that can use tools. Call a tool whenever it helps you answer accurately.",
                 "You are an assistant with access to a calculator, a unit converter and a fact lookup tool.",
                 "Use the available tools to answer the user's question, then reply briefly."]
COUNTRIES = [k[len("capital of "):] for k in LOOKUP_TABLE if k.startswith("capital of ")]
COUNT_FACTS = [("number of days in a leap year", "How many days are there in {n} leap years?", "There are {r} days in {n} leap years."),
               ("number of days in a week", "How many days are in {n} weeks?", "{n} weeks have {r} days."),
               ("number of hours in a day", "How many hours are there in {n} days?", "There are {r} hours in {n} days."),
               ("number of legs on a spider", "How many legs do {n} spiders have altogether?", "{n} spiders have {r} legs altogether."),
               ("number of players on a soccer team", "How many players are there in {n} soccer teams?", "{n} soccer teams have {r} players."),
               ("number of sides of a hexagon", "How many sides do {n} hexagons have in total?", "{n} hexagons have {r} sides in total.")]


def tool_step(name, args):
    """Assistant tool call + tool result messages; returns (messages, result)."""
    result = run_tool(name, args)
    return [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": name, "arguments": args}}]},
            {"role": "tool", "name": name, "content": result}], result


def ask_lookup(rng, key):
    return rng.choice([f"What is the {key}?", f"Can you look up the {key}?", f"I'd like to know the {key}.", f"Please tell me the {key}."])


def random_expression(rng):
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 12)
    return rng.choice([f"{a} + {b}", f"{a} - {b}", f"{a} * {c}", f"{a * c} / {c}", f"({a} + {b}) * {c}", f"{a} * {c} - {b}",
                       f"({a} - {b}) / 4", f"{a}.5 * {c}", f"{a} + {b} * {c}"])


def calc_word_problem(rng):
    a, b, c = rng.randint(3, 30), rng.randint(2, 20), rng.randint(2, 9)
    return rng.choice([
        (f"A box holds {a} eggs. How many eggs are in {b} boxes?", f"{b} * {a}", "There are {r} eggs in " + f"{b} boxes."),
        (f"I have ${a + b + c} and spend ${b} on lunch and ${c} on a book. How much money do I have left?", f"{a + b + c} - {b} - {c}", "You have ${r} left."),
        (f"A ticket costs ${a}. How much do {c} tickets cost?", f"{c} * {a}", f"{c} tickets cost " + "${r}."),
        (f"{c} friends share a bill of ${a * c + c * 2} equally. How much does each person pay?", f"{a * c + c * 2} / {c}", "Each person pays ${r}."),
        (f"A room is {a} m long and {b} m wide. What is its area in square metres?", f"{a} * {b}", "The area is {r} square metres."),
        (f"A car uses {c} litres of fuel per 100 km. How much fuel does it need for {a * 10} km?", f"{c} * {a * 10} / 100", "It needs {r} litres of fuel."),
        (f"What is the average of {a}, {b} and {c + 10}?", f"({a} + {b} + {c + 10}) / 3", "The average is {r}.")])


def convert_args(rng):
    kind = rng.choice([["km", "m", "cm", "mm"], ["kg", "g"], ["h", "min", "s"]])
    i, j = rng.sample(range(len(kind)), 2)
    frm, to = kind[i], kind[j]
    ratio = UNIT_FACTORS[frm] / UNIT_FACTORS[to]
    if ratio > 1:
        value = rng.choice([rng.randint(2, 20), rng.randint(1, 9) + rng.choice([0.5, 0.25, 0.75])])
    else:
        value = int(rng.randint(1, 40) / ratio / rng.choice([1, 2, 4]))
    return {"value": value, "from_unit": frm, "to_unit": to}


def ask_convert(rng, a):
    v, f, t = num_str(a["value"]), UNIT_NAMES[a["from_unit"]], UNIT_NAMES[a["to_unit"]]
    return rng.choice([f"How many {t} are in {v} {f}?", f"Convert {v} {f} to {t}.", f"What is {v} {f} in {t}?"])


def make_agent(rng):
    kind = rng.choices(["lookup", "convert", "calc", "lookup_calc", "convert_calc", "mt_lookup", "mt_calc", "mt_convert"],
                       weights=[25, 25, 30, 5, 5, 4, 3, 3])[0]
    msgs, say = [], lambda role, text: msgs.append({"role": role, "content": text})
    def call(name, args):
        step, result = tool_step(name, args)
        msgs.extend(step)
        return result
    if kind in ("lookup", "mt_lookup"):
        key = "capital of " + rng.choice(COUNTRIES) if kind == "mt_lookup" else rng.choice(list(LOOKUP_TABLE))
        say("user", ask_lookup(rng, key))
        name, args = "lookup", {"key": key}
        say("assistant", f"The {key} is {call(name, args)}.")
        diff = 1
        if kind == "mt_lookup":
            other = rng.choice([c for c in COUNTRIES if c != key[len("capital of "):]])
            say("user", rng.choice([f"And what about {other}?", f"What about {other}?", f"Thanks. And the capital of {other}?"]))
            args = {"key": f"capital of {other}"}
            say("assistant", f"The capital of {other} is {call(name, args)}.")
            diff = 4
    elif kind in ("convert", "mt_convert"):
        name, args = "convert_units", convert_args(rng)
        say("user", ask_convert(rng, args))
        say("assistant", f"{amount(num_str(args['value']), args['from_unit'])} is {amount(call(name, args), args['to_unit'])}.")
        diff = 2
        if kind == "mt_convert":
            v2 = args["value"] * rng.choice([2, 3, 10]) if isinstance(args["value"], int) else args["value"] * 2
            v2 = int(v2) if v2 == int(v2) else v2
            args = dict(args, value=v2)
            say("user", f"And how many {UNIT_NAMES[args['to_unit']]} are in {num_str(v2)} {UNIT_NAMES[args['from_unit']]}?")
            say("assistant", f"{amount(num_str(v2), args['from_unit'])} is {amount(call(name, args), args['to_unit'])}.")
            diff = 4
    elif kind in ("calc", "mt_calc"):
        name = "calculator"
        if rng.random() < 0.5:
            expr = random_expression(rng)
            say("user", rng.choice([f"What is {expr}?", f"Calculate {expr}.", f"Can you compute {expr} for me?"]))
            args = {"expression": expr}
            r = call(name, args)
            say("assistant", rng.choice([f"{expr} = {r}.", f"The result is {r}.", f"The answer is {r}."]))
            diff = 3 if "(" in expr or "." in expr else 2
        else:
            question, expr, answer = calc_word_problem(rng)
            say("user", question)
            args = {"expression": expr}
            say("assistant", answer.format(r=call(name, args)))
            diff = 3
        if kind == "mt_calc":
            prev, k = msgs[-2]["content"], rng.randint(2, 9)
            follow, expr = rng.choice([(f"Now multiply that by {k}.", f"{prev} * {k}"),
                                       (f"What do I get if I add {k * 7} to that?", f"{prev} + {k * 7}"),
                                       (f"And if I subtract {k} from that?", f"{prev} - {k}")])
            say("user", follow)
            args = {"expression": expr}
            say("assistant", f"{expr} = {call(name, args)}.")
            diff = 4
    elif kind == "lookup_calc":
        key, question, answer = rng.choice(COUNT_FACTS)
        n = rng.randint(2, 12)
        say("user", question.format(n=n))
        value = call("lookup", {"key": key})
        name, args = "calculator", {"expression": f"{n} * {value}"}
        say("assistant", answer.format(n=n, r=call(name, args)))
        diff = 4
    else:  # convert_calc: convert one distance, then add a second one in the target unit
        a, b = rng.randint(2, 9) + rng.choice([0, 0.5]), rng.randint(100, 900)
        say("user", rng.choice([f"I walked {num_str(a)} km in the morning and {b} m in the evening. How many metres did I walk in total?",
                                f"A race has a {num_str(a)} km road section and a {b} m track section. How long is it in metres?"]))
        metres = call("convert_units", {"value": a, "from_unit": "km", "to_unit": "m"})
        name, args = "calculator", {"expression": f"{metres} + {b}"}
        say("assistant", f"That is {call(name, args)} metres in total.")
        diff = 5 if a != int(a) else 4
    expected = msgs[-2]["content"]  # the last tool result; it appears in the final assistant answer
    assert expected in msgs[-1]["content"] and not expected.startswith("error"), msgs
    if rng.random() < 0.5:
        msgs.insert(0, {"role": "system", "content": rng.choice(AGENT_SYSTEMS)})
    return {"messages": msgs, "tools": TOOLS, "domain": "agent", "difficulty": diff,
            "task": {"tool": name, "arguments": args, "expected": expected}}

# ----------------------------------------------------------------------------- 5. preferences

RUDE = ["That's a silly question. Look it up yourself.", "I don't have time for this.", "Figure it out on your own.",
        "Why would you even ask that?", "Ugh, not this again. Just search online.", "Whatever. It doesn't matter."]
EMPTY_ISH = ["Hmm.", "I'm not sure.", "Maybe.", "...", "It depends."]


def make_pref(rng):
    kind = rng.choices(["math", "polite", "off_topic", "truncated"], weights=[3, 2, 2, 2])[0]
    if kind == "math":
        if rng.random() < 0.5:  # bare arithmetic
            op = rng.choice("+-*")
            a, b = (rng.randint(2, 15), rng.randint(2, 12)) if op == "*" else (rng.randint(2, 99), rng.randint(2, 99))
            a, b = (b, a) if op == "-" and b > a else (a, b)
            res = a + b if op == "+" else a - b if op == "-" else a * b
            wrong = res + rng.choice([-10, -2, -1, 1, 2, 10])
            prompt = rng.choice([f"What is {a} {op} {b}?", f"Calculate {a} {op} {b}.", f"Compute {a} {op} {b}."])
            return {"prompt": prompt, "chosen": f"{a} {op} {b} = {res}. The answer is {res}.",
                    "rejected": f"{a} {op} {b} = {wrong}. The answer is {wrong}."}
        m = make_math(rng)  # a word problem: same reasoning, but the rejected one ends in a wrong answer
        wrong = fmt(Fraction(m["answer"]) + rng.choice([-3, -1, 1, 2, 5]), as_fraction="/" in m["answer"])
        steps = m["solution"].split("\n")[:-1]
        hits = list(re.finditer(r"(?<![\d./])" + re.escape(m["answer"]) + r"(?![\d/]|\.\d)", steps[-1]))
        if hits:  # make the last computation itself wrong, so the rejected answer is wrong but self-consistent
            steps[-1] = steps[-1][:hits[-1].start()] + wrong + steps[-1][hits[-1].end():]
        return {"prompt": m["question"], "chosen": m["solution"], "rejected": "\n".join(steps + [f"The answer is {wrong}."])}
    _, _, turns = chat_turns(rng)
    prompt, answer = turns[0]
    if kind == "polite":
        return {"prompt": prompt, "chosen": answer, "rejected": rng.choice(RUDE)}
    if kind == "off_topic":
        while True:
            _, _, other = chat_turns(rng)
            if norm(other[0][1]) != norm(answer) and other[0][1].split()[:3] != answer.split()[:3]:
                return {"prompt": prompt, "chosen": answer, "rejected": other[0][1]}
    words = answer.split()
    bad = " ".join(words[:max(2, len(words) // 4)]) if len(words) > 8 and rng.random() < 0.6 else rng.choice(EMPTY_ISH)
    return {"prompt": prompt, "chosen": answer, "rejected": bad}

# ----------------------------------------------------------------------------- 6. math transfer split
# Held-out math of KINDS and PHRASINGS that no training file has (tests/test_data.py checks: no
# shared type, no shared question, no shared 6-word phrase with numbers masked): perimeters,
# consecutive numbers, saving up, temperature changes, clock times, "I think of a number", reading
# plans and digit sums. Test only: a model that improves here learned more than the templates.

def tr_perimeter(rng, d):
    a, b = rng.randint(3, 12 + 8 * d), rng.randint(2, 9 + 5 * d)
    if d == 1:
        return (f"A square tile has sides of {a} cm. How far is it all the way around its edge, in cm?",
                [f"A square has 4 equal sides: 4 * {a} = {4 * a} cm."], str(4 * a))
    q = rng.choice([f"A fence runs around a rectangular field {a} m by {b} m. How many metres of fence are there?",
                    f"A rectangular pool measures {a} by {b} metres. How long is its rim, all the way round, in metres?"])
    steps = [f"Two long sides: 2 * {a} = {2 * a} m.", f"Two short sides: 2 * {b} = {2 * b} m.",
             f"All the way round: {2 * a} + {2 * b} = {2 * (a + b)} m."]
    if d == 3:
        gap = rng.randint(1, 4)
        q += f" A gate of {gap} m needs no fence; how much fence is bought?"
        steps.append(f"Without the gate: {2 * (a + b)} - {gap} = {2 * (a + b) - gap} m.")
        return q, steps, str(2 * (a + b) - gap)
    return q, steps, str(2 * (a + b))


def tr_consecutive(rng, d):
    n, k = rng.randint(3, 10 + 15 * d), 2 + d
    total = sum(range(n, n + k))
    which, ans = rng.choice([("smallest", n), ("largest", n + k - 1)])
    q = rng.choice([f"{k} consecutive whole numbers add up to {total}. Which is the {which} of them?",
                    f"When {k} whole numbers in a row are added together the result is {total}. Name the {which} one."])
    steps = [f"The middle of {k} numbers in a row is their mean: {total} / {k} = {Fraction(total, k)}.",
             f"The numbers are {', '.join(map(str, range(n, n + k)))}.", f"The {which} is {ans}."]
    return q, steps, str(ans)


def tr_savings(rng, d):
    who, w = rng.choice(NAMES), rng.randint(3, 6 + 3 * d)
    weeks, start = rng.randint(3, 8 + 2 * d), (0 if d == 1 else rng.randint(2, 9 + 5 * d))
    goal = start + w * weeks
    q = (f"Every week {who} drops {w} coins into a jar that "
         + ("starts empty" if start == 0 else f"already holds {start} coins")
         + f". After how many weeks does the jar hold {goal} coins?")
    steps = ([] if start == 0 else [f"Coins still to add: {goal} - {start} = {goal - start}."]) + [
        f"Weeks needed: {goal - start} / {w} = {weeks}."]
    return q, steps, str(weeks)


def tr_temperature(rng, d):
    t0, up, down = rng.randint(-12, 3), rng.randint(4, 9 + 3 * d), rng.randint(2, 6 + 3 * d)
    if d == 1:
        return (f"At dawn the thermometer read {t0} degrees. By noon it had climbed {up} degrees. What did it read at noon?",
                [f"{t0} + {up} = {t0 + up} degrees."], str(t0 + up))
    q = (f"At dawn the thermometer read {t0} degrees. It climbed {up} degrees by noon and then fell "
         f"{down} degrees by midnight. What did it read at midnight?")
    steps = [f"At noon: {t0} + {up} = {t0 + up} degrees.", f"At midnight: {t0 + up} - {down} = {t0 + up - down} degrees."]
    return q, steps, str(t0 + up - down)


def tr_clock(rng, d):
    h, m = rng.randint(1, 10), rng.choice(range(5, 56, 5))
    dur = rng.choice(range(10, 35 + 25 * d, 5))
    end = h * 60 + m + dur
    q = rng.choice([f"A lesson begins at {h}:{m:02d} and lasts {dur} minutes. How many minutes past the hour is it when it ends?",
                    f"The bus leaves at {h}:{m:02d} and the trip takes {dur} minutes. At how many minutes past the hour does it arrive?"])
    steps = [f"{m} + {dur} = {m + dur} minutes past {h}:00.",
             f"That is {end // 60 - h} hour(s) and {end % 60} minutes, so it ends at {end // 60}:{end % 60:02d}."]
    return q, steps, str(end % 60)


def tr_think(rng, d):
    x, a, b = rng.randint(2, 9 + 4 * d), rng.randint(2, 2 + d), rng.randint(1, 15)
    if d == 1:
        return (f"I think of a number and add {b}. I get {x + b}. What was my number?",
                [f"Undo the adding: {x + b} - {b} = {x}."], str(x))
    q = f"I think of a number, multiply it by {a} and then add {b}. The result is {a * x + b}. What number did I think of?"
    steps = [f"Undo the adding: {a * x + b} - {b} = {a * x}.", f"Undo the multiplying: {a * x} / {a} = {x}."]
    return q, steps, str(x)


def tr_reading(rng, d):
    who, per, days = rng.choice(NAMES), rng.randint(5, 10 + 5 * d), rng.randint(2, 4 + 2 * d)
    pages = per * days + rng.randint(5, 40 * d)
    q = rng.choice([f"A novel has {pages} pages. {who} reads {per} pages each day. How many pages remain unread after {days} days?",
                    f"{who}'s book is {pages} pages long, and {who} gets through {per} pages a day. After {days} days, how many pages are still to go?"])
    steps = [f"Pages read: {per} * {days} = {per * days}.", f"Pages left: {pages} - {per * days} = {pages - per * days}."]
    return q, steps, str(pages - per * days)


def tr_digits(rng, d):
    n = rng.randint(10 ** d, 10 ** (d + 1) - 1)
    ds = [int(c) for c in str(n)]
    q = rng.choice([f"Add up the digits of {n}. What total do you get?", f"What do the digits of {n} add up to?"])
    return q, [f"{' + '.join(map(str, ds))} = {sum(ds)}."], str(sum(ds))


TRANSFER_TYPES = [("perimeter", tr_perimeter), ("consecutive", tr_consecutive), ("savings", tr_savings),
                  ("temperature", tr_temperature), ("clock", tr_clock), ("think_of_a_number", tr_think),
                  ("reading", tr_reading), ("digit_sum", tr_digits)]


def make_math_transfer(rng):
    kind, gen = rng.choice(TRANSFER_TYPES)
    d = rng.choice([1, 2, 3])
    q, steps, ans = gen(rng, d)
    return {"question": q, "solution": "\n".join(steps + [f"The answer is {ans}."]), "answer": ans,
            "difficulty": d, "type": kind}

# ----------------------------------------------------------------------------- main

DATASETS = [  # name, maker, key used for de-duplication / overlap, n_train, n_test
    ("math", make_math, lambda r: r["question"], 1500, 150),
    ("code", make_code, lambda r: r["prompt"], 300, 60),
    ("chat", make_chat, first_user, 600, 60),
    ("agent", make_agent, first_user, 600, 80),
    ("pref", make_pref, lambda r: r["prompt"], 500, 100),
]
N_TRANSFER = 80  # data/math_transfer.jsonl: test only


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent), help="output folder (default: this script's folder)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    test_keys = set()  # membership only: later datasets (pref) must not reuse earlier test questions
    for i, (name, maker, key, n_train, n_test) in enumerate(DATASETS):
        rng = random.Random(args.seed * 1000 + i)  # one independent stream per dataset
        train, test = split_pool(rng, maker, key, n_train, n_test, exclude=test_keys)
        test_keys.update(norm(key(row)) for row in test)
        for split, rows in (("train", train), ("test", test)):
            path = out / f"{name}_{split}.jsonl"
            write_jsonl(path, rows)
            print(f"{path.name}: {len(rows)} rows, {path.stat().st_size} bytes")
    rng = random.Random(args.seed * 1000 + len(DATASETS))  # the transfer split: test only, after the others
    _, transfer = split_pool(rng, make_math_transfer, lambda r: r["question"], 0, N_TRANSFER, exclude=test_keys)
    path = out / "math_transfer.jsonl"
    write_jsonl(path, transfer)
    print(f"{path.name}: {len(transfer)} rows, {path.stat().st_size} bytes")
    path = out / "lookup_table.json"
    path.write_text(json.dumps(LOOKUP_TABLE, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(f"{path.name}: {len(LOOKUP_TABLE)} entries, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
