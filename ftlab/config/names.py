"""Names a config can pick whose code lives in layers above config, owned here: the eval code builds its
registries from them, the world generates its skills by them, and `ftlab.config.schema` validates ``eval.*``,
``model.world.skills`` and ``data.skill`` against them. Plain data that imports nothing (no torch, nothing of
ftlab), so validating a config never loads the eval or world code.
"""

from __future__ import annotations

__all__ = ["GSM8K_STOP", "KIND_METRICS", "ANSWER_METRICS", "BUILTIN_TASK_METRICS", "BUILTIN_TASK_KINDS",
           "PROMPT_FORMATS", "DIAGNOSTICS", "PRETRAIN_SKILLS", "TARGET_SKILLS"]

# The built-in task kinds (ftlab.eval.generation, .perplexity, .multiple_choice) and their metrics; the first is a
# task's default primary metric. perplexity: token perplexity exp(sum NLL / sum tokens) of texts (the world's
# synth_ppl, wikitext_lines); loglikelihood_rolling: lm-evaluation-harness's metrics of the same name, per word and
# per byte of the original text (wikitext).
# Plug-in kinds (lm_eval) register their own metrics in ftlab.eval.task.KINDS.
KIND_METRICS: dict[str, tuple[str, ...]] = {
    "generation": ("exact_match", "strict_match", "flexible_extract", "robust_match"),
    "perplexity": ("perplexity",),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
    "multiple_choice": ("acc", "acc_norm"),
}

# What a generation task reports, by how it reads an answer (Task.answer, data.answer); the first is its default
# primary metric. exact: the whitespace-normalised text. number: lm-evaluation-harness's gsm8k filters
# (strict_match = its "strict-match", flexible_extract = its "flexible-extract", both scored by its exact_match) and
# ftlab's lenient final-number reading (robust_match, ftlab.data.answers.extract_number), all three on every item.
ANSWER_METRICS: dict[str, tuple[str, ...]] = {
    "exact": ("exact_match",),
    "number": ("strict_match", "flexible_extract", "robust_match"),
}

# The built-in benchmark tasks (ftlab.eval.builtin.BUILTINS: hub location, row format, prompts) and their kinds.
BUILTIN_TASK_KINDS: dict[str, str] = {
    "arc_challenge": "multiple_choice", "arc_easy": "multiple_choice", "hellaswag": "multiple_choice",
    "winogrande": "multiple_choice", "boolq": "multiple_choice", "mmlu": "multiple_choice",
    "wikitext": "loglikelihood_rolling", "wikitext_lines": "perplexity", "gsm8k": "generation",
}

# Built-in tasks whose metrics are fewer than their kind's (eval.tasks.<task>.metric is checked against these).
BUILTIN_TASK_METRICS: dict[str, tuple[str, ...]] = {"gsm8k": ANSWER_METRICS["number"]}

# How a prompt is fed to the model (ftlab.eval.prompts.apply_format): as is, or as the chat template's user turn.
PROMPT_FORMATS = ("plain", "chat")

# What eval.diagnostics may list (ftlab.eval.diagnostics.diagnose_run).
DIAGNOSTICS = ("intruder", "update", "tuco")

# The embedded world's skills (ftlab.world.skills makes their examples): what pretraining can teach, and the
# fine-tuning targets held out of it.
PRETRAIN_SKILLS = ("add", "rev", "copy", "sort", "succ", "cnt", "fact")
TARGET_SKILLS = ("sub", "rot1", "depth")

# Where a GSM8K continuation ends: lm-evaluation-harness's gsm8k task (`generation_kwargs.until`), so a model that
# goes on to write the next "Question:" is cut there, as lm-eval cuts it (conf/data/gsm8k.yaml repeats it).
GSM8K_STOP = ("Question:", "</s>", "<|im_end|>")

# Built-in tasks with a hub validation split distinct from the split they are scored on (eval.validation=true):
# task -> split. HellaSwag, WinoGrande and BoolQ are scored on their validation split (their test labels are
# hidden) and GSM8K has none, so they have no validation split here.
VALIDATION_SPLITS = {"arc_challenge": "validation", "arc_easy": "validation", "mmlu": "validation",
                     "wikitext": "validation"}
