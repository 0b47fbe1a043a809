"""ftlab's multiple-choice tasks against lm-evaluation-harness on lm-eval's own task YAMLs (copied from the installed
package, re-pointed at the local fixtures), the same in-memory tiny model on both sides (HF backend): ARC-Challenge,
ARC-Easy, HellaSwag, WinoGrande, BoolQ and MMLU (two subjects, a group with lm-eval's size-weighted acc), at 0-shot
and at k-shot (lm-eval's default sampler; MMLU's first_n). Equal: every prompt (the (context, continuation) pairs
of each item), log-likelihoods within 1e-4, acc and acc_norm. docs/evaluation.md's parity table points here."""

import json
import os
import shutil
from pathlib import Path

import pytest

from ftlab.eval import multiple_choice as mc
from ftlab.eval.scoring import score_predictions
from ftlab.eval.suites import load_task

lm_eval = pytest.importorskip("lm_eval")

from test_eval import fewshot_path, fixture_path, model, tok  # noqa: E402,F401 - model, tok: module-scoped fixtures

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)

K = 3  # few-shot examples, default sampler (pools of 5-6 rows: each item draws its own)
K_MMLU = 2  # first_n: the fixture has 2 dev rows per subject
SUBJECTS = ["abstract_algebra", "virology"]  # 3 and 1 test rows: a size-weighted mean is not the mean of the two
# ftlab task -> (lm-eval's YAML, relative to its tasks/, and the split it scores)
SHIPPED = {"arc_challenge": ("arc/arc_challenge.yaml", "test"), "arc_easy": ("arc/arc_easy.yaml", "test"),
           "hellaswag": ("hellaswag/hellaswag.yaml", "validation"),
           "winogrande": ("winogrande/default.yaml", "validation"),
           "boolq": ("super_glue/boolq/default.yaml", "validation")}
TASKS = [*SHIPPED, "mmlu"]


def lm_eval_task_dir(root: Path, names, fewshot: bool = True, self_fewshot=()) -> Path:
    """lm-eval's own task definitions, re-pointed at the local fixtures, as tasks ``ftlab_<name>``: the eval
    fixture as the split the task scores, and (fewshot) the task's few-shot pool fixture as its training split.
    ``ftlab_<name>_self`` for names in self_fewshot: fewshot_split is the scored split itself. "mmlu": one task
    per subject of SUBJECTS (``ftlab_mmlu_<subject>``, dev = the subject's dev rows) and the group ``ftlab_mmlu``
    with lm-eval's MMLU aggregation (acc, weight_by_size)."""
    src = Path(os.path.dirname(lm_eval.__file__)) / "tasks"
    for name in names:
        if name == "mmlu":
            _mmlu_tasks(root / "mmlu", src)
            continue
        rel, split = SHIPPED[name]
        d = root / name  # the task's directory as shipped (its includes and !function helpers), plus ours
        shutil.copytree(src / Path(rel).parent, d, ignore=shutil.ignore_patterns("__pycache__", "*.md"))
        head = f"include: {Path(rel).name}\ntag: []\ndataset_path: json\ndataset_name: null\n"
        splits = (f"validation_split: {split if split == 'validation' else 'null'}\n"
                  f"test_split: {split if split == 'test' else 'null'}\n")
        files = {split: fixture_path(name)}
        if fewshot:
            files["train"] = fewshot_path(name)
        (d / f"ftlab_{name}.yaml").write_text(
            f"{head}task: ftlab_{name}\n{_data_files(files)}training_split: {'train' if fewshot else 'null'}\n{splits}")
        if name in self_fewshot:
            (d / f"ftlab_{name}_self.yaml").write_text(
                f"{head}task: ftlab_{name}_self\n{_data_files({split: fixture_path(name)})}training_split: null\n"
                f"{splits}fewshot_split: {split}\n")
    return root


