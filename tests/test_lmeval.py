"""lm-eval scores an exported adapter on our tasks exactly as `reflora-ds eval` does, row by row.

Needs the `eval` extra (lm-eval); skipped without it.
"""

from __future__ import annotations

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from reflora_ds.data import EMBEDDED_TEST, read_rows  # noqa: E402
from reflora_ds.evaluate import evaluate, make_question  # noqa: E402
from reflora_ds.export import export_adapter  # noqa: E402
from reflora_ds.lmeval import task_name, write_tasks  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
ROWS = 20


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A tiny base saved as an HF folder and a LoRA adapter for it with non-zero B (so it changes the scores)."""
    from peft import LoraConfig, get_peft_model
    from tiny_models import tiny_llama

    root = tmp_path_factory.mktemp("lmeval")
    base, tokenizer = tiny_llama(root / "base", seed=0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=generator))
    export_adapter(model, root / "adapter", base_model=str(root / "base"))
    data = root / "arc_easy.json"
    data.write_text(json.dumps(read_rows(EMBEDDED_TEST).rows[:ROWS]))
    return {"root": root, "model": model, "tokenizer": tokenizer, "data": data}


def test_lm_eval_agrees_with_reflora_ds_eval_row_by_row(adapter, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    names = write_tasks([adapter["data"]], tmp_path / "tasks")
    assert names == [task_name(adapter["data"])] == ["reflora_arc_easy"]
    root = adapter["root"]
    result = simple_evaluate(model="hf", model_args=f"pretrained={root / 'base'},peft={root / 'adapter'},dtype=float32",
                             tasks=names, task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                             batch_size=4, log_samples=True, device="cpu")
    samples = sorted(result["samples"][names[0]], key=lambda s: s["doc_id"])
    assert len(samples) == ROWS
    theirs = [max(range(len(s["filtered_resps"])), key=lambda i: s["filtered_resps"][i][0]) for s in samples]

    rows = read_rows(adapter["data"]).rows
    ours = evaluate(adapter["model"], adapter["tokenizer"], rows, modes=["likelihood"], loss=False)
    predicted = [make_question(i, row).labels.index(r["prediction"])
                 for i, (row, r) in enumerate(zip(rows, ours.examples["likelihood"]))]
    assert predicted == theirs  # the same option, every row
    assert result["results"][names[0]]["acc,none"] == pytest.approx(ours.accuracy["likelihood"])
    assert len(set(predicted)) > 1  # the adapter makes the rows differ: the agreement is not trivial


def test_lm_eval_tasks_command_writes_loadable_tasks(adapter, tmp_path):
    from train_fixtures import run_cli

    result = run_cli(["lm-eval-tasks", "--data", adapter["data"], "--out", tmp_path / "t"])
    assert result.exit_code == 0 and "reflora_arc_easy" in result.output, result.output
    text = (tmp_path / "t" / "reflora_arc_easy.yaml").read_text()
    assert "doc_to_text: !function utils.doc_to_text" in text and str(adapter["data"].resolve()) in text
    missing = run_cli(["lm-eval-tasks", "--data", tmp_path / "nope.json"])
    assert missing.exit_code == 2 and "no such file" in missing.output
