"""Answer extraction and scoring for generation tasks. Pure Python (no torch).

`extract_number` reads the final numeric answer out of a model generation or a GSM8K reference, in this order:

1. The text is cut where the model starts a new few-shot example: at the first line (after the first) that
   begins with ``Question:`` or ``Q:``.
2. GSM8K's marker: the first number after the first ``####`` (``#### 72``, ``####72``, ``####   $1,000.``).
3. ``\\boxed{X}`` (the last one), then "the (final) answer is X" / "answer: X" / "answer = X" (the first
   one that has a number on the rest of its line).
4. The last number anywhere in the text.

Numbers are normalised so that equal values compare equal as strings: thousands commas are dropped
(``1,000`` -> ``1000``), currency signs and units around the number are ignored (``$18``, ``18 dollars``,
``18%``), a trailing period is not a decimal point, ``+`` is dropped and the unicode minus (U+2212) reads as
``-``, decimal zeros are trimmed (``5.00`` -> ``5``, ``2.50`` -> ``2.5``, ``.5`` -> ``0.5``, ``-0`` -> ``0``),
and fractions stay fractions (``3/4``). A number glued to a preceding letter (``mp3``, ``x2``) or written as
an ordinal (``3rd``, ``21st``) is not an answer candidate. This is ftlab's own lenient reading (the ``robust_match``
metric): it credits answers that lm-evaluation-harness's GSM8K filters do not.

`lm_eval_strict`, `lm_eval_flexible` and `lm_eval_exact_match` are lm-evaluation-harness 0.4.13's GSM8K scoring,
verbatim (``tasks/gsm8k/gsm8k.yaml``: the ``strict-match`` and ``flexible-extract`` filters, ``RegexFilter`` then
``take_first``, and ``exact_match`` with the task's ``regexes_to_ignore`` and ``ignore_case``), so that
``strict_match`` and ``flexible_extract`` are the numbers lm-eval reports as ``exact_match,strict-match`` and
``exact_match,flexible-extract`` (tests/test_eval_parity_gsm8k.py runs lm-eval's own task on the same texts).
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Optional

__all__ = ["extract_number", "normalize_number", "normalize_exact", "score", "SCORE_KINDS", "lm_eval_strict",
           "lm_eval_flexible", "lm_eval_exact_match", "LM_EVAL_FALLBACK"]

SCORE_KINDS = ("exact", "number")

# Signs that mean minus: ASCII hyphen-minus, unicode minus, and the small/full-width hyphen-minus.
_MINUS = "-\u2212\ufe63\uff0d"
_CURRENCY = "$\u20ac\u00a3\u00a5\u20b9"  # $ € £ ¥ ₹

_NUMBER = re.compile(
    rf"""
    (?<![^\W_])                                   # not glued to a preceding letter or digit (mp3, x2)
    (?P<sign1>[+{re.escape(_MINUS)}]?)
    [{re.escape(_CURRENCY)}]?
    (?P<sign2>[{re.escape(_MINUS)}]?)                        # $-5
    (?P<num>
        [0-9]{{1,3}}(?:,[0-9]{{3}})+(?:\.[0-9]+)?    # 1,000 / 1,234.50
      | [0-9]+(?:\.[0-9]+)?                       # 42 / 5.00
      | \.[0-9]+                                  # .5
    )
    (?:/(?P<den>[0-9]+))?                         # 3/4 (kept as a fraction)
    (?![0-9])                                     # whole number only (no backtracking into 1,000 or 5.5)
    (?!,[0-9]{{3}}(?![0-9]))
    (?!\.[0-9])
    (?!(?i:st|nd|rd|th)(?![^\W\d_]))              # not an ordinal: 3rd, 21st, 4th
    """,
    re.VERBOSE,
)

_HASHES = re.compile(r"####")
_BOXED = re.compile(r"\\boxed\s*\{([^{}]*)\}")
_ANSWER_IS = re.compile(r"\banswer\b\s*(?:is\b|:|=)", re.IGNORECASE)
_NEW_QUESTION = re.compile(r"^[ \t]*(?:Question|Q)[ \t]*:", re.MULTILINE)


def normalize_number(sign: str, num: str, den: Optional[str] = None) -> str:
    """Canonical string for a matched number: no commas/currency, trimmed decimal zeros, '-' or nothing."""
    num = _canon_decimal(num.replace(",", ""))
    value = num if den is None else f"{num}/{_canon_decimal(den)}"
    zero = num == "0"
    negative = bool(sign) and sign in _MINUS
    return f"-{value}" if negative and not zero else value


def _canon_decimal(s: str) -> str:
    whole, _, frac = s.partition(".")
    whole = whole.lstrip("0") or "0"
    frac = frac.rstrip("0")
    return f"{whole}.{frac}" if frac else whole


def _numbers(text: str) -> list[str]:
    out = []
    for m in _NUMBER.finditer(text):
        sign = m.group("sign1") or m.group("sign2")
        out.append(normalize_number(sign, m.group("num"), m.group("den")))
    return out


def _cut_continuation(text: str) -> str:
    """Drop everything from the first line after the first that starts a new 'Question:' / 'Q:'."""
    for m in _NEW_QUESTION.finditer(text):
        if m.start() > 0 and text[: m.start()].strip():
            return text[: m.start()]
    return text


def extract_number(text: Optional[str]) -> Optional[str]:
    """The final numeric answer in `text` as a canonical string (see the module doc), or None."""
    if not text:
        return None
    text = _cut_continuation(text)

    m = _HASHES.search(text)
    if m:
        found = _numbers(text[m.end():])
        if found:
            return found[0]

    boxed = _BOXED.findall(text)
    for inner in reversed(boxed):
        found = _numbers(inner)
        if found:
            return found[-1]

    for m in _ANSWER_IS.finditer(text):
        line = text[m.end():].split("\n", 1)[0]
        found = _numbers(line)
        if found:
            return found[0]

    found = _numbers(text)
    return found[-1] if found else None


def normalize_exact(text: Optional[str]) -> str:
    """Strip and collapse every run of whitespace to one space."""
    return " ".join((text or "").split())


def _same_number(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return Fraction(a) == Fraction(b)  # 1/2 == 0.5
    except (ValueError, ZeroDivisionError):
        return False


def score(kind: str, prediction: Optional[str], reference: Optional[str]) -> float:
    """100.0 if `prediction` matches `reference`, else 0.0.

    exact:  whitespace-normalised strings are equal.
    number: the numbers extracted from both are equal (the reference goes through `extract_number` too, so
            "#### 72", "72" and "$72.00" all work); a reference without a number scores everything 0.
    """
    if kind == "exact":
        return 100.0 if normalize_exact(prediction) == normalize_exact(reference) else 0.0
    if kind == "number":
        ref = extract_number(reference)
        pred = extract_number(prediction)
        if ref is None or pred is None:
            return 0.0
        return 100.0 if _same_number(pred, ref) else 0.0
    raise ValueError(f"unknown answer kind {kind!r}; valid: {', '.join(SCORE_KINDS)}")


# ------------------------------------------------------------------ lm-evaluation-harness 0.4.13, tasks/gsm8k
# The patterns and options are copied from gsm8k.yaml, not rewritten: a "better" regex here would be a different
# metric under lm-eval's name.
_LM_EVAL_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_LM_EVAL_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_LM_EVAL_IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")  # exact_match's regexes_to_ignore, applied in this order
LM_EVAL_FALLBACK = "[invalid]"  # RegexFilter's answer when nothing matches


def _lm_eval_regex(pattern: re.Pattern, text: Optional[str], group_select: int) -> str:
    """lm_eval.filters.extraction.RegexFilter on one response (take_first keeps the one response there is)."""
    match = pattern.findall(text if isinstance(text, str) else "")
    if not match:
        return LM_EVAL_FALLBACK
    found = match[group_select]
    if isinstance(found, tuple):  # several groups: the first non-empty one
        found = next((g for g in found if g), LM_EVAL_FALLBACK)
    return found.strip()


def lm_eval_strict(text: Optional[str]) -> str:
    """lm-eval's gsm8k ``strict-match`` filter: the first ``#### N`` (N of digits, ``.``, ``,``, an optional
    leading ``-``), or "[invalid]"."""
    return _lm_eval_regex(_LM_EVAL_STRICT, text, 0)


def lm_eval_flexible(text: Optional[str]) -> str:
    """lm-eval's gsm8k ``flexible-extract`` filter: the last run of 2+ characters of ``-$0-9.,`` or the last
    integer, whichever comes last, or "[invalid]"."""
    return _lm_eval_regex(_LM_EVAL_FLEXIBLE, text, -1)


def _lm_eval_ignore(text: str) -> str:
    for pattern in _LM_EVAL_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()  # ignore_case: true (ignore_punctuation: false)


def lm_eval_exact_match(filtered: str, target: str) -> float:
    """lm-eval's exact_match (``exact_match_hf_evaluate``) with gsm8k's options: 100.0 if equal after both drop
    ``,``, ``$``, everything up to the last ``#### `` and one trailing ``.``, and are lower-cased; else 0.0.
    `target` is the dataset's answer field as is (lm-eval's ``doc_to_target``), or a bare number."""
    return 100.0 if _lm_eval_ignore(filtered) == _lm_eval_ignore(target) else 0.0
