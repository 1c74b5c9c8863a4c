"""50 HumanEval / MBPP-style problems with real reference solutions, for tests/test_sandbox.py.

They cover what the out-of-process judge has to get right: tuples, floats (tolerances), nested
lists, strings, dicts and sets as keys and values, bytes, in-place mutation (the function returns
None and the test inspects its argument), exceptions the test expects, helper functions, keyword
arguments, and imports of the standard library. Every reference solution must score 1; every
mutant (`mutants`) must score < 1.
"""

P = []


def problem(entry_point, solution, *tests):
    P.append({"entry_point": entry_point, "solution": solution.strip() + "\n", "tests": list(tests)})


problem("add", """
def add(a, b):
    return a + b
""", "assert add(2, 3) == 5", "assert add(-4, 1) == -3", "assert candidate(0, 0) == 0")

problem("min_max", """
def min_max(xs):
    return (min(xs), max(xs))
""", "assert min_max([3, 1, 2]) == (1, 3)", "assert isinstance(min_max([5]), tuple)", "assert min_max([-2, 7]) == (-2, 7)")

problem("mean", """
def mean(xs):
    return sum(xs) / len(xs)
""", "assert abs(mean([1, 2, 4]) - 7 / 3) < 1e-9", "assert mean([2.5]) == 2.5", "assert abs(mean([0.1, 0.2]) - 0.15) < 1e-12")

problem("hypot", """
import math

def hypot(a, b):
    return math.sqrt(a * a + b * b)
""", "import math\nassert math.isclose(hypot(3, 4), 5.0)", "assert abs(hypot(1, 1) - 2 ** 0.5) < 1e-12", "assert hypot(0, 0) == 0.0")

problem("transpose", """
def transpose(m):
    return [list(row) for row in zip(*m)]
""", "assert transpose([[1, 2], [3, 4]]) == [[1, 3], [2, 4]]", "assert transpose([[1, 2, 3]]) == [[1], [2], [3]]",
    "assert transpose([]) == []")

problem("flatten", """
def flatten(xs):
    out = []
    for x in xs:
        if isinstance(x, list):
            out.extend(flatten(x))
        else:
            out.append(x)
    return out
""", "assert flatten([1, [2, [3, [4]]], 5]) == [1, 2, 3, 4, 5]", "assert flatten([]) == []", "assert flatten([[[]]]) == []")

problem("reverse_words", """
def reverse_words(s):
    return " ".join(reversed(s.split()))
""", "assert reverse_words('hello big world') == 'world big hello'", "assert reverse_words('  a  ') == 'a'",
    "assert reverse_words('') == ''")

problem("is_palindrome", """
def is_palindrome(s):
    t = [c.lower() for c in s if c.isalnum()]
    return t == t[::-1]
""", "assert is_palindrome('A man, a plan, a canal: Panama')", "assert not is_palindrome('abc')", "assert is_palindrome('')")

problem("char_counts", """
from collections import Counter

def char_counts(s):
    return Counter(s)
""", "assert char_counts('abca') == {'a': 2, 'b': 1, 'c': 1}", "assert char_counts('') == {}",
    "assert char_counts('zz')['z'] == 2")

problem("word_freq", """
def word_freq(text):
    freq = {}
    for w in text.lower().split():
        freq[w] = freq.get(w, 0) + 1
    return sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))
""", "assert word_freq('b a B c a b') == [('b', 3), ('a', 2), ('c', 1)]", "assert word_freq('') == []")

problem("append_zero", """
def append_zero(xs):
    xs.append(0)
""", "a = [1, 2]\nassert append_zero(a) is None\nassert a == [1, 2, 0]", "b = []\nappend_zero(b)\nappend_zero(b)\nassert b == [0, 0]")

problem("sort_in_place", """
def sort_in_place(xs):
    for i in range(len(xs)):
        for j in range(len(xs) - 1 - i):
            if xs[j] > xs[j + 1]:
                xs[j], xs[j + 1] = xs[j + 1], xs[j]
""", "a = [3, 1, 2]\nsort_in_place(a)\nassert a == [1, 2, 3]", "a = [5, -1, 5, 0]\nsort_in_place(a)\nassert a == [-1, 0, 5, 5]")

problem("zero_diagonal", """
def zero_diagonal(m):
    for i in range(min(len(m), len(m[0]) if m else 0)):
        m[i][i] = 0
""", "m = [[1, 2, 3], [4, 5, 6]]\nzero_diagonal(m)\nassert m == [[0, 2, 3], [4, 0, 6]]",
    "m = [[1, 2], [3, 4]]\nrow = m[1]\nzero_diagonal(m)\nassert m == [[0, 2], [3, 0]] and row == [3, 0]",
    "m = [[7]]\nzero_diagonal(m)\nassert m == [[0]]")