def _data_files(files: dict) -> str:
    return "dataset_kwargs:\n  data_files:\n" + "".join(f"    {s}: {p}\n" for s, p in files.items())


def _mmlu_tasks(d: Path, src: Path) -> None:
    d.mkdir(parents=True)
    shutil.copy(src / "mmlu" / "default" / "_default_template_yaml", d / "_default_template_yaml")
    for subject in SUBJECTS:
        shutil.copy(src / "mmlu" / "default" / f"mmlu_{subject}.yaml", d / f"mmlu_{subject}.yaml")
        files = {}
        for split, path in (("test", fixture_path("mmlu")), ("dev", fewshot_path("mmlu"))):
            rows = [x for x in path.read_text().splitlines() if json.loads(x)["subject"] == subject]
            (d / f"{subject}_{split}.jsonl").write_text("\n".join(rows) + "\n")
            files[split] = d / f"{subject}_{split}.jsonl"
        (d / f"ftlab_mmlu_{subject}.yaml").write_text(
            f"include: mmlu_{subject}.yaml\ntask: ftlab_mmlu_{subject}\ntag: []\ndataset_path: json\n"
            f"dataset_name: null\n{_data_files(files)}")
    (d / "ftlab_mmlu.yaml").write_text(  # lm-eval's _mmlu.yaml aggregation
        "group: ftlab_mmlu\ntask:\n" + "".join(f"  - ftlab_mmlu_{s}\n" for s in SUBJECTS)
        + "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: True\nmetadata:\n  version: 2\n")




