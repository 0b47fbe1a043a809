"""Bad input never becomes a wrong number (issue 11): a run's identity follows the content of its input files,
broken items, predictions and models fail with the culprit named (and are never cached), train/eval overlap is
measured and full overlap refused, and data.mix stays in a range that can be built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FAST

from ftlab.cli.run import check
from ftlab.config.registry import ConfigError
from ftlab.config.schema import to_container
from ftlab.rundir.identity import run_name

FIX = Path(__file__).parent / "fixtures"
EVAL_FIX = FIX / "eval"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sub_rows(n: int, split: str = "train", seed: int = 0) -> list[dict]:
    """Rows of the world's subtraction skill as a local file's records (fields prompt, response)."""
    from ftlab.world.skills import make_examples

    return [{"prompt": r["prompt"], "response": r["response"]} for r in make_examples("sub", split, n, seed)]


def file_data(path: Path, *extra: str) -> list[str]:
    """Overrides for a run of the small world on a local .jsonl file instead of the synth generator."""
    return [*FAST, "data.source=jsonl", "data.name=subfile", f"data.path={path}", "data.prompt_field=prompt",
            "data.response_field=response", *extra]


def name_of(overrides: list[str]) -> str:
    (c,) = check(overrides)
    return run_name(to_container(c))


# --------------------------------------------------------------------------------------------------- bounds
@pytest.mark.parametrize("mix", ["0.9999999", "0.95"])
def test_a_mix_that_cannot_be_built_is_refused_at_compose_time(mix):
    with pytest.raises(ConfigError, match=r"data\.mix: .*general rows per task row.*at most 0\.9"):
        check(FAST + [f"data.mix={mix}"])
    (c,) = check(FAST + ["data.mix=0.9"])
    assert c.data.mix == 0.9