problem("merge_into", """
def merge_into(d, other):
    for k, v in other.items():
        d[k] = d.get(k, 0) + v
""", "d = {'a': 1}\nmerge_into(d, {'a': 2, 'b': 3})\nassert d == {'a': 3, 'b': 3}",
    "d = {}\nmerge_into(d, {})\nassert d == {}")

problem("dedupe_set", """
def dedupe_set(s, banned):
    s -= banned
    return len(s)
""", "s = {1, 2, 3}\nassert dedupe_set(s, {2}) == 2\nassert s == {1, 3}")

problem("safe_div", """
def safe_div(a, b):
    if b == 0:
        raise ValueError("division by zero")
    return a / b
""", "assert safe_div(6, 3) == 2.0", "try:\n    safe_div(1, 0)\nexcept ValueError as e:\n    assert 'zero' in str(e)\nelse:\n    assert False",
    "import math\nassert math.isclose(safe_div(1, 3), 0.3333333333333333)")

problem("parse_int", """
def parse_int(s):
    s = s.strip()
    if not s or not (s.isdigit() or (s[0] in '+-' and s[1:].isdigit())):
        raise ValueError("not an integer: %r" % s)
    return int(s)
""", "assert parse_int(' 42 ') == 42", "assert parse_int('-7') == -7",
    "for bad in ('', 'x', '4.2'):\n    try:\n        parse_int(bad)\n        assert False, bad\n    except ValueError:\n        pass")

problem("get_item", """
def get_item(d, key):
    return d[key]
""", "assert get_item({'a': 1}, 'a') == 1", "try:\n    get_item({}, 'x')\n    assert False\nexcept KeyError:\n    pass",
    "try:\n    get_item({}, 'x')\nexcept LookupError:\n    pass\nelse:\n    assert False")

problem("is_prime", """
def _divides(d, n):
    return n % d == 0

def is_prime(n):
    if n < 2:
        return False
    d = 2
    while d * d <= n:
        if _divides(d, n):
            return False
        d += 1
    return True
""", "assert [n for n in range(20) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19]", "assert not is_prime(1) and is_prime(2)", "assert not is_prime(49) and not is_prime(25)",
    "assert is_prime(7919) is True and is_prime(9) is False")

problem("nth_fib", """
from functools import lru_cache

@lru_cache(maxsize=None)
def nth_fib(n):
    return n if n < 2 else nth_fib(n - 1) + nth_fib(n - 2)
""", "assert nth_fib(0) == 0 and nth_fib(1) == 1", "assert nth_fib(30) == 832040", "assert nth_fib(90) == 2880067194370816120")

problem("gcd_list", """
import math
from functools import reduce

def gcd_list(xs):
    return reduce(math.gcd, xs)
""", "assert gcd_list([12, 18, 24]) == 6", "assert gcd_list([7]) == 7", "assert gcd_list([5, 10, 3]) == 1")

problem("top_k", """
import heapq

def top_k(xs, k):
    return heapq.nlargest(k, xs)
""", "assert top_k([5, 1, 9, 3], 2) == [9, 5]", "assert top_k([], 3) == []", "assert top_k([1, 1, 1], 2) == [1, 1]")

problem("pairs_summing_to", """
from itertools import combinations

def pairs_summing_to(xs, target):
    return sorted({tuple(sorted(p)) for p in combinations(xs, 2) if sum(p) == target})
""", "assert pairs_summing_to([1, 2, 3, 4], 5) == [(1, 4), (2, 3)]", "assert pairs_summing_to([1], 2) == []", "assert pairs_summing_to([4, 1, 3, 2], 5) == [(1, 4), (2, 3)]",
    "assert pairs_summing_to([2, 2, 2], 4) == [(2, 2)]")

problem("extract_emails", """
import re

def extract_emails(text):
    return re.findall(r"[\\w.]+@[\\w]+\\.[a-z]+", text)
""", "assert extract_emails('mail a.b@x.org or c@y.com.') == ['a.b@x.org', 'c@y.com']", "assert extract_emails('none') == []")

problem("insert_sorted", """
import bisect

def insert_sorted(xs, x):
    bisect.insort(xs, x)
    return xs
""", "a = [1, 3, 5]\nassert insert_sorted(a, 4) == [1, 3, 4, 5]\nassert a == [1, 3, 4, 5]", "assert insert_sorted([], 1) == [1]")

problem("as_fraction", """
from fractions import Fraction

def as_fraction(a, b):
    f = Fraction(a, b)
    return (f.numerator, f.denominator)
""", "assert as_fraction(6, 8) == (3, 4)", "assert as_fraction(-2, 4) == (-1, 2)", "assert as_fraction(0, 5) == (0, 1)")

