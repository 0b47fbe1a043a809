"""The embedded synthetic world (model=tiny): procedural skills, a char-level tokenizer and a tiny Llama
pretrained on them by ftlab itself, cached by config.

Importing this package is cheap (no torch): the skills live in `ftlab.world.skills`; the torch side in
`ftlab.world.base` (``ensure_base``, ``load_base``, ``skill_accuracy``) and `ftlab.world.tokenizer`.
"""

from ftlab.world.skills import (
    ALL_SKILLS,
    DEFAULT_SKILLS,
    PRETRAIN_SKILLS,
    SKILL_DOCS,
    TARGET_SKILLS,
    make_examples,
    pretrain_text,
)

__all__ = [
    "ALL_SKILLS",
    "DEFAULT_SKILLS",
    "PRETRAIN_SKILLS",
    "SKILL_DOCS",
    "TARGET_SKILLS",
    "make_examples",
    "pretrain_text",
]
