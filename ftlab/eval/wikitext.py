"""WikiText as lm-evaluation-harness 0.4.13 reads it, pure Python: its detokenizer and its word and byte counts.

``wikitext`` is lm-eval 0.4.13's task (lm_eval/tasks/wikitext): one item per page of
EleutherAI/wikitext_document_level, the model reads the page after `detokenize`, and word and byte counts come from
the page as stored (before detokenization, as its ``process_results`` counts them). ``wikitext_lines`` is ftlab's
earlier reading of Salesforce/wikitext: one item per non-empty line, scored in tokens.
"""

from __future__ import annotations

import re

__all__ = ["detokenize", "count_words", "count_bytes"]


def detokenize(page: str) -> str:
    """lm-eval's ``wikitext_detokenizer`` (lm_eval/tasks/wikitext/preprocess_wikitext.py), step for step: the
    replacements are order-dependent, so they stay in its order (tests compare it with lm-eval's own function)."""
    s = page
    s = s.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for p in (":", ";", ".", "!", "?", ","):
        s = s.replace(f" {p} ", f"{p} ")
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    s = s.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    s = s.replace(" " + chr(176) + " ", chr(176))
    s = s.replace(" \n", "\n").replace("\n ", "\n")
    s = s.replace(" N ", " 1 ")
    return s.replace(" 's", "'s")


def count_words(page: str) -> int:
    """Words as lm-eval's wikitext counts them: pieces between whitespace runs of the stored page (a leading space
    counts an empty first piece; lm-eval does the same, so word perplexities stay comparable)."""
    return len(re.split(r"\s+", page))


def count_bytes(page: str) -> int:
    return len(page.encode("utf-8"))