problem("day_of_week", """
import datetime

def day_of_week(y, m, d):
    return datetime.date(y, m, d).strftime('%A')
""", "assert day_of_week(2024, 1, 1) == 'Monday'", "assert day_of_week(2000, 2, 29) == 'Tuesday'")

problem("caesar", """
import string

def caesar(s, k):
    lo, up = string.ascii_lowercase, string.ascii_uppercase
    table = str.maketrans(lo + up, lo[k:] + lo[:k] + up[k:] + up[:k])
    return s.translate(table)
""", "assert caesar('abc XYZ', 3) == 'def ABC'", "assert caesar('Hello', 0) == 'Hello'", "assert caesar(caesar('round', 5), 21) == 'round'")

problem("group_by_len", """
from collections import defaultdict

def group_by_len(words):
    g = defaultdict(list)
    for w in words:
        g[len(w)].append(w)
    return dict(g)
""", "assert group_by_len(['a', 'bb', 'c']) == {1: ['a', 'c'], 2: ['bb']}", "assert group_by_len([]) == {}")

problem("point", """
from collections import namedtuple

Point = namedtuple('Point', 'x y')

def point(x, y):
    return Point(x, y)
""", "assert point(1, 2) == (1, 2)", "x, y = point(3, 4)\nassert (x, y) == (3, 4)")

problem("run_length", """
def run_length(s):
    out = []
    for c in s:
        if out and out[-1][0] == c:
            out[-1] = (c, out[-1][1] + 1)
        else:
            out.append((c, 1))
    return out
""", "assert run_length('aabccc') == [('a', 2), ('b', 1), ('c', 3)]", "assert run_length('') == []")

problem("matrix_mult", """
def matrix_mult(a, b):
    return [[sum(x * y for x, y in zip(row, col)) for col in zip(*b)] for row in a]
""", "assert matrix_mult([[1, 2], [3, 4]], [[5, 6], [7, 8]]) == [[19, 22], [43, 50]]",
    "assert matrix_mult([[2]], [[3]]) == [[6]]", "assert matrix_mult([[1, 0], [0, 1]], [[4, 5], [6, 7]]) == [[4, 5], [6, 7]]")

problem("invert_dict", """
def invert_dict(d):
    return {v: k for k, v in d.items()}
""", "assert invert_dict({'a': 1, 'b': 2}) == {1: 'a', 2: 'b'}", "assert invert_dict({}) == {}",
    "assert invert_dict({(1, 2): 'p'}) == {'p': (1, 2)}")

problem("unique_sorted", """
def unique_sorted(xs):
    return sorted(set(xs))
""", "assert unique_sorted([3, 1, 3, 2, 1]) == [1, 2, 3]", "assert unique_sorted([]) == []",
    "assert unique_sorted([10, -1, 5, 100, 3]) == [-1, 3, 5, 10, 100]")

problem("common_elements", """
def common_elements(a, b):
    return set(a) & set(b)
""", "assert common_elements([1, 2, 3], [2, 3, 4]) == {2, 3}", "assert common_elements([], [1]) == set()",
    "assert common_elements('abc', 'cd') == {'c'}")

problem("frozen_pairs", """
def frozen_pairs(edges):
    return {frozenset(e) for e in edges}
""", "assert frozen_pairs([(1, 2), (2, 1), (3, 4)]) == {frozenset({1, 2}), frozenset({3, 4})}")

problem("to_hex", """
def to_hex(data):
    return data.hex()
""", "assert to_hex(b'\\x00\\xff') == '00ff'", "assert to_hex(b'') == ''")

problem("xor_bytes", """
def xor_bytes(a, b):
    return bytes(x ^ y for x, y in zip(a, b))
""", "assert xor_bytes(b'\\x0f\\xf0', b'\\xff\\xff') == b'\\xf0\\x0f'", "assert xor_bytes(b'', b'') == b''")

problem("scale", """
def scale(xs, factor=2):
    return [x * factor for x in xs]
""", "assert scale([1, 2]) == [2, 4]", "assert scale([1, 2], factor=3) == [3, 6]", "assert scale(xs=[1], factor=-1) == [-1]")

problem("clamp", """
def clamp(x, lo=0.0, hi=1.0):
    return max(lo, min(hi, x))
""", "assert clamp(1.5) == 1.0", "assert clamp(-3, lo=-1) == -1", "assert clamp(0.25) == 0.25")

problem("roots", """
import cmath

def roots(a, b, c):
    d = cmath.sqrt(b * b - 4 * a * c)
    return ((-b + d) / (2 * a), (-b - d) / (2 * a))
""", "r1, r2 = roots(1, 0, 1)\nassert abs(r1 - 1j) < 1e-12 and abs(r2 + 1j) < 1e-12",
    "r1, r2 = roots(1, -3, 2)\nassert abs(r1 - 2) < 1e-12 and abs(r2 - 1) < 1e-12")