@pytest.fixture(scope="module")
def lm_eval_results(model, tok, tmp_path_factory):
    """lm-eval's results with samples: {0: 0-shot, "k": k-shot, "limit": the MMLU group at --limit 2}."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    root = lm_eval_task_dir(tmp_path_factory.mktemp("lm_eval_tasks"), TASKS, self_fewshot=["arc_easy"])
    tm = TaskManager(include_path=str(root), include_defaults=False)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu")
    names = [f"ftlab_{n}" for n in SHIPPED]

    def run(tasks, **kw):
        return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, log_samples=True, bootstrap_iters=0,
                                       **kw)

    # k-shot: each task's own num_fewshot in its YAML (lm-eval's --num_fewshot would set one k for every task)
    for name, k in [*[(n, K) for n in [*SHIPPED, "arc_easy_self"]], *[(f"mmlu_{s}", K_MMLU) for s in SUBJECTS]]:
        path = next(root.glob(f"*/ftlab_{name}.yaml"))
        path.write_text(path.read_text() + f"num_fewshot: {k}\n")
    kshot = run([*names, "ftlab_arc_easy_self", "ftlab_mmlu"], num_fewshot=None)
    return {0: run([*names, "ftlab_mmlu"], num_fewshot=0), "k": kshot,
            "limit": run(["ftlab_mmlu"], num_fewshot=0, limit=2)}


def ftlab_task(name: str, k: int, n=None):
    if name == "mmlu":
        return load_task("mmlu", path=str(fixture_path("mmlu")), subset=SUBJECTS, few_shot=k, n=n,
                         fewshot_path=str(fewshot_path("mmlu")))
    if name == "arc_easy_self":  # the eval file as its own few-shot pool: lm-eval's fewshot_split == test_split
        return load_task("arc_easy", path=str(fixture_path("arc_easy")), few_shot=k,
                         fewshot_path=str(fixture_path("arc_easy")))
    return load_task(name, path=str(fixture_path(name)), few_shot=k, n=n,
                     **({"fewshot_path": str(fewshot_path(name))} if k else {}))


def samples_of(res: dict, name: str) -> list[dict]:
    """lm-eval's logged samples of a task in ftlab's row order (MMLU: its subjects in the fixture's order)."""
    keys = [f"ftlab_mmlu_{s}" for s in SUBJECTS] if name == "mmlu" else [f"ftlab_{name}"]
    return [s for key in keys for s in sorted(res["samples"][key], key=lambda s: s["doc_id"])]


@pytest.mark.parametrize("name, shots", [(n, s) for n in TASKS for s in (0, "k")] + [("arc_easy_self", "k")],
                         ids=[f"{n}-{s}shot" for n in TASKS for s in (0, "k")] + ["arc_easy_self-kshot"])
def test_prompts_loglikelihoods_and_accuracy_equal_lm_eval(model, tok, lm_eval_results, name, shots):
    k = 0 if shots == 0 else K_MMLU if name == "mmlu" else K
    res = lm_eval_results[shots]
    task = ftlab_task(name, k)
    samples = samples_of(res, name)
    assert len(samples) == len(task.rows)
    # prompts: every (context, continuation) pair lm-eval sends to the model
    assert mc.mc_requests(task, tok) == [[tuple(a) for a in s["arguments"]] for s in samples]
    if k:
        assert all(p[0][0].count("\n\n") >= k for p in mc.mc_requests(task, tok))
    ours = score_predictions(task, mc.predict_multiple_choice(model, tok, task, 4))
    for item, s in zip(ours["items"], samples):
        assert item["loglikelihoods"] == pytest.approx([float(r[0][0]) for r in s["resps"]], abs=1e-4)
    if name == "mmlu":  # the group: lm-eval's size-weighted acc is the mean over every item of both subjects
        theirs = res["results"]["ftlab_mmlu"]
    else:
        theirs = res["results"][f"ftlab_{name}"]
    assert ours["metrics"]["acc"] == pytest.approx(100 * theirs["acc,none"])
    if "acc_norm,none" in theirs:
        assert ours["metrics"]["acc_norm"] == pytest.approx(100 * theirs["acc_norm,none"])


def test_k_shot_items_draw_their_own_examples_and_mmlu_takes_the_first_dev_rows(tok):
    """What the parity above would not notice if the fixtures were degenerate: items of one task get different
    example sets (a per-item draw, not one set for all), and MMLU's are the subject's first dev rows in order."""
    for name in SHIPPED:
        ids = ftlab_task(name, K).meta["fewshot_ids"]
        assert len({tuple(v) for v in ids.values()}) > 1, name
    mmlu = ftlab_task("mmlu", K_MMLU)
    assert mmlu.meta["fewshot_ids"]["mmlu/0"] == ["mmlu/fewshot/0", "mmlu/fewshot/1"]
    assert mmlu.meta["fewshot_ids"]["mmlu/6"] == ["mmlu/fewshot/4", "mmlu/fewshot/5"]
    same = ftlab_task("arc_easy_self", K)
    assert all(f"arc_easy/fewshot/{rid.split('/')[1]}" not in v for rid, v in same.meta["fewshot_ids"].items())


def test_mmlu_limit_is_per_subject_and_the_group_is_size_weighted(model, tok, lm_eval_results):
    """eval.limit=2 on MMLU is lm-eval's --limit 2: two items of each subject (virology has one), and ftlab's acc
    equals lm-eval's group acc (weight_by_size: the mean over items, not over subjects)."""
    res = lm_eval_results["limit"]
    task = ftlab_task("mmlu", 0, n=2)
    samples = samples_of(res, "mmlu")
    assert [r["id"] for r in task.rows] == ["mmlu/0", "mmlu/1", "mmlu/6"] and len(samples) == 3
    assert mc.mc_requests(task, tok) == [[tuple(a) for a in s["arguments"]] for s in samples]
    ours = score_predictions(task, mc.predict_multiple_choice(model, tok, task, 4))
    assert ours["metrics"]["acc"] == pytest.approx(100 * res["results"]["ftlab_mmlu"]["acc,none"])
    per_subject = [100 * res["results"][f"ftlab_mmlu_{s}"]["acc,none"] for s in SUBJECTS]
    weighted = (2 * per_subject[0] + per_subject[1]) / 3
    assert ours["metrics"]["acc"] == pytest.approx(weighted)
