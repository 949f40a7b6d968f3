"""lm-eval (EleutherAI's lm-evaluation-harness) as a client of our data and adapters.

``write_tasks`` turns LLM-Adapters-format sets (the commonsense files, or any
of the same kind) into lm-eval multiple-choice tasks, so an exported adapter
can be scored by lm-eval as well as by ``reflora-ds eval``:

    reflora-ds lm-eval-tasks --data ARC-Easy/test.json --out tasks/
    lm_eval --model hf --model_args pretrained=BASE,peft=ADAPTER --include_path tasks/ --tasks reflora_arc_easy

The prompt, the options and the gold answer come from evaluate.py (the
functions below are what the tasks' ``utils.py`` calls), so both tools score
exactly the same continuations: each option is the training response with
its label in place ("the correct answer is answer3"). lm-eval moves the
prompt's trailing newline into every continuation; that adds the same
log-probability to each option of a row, so the ranking, hence the accuracy,
is the same row by row.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from .evaluate import make_question

UTILS = '''"""Written by reflora-ds lm-eval-tasks: the prompt, options and answer of an LLM-Adapters row."""

from reflora_ds.lmeval import doc_to_choice, doc_to_target, doc_to_text  # noqa: F401
'''


def doc_to_text(doc: dict) -> str:
    return make_question(0, doc).prompt


def doc_to_choice(doc: dict) -> list[str]:
    question = make_question(0, doc)
    return [question.response(label) for label in question.labels]


def doc_to_target(doc: dict) -> int:
    question = make_question(0, doc)
    return question.labels.index(question.answer)


def task_name(path: Path) -> str:
    """reflora_<set>: the folder's name for a split file (ARC-Easy/test.json), else the file's stem."""
    stem = path.parent.name if path.stem in ("test", "train", "dev", "validation") else path.stem
    return "reflora_" + re.sub(r"[^a-z0-9]+", "_", stem.lower()).strip("_")


def write_tasks(data: list[Path], out_dir: Path) -> list[str]:
    """One lm-eval task YAML per set (absolute data paths) and the utils.py they call; returns the task names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "utils.py").write_text(UTILS)
    names = []
    for path in data:
        name = task_name(path)
        task = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(Path(path).resolve())}},
            "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": "!function utils.doc_to_text",
            "doc_to_choice": "!function utils.doc_to_choice",
            "doc_to_target": "!function utils.doc_to_target",
            "target_delimiter": "",  # the prompt ends with "### Response:\n", the option follows it directly
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        }
        text = yaml.safe_dump(task, sort_keys=False)
        # lm-eval reads "!function" as a YAML tag; safe_dump would quote it.
        text = re.sub(r"'!function ([\w.]+)'", r"!function \1", text)
        (out_dir / f"{name}.yaml").write_text(text)
        names.append(name)
    return names