problem("std_dev", """
import statistics

def std_dev(xs):
    return statistics.pstdev(xs)
""", "assert abs(std_dev([2, 4, 4, 4, 5, 5, 7, 9]) - 2.0) < 1e-12", "assert std_dev([1]) == 0.0")

problem("binary_search", """
def binary_search(xs, target):
    lo, hi = 0, len(xs) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        if xs[mid] == target:
            return mid
        if xs[mid] < target:
            lo = mid + 1
        else:
            hi = mid - 1
    return -1
""", "assert binary_search([1, 3, 5, 7], 5) == 2", "assert binary_search([1, 3, 5, 7], 4) == -1", "assert binary_search([], 1) == -1",
    "assert all(binary_search(list(range(50)), i) == i for i in range(50))")

problem("balanced", """
def balanced(s):
    pairs, stack = {')': '(', ']': '[', '}': '{'}, []
    for c in s:
        if c in '([{':
            stack.append(c)
        elif c in pairs:
            if not stack or stack.pop() != pairs[c]:
                return False
    return not stack
""", "assert balanced('([]{})')", "assert not balanced('(]')", "assert not balanced('((')", "assert balanced('')")

problem("rotate", """
def rotate(xs, k):
    if not xs:
        return []
    k %= len(xs)
    return xs[-k:] + xs[:-k]
""", "assert rotate([1, 2, 3, 4], 1) == [4, 1, 2, 3]", "assert rotate([1, 2, 3], 3) == [1, 2, 3]", "assert rotate([], 2) == []")

problem("chunks", """
def chunks(xs, n):
    return [tuple(xs[i:i + n]) for i in range(0, len(xs), n)]
""", "assert chunks([1, 2, 3, 4, 5], 2) == [(1, 2), (3, 4), (5,)]", "assert chunks([], 3) == []")

problem("nested_sum", """
def nested_sum(tree):
    if isinstance(tree, (int, float)):
        return tree
    return sum(nested_sum(t) for t in tree)
""", "assert nested_sum([1, [2, 3], [[4]], (5, 6.5)]) == 21.5", "assert nested_sum([]) == 0")

problem("camel_to_snake", """
import re

def camel_to_snake(name):
    return re.sub(r'(?<!^)(?=[A-Z])', '_', name).lower()
""", "assert camel_to_snake('HelloWorldAgain') == 'hello_world_again'", "assert camel_to_snake('x') == 'x'")

problem("digits_sum", """
def digits_sum(n):
    return sum(int(c) for c in str(abs(n)))
""", "assert digits_sum(1234) == 10", "assert digits_sum(-56) == 11", "assert digits_sum(0) == 0")

problem("validate_age", """
class AgeError(Exception):
    pass

def validate_age(age):
    if not isinstance(age, int):
        raise TypeError("age must be an int")
    if age < 0:
        raise AgeError("negative age")
    return age
""", "assert validate_age(30) == 30 and validate_age(0) == 0", "try:\n    validate_age('x')\n    assert False\nexcept TypeError:\n    pass",
    "try:\n    validate_age(-1)\nexcept Exception:\n    pass\nelse:\n    assert False")

problem("accumulate_running", """
from itertools import accumulate

def accumulate_running(xs):
    return list(accumulate(xs))
""", "assert accumulate_running([1, 2, 3]) == [1, 3, 6]", "assert accumulate_running([]) == []",
    "assert accumulate_running([0.5, 0.25]) == [0.5, 0.75]")

PROBLEMS = P
assert len(PROBLEMS) >= 50, len(PROBLEMS)


_MUTATIONS = [(" + ", " - "), (" < ", " <= "), (" == ", " != "), ("return ", "return 1 + "), (" > ", " >= "),
              ("[::-1]", ""), (" * ", " + "), ("min(", "max("), ("append(", "insert(0, "), ("sorted(", "list(")]


def mutants(solution: str) -> list[tuple[str, str]]:
    """Every single-site operator mutation of the solution: [(label "old->new@k", mutated source)]."""
    out = []
    for old, new in _MUTATIONS:
        start, k = 0, 0
        while (i := solution.find(old, start)) >= 0:
            out.append((f"{old.strip()}->{new.strip()}@{k}", solution[:i] + new + solution[i + len(old):]))
            start, k = i + 1, k + 1
    return out


# Mutants that are the same program (no test can tell them apart): swapping equal neighbours is a
# no-op; trial division up to n/2 instead of sqrt(n) is slower, not wrong; `<=` after the `==`
# branch of a binary search is `<`.
EQUIVALENT = {("sort_in_place", ">->>=@0"), ("is_prime", "*->+@0"), ("binary_search", "<-><=@0")}
