"""Accuracy in both modes, label parsing, loss, and the model's mode around evaluation."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console
from torch import nn

from reflora_ds.config import RunConfig
from reflora_ds.data import PadCollator, build_prompt, tokenize_rows
from reflora_ds.evaluate import (
    LABEL_FORMATS,
    EvalError,
    candidates,
    evaluate,
    label_format,
    make_question,
    results_json,
    results_table,
)
from reflora_ds.models import load_base_model, wrap_with_lora
from tiny_models import tiny_llama, tiny_tokenizer

FORMATS = {fmt.name: fmt for fmt in LABEL_FORMATS}


def row(question: str, labels: list[str], answer: str) -> dict:
    instruction = f"Please choose the correct answer to the question: {question}\n\nAnswer format: {'/'.join(labels)}"
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


# One question per label format; the key word in each question tells the scripted model which one it sees.
SET = [
    row("fever: which factor?", ["answer1", "answer2", "answer3", "answer4"], "answer2"),
    row("frozen: is it cold?", ["true", "false"], "true"),
    row("sentence: which option fits?", ["option1", "option2"], "option1"),
    row("glue: which solution works?", ["solution1", "solution2"], "solution2"),
    row("story: which ending follows?", ["ending1", "ending2", "ending3", "ending4"], "ending3"),
    row("planet: which one is largest?", ["answer1", "answer2", "answer3", "answer4", "answer5"], "answer5"),
]
# key word -> (what the model generates, the label it finds most likely)
SCRIPT = {
    "fever": ("the correct answer is answer2", "answer2"),  # right, right
    "frozen": ("The answer is False.", "true"),  # wrong, right
    "sentence": ("the correct answer is option1", "option2"),  # right, wrong
    "glue": ("I am not sure what to say", "solution2"),  # unparseable, right
    "story": ("the correct answer is ending 3", "ending3"),  # right (spaced spelling), right
    "planet": ("answer5, not answer1", "answer1"),  # right (first label wins), wrong
}
EXPECTED = {"generate": 4, "likelihood": 4}


class ScriptedLM(nn.Module):
    """A causal LM whose answers are fixed per question (HF forward/generate interface).

    generate() appends the scripted text; forward() gives every token of the
    sequence that ends with the preferred label a large logit and everything
    else a flat one, only at real (unpadded) positions. It records the padding
    side it saw and whether it ran in train mode.
    """

    def __init__(self, tokenizer, script: dict[str, tuple[str, str]]):
        super().__init__()
        self.tokenizer, self.script = tokenizer, script
        self.dropout = nn.Dropout(0.5)
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device
        self.seen_training: list[bool] = []

    def _entry(self, ids: torch.Tensor) -> tuple[str, str, str]:
        text = self.tokenizer.decode(ids)
        key = next(k for k in self.script if k in text)
        return text, *self.script[key]

    def generate(self, input_ids, attention_mask, generation_config, **kwargs):
        self.seen_training.append(self.training)
        assert (attention_mask[:, -1] == 1).all(), "prompts must be left-padded"
        new = []
        for ids, mask in zip(input_ids, attention_mask):
            _, text, _ = self._entry(ids[mask.bool()])
            new.append(self.tokenizer(text, add_special_tokens=False)["input_ids"][: generation_config.max_new_tokens])
        width = max(len(ids) for ids in new)
        eos = self.tokenizer.eos_token_id
        tail = torch.tensor([ids + [eos] * (width - len(ids)) for ids in new])
        return torch.cat([input_ids, tail], dim=1)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        """Causal, like a real LM: position t's logits depend on tokens 0..t only.

        Along the preferred response ("the correct answer is <preferred>") each
        next token gets a large logit; off it every logit is flat.
        """
        self.seen_training.append(self.training)
        batch, width = input_ids.shape
        logits = torch.zeros(batch, width, len(self.tokenizer))
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        for b in range(batch):
            positions = mask[b].nonzero().squeeze(-1)
            real = input_ids[b, positions].tolist()
            _, _, preferred = self._entry(torch.tensor(real))
            text = self.tokenizer.decode(real, skip_special_tokens=True)
            prompt = text[: text.index(RESPONSE_MARK) + len(RESPONSE_MARK)] if RESPONSE_MARK in text else text
            target = self.tokenizer(prompt + "the correct answer is " + preferred)["input_ids"]
            for t in range(len(real) - 1):
                if real[: t + 1] == target[: t + 1] and t + 1 < len(target):
                    logits[b, positions[t], target[t + 1]] = 10.0
        return SimpleNamespace(logits=self.dropout(logits) if self.training else logits)


RESPONSE_MARK = "### Response:\n"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_both_modes_score_the_hand_built_set_exactly(tok, batch_size):
    model = ScriptedLM(tok, SCRIPT)
    result = evaluate(model, tok, SET, modes=["generate", "likelihood"], loss=False, batch_size=batch_size)
    assert result.rows == 6 and result.correct == EXPECTED
    assert result.accuracy == {"generate": pytest.approx(4 / 6), "likelihood": pytest.approx(4 / 6)}
    assert round(result.accuracy["generate"], 4) == 0.6667
    generate = result.examples["generate"]
    assert [r["prediction"] for r in generate] == ["answer2", "false", "option1", None, "ending3", "answer5"]
    assert result.unparsed == 1 and generate[3]["correct"] is False  # unparseable: wrong, no crash
    likelihood = result.examples["likelihood"]
    assert [r["prediction"] for r in likelihood] == ["answer2", "true", "option2", "solution2", "ending3", "answer1"]
    assert list(likelihood[5]["scores"]) == ["answer1", "answer2", "answer3", "answer4", "answer5"]
    assert model.training and all(seen is False for seen in model.seen_training)  # evaluated without dropout


def test_limit_and_mode_restoration(tok):
    model = ScriptedLM(tok, SCRIPT).eval()
    result = evaluate(model, tok, SET, modes=["likelihood"], loss=False, limit=2)
    assert result.rows == 2 and result.correct == {"likelihood": 2} and not model.training
    with pytest.raises(EvalError, match="unknown mode"):
        evaluate(model, tok, SET, modes=["sample"])


@pytest.mark.parametrize(
    ("text", "fmt", "label"),
    [
        ("the correct answer is answer3", "answer", "answer3"),
        ("Answer2: a bacterial population", "answer", "answer2"),
        ("answer 4", "answer", "answer4"),
        ("answer2 or maybe answer3", "answer", "answer2"),
        ("The answer is False.", "true/false", "false"),
        ("true", "true/false", "true"),
        ("the correct answer is option2", "option", "option2"),
        ("Option1", "option", "option1"),
        ("the correct answer is solution1", "solution", "solution1"),
        ("the correct answer is ending4", "ending", "ending4"),
        ("the correct answer is ending 2", "ending", "ending2"),
        ("the correct answer is", "answer", None),
        ("I am not sure", "true/false", None),
        ("untrue statements", "true/false", None),
        ("", "ending", None),
        ("ending", "ending", None),
    ],
)
def test_every_label_format_parses(text, fmt, label):
    assert FORMATS[fmt].find(text) == label


def test_label_formats_and_candidates():
    assert label_format("answer5").name == "answer"
    assert label_format("ending 2").name == "ending" and FORMATS["ending"].parse("ending 2") == "ending2"
    assert label_format("false").name == "true/false"
    assert label_format("option1").name == "option" and label_format("solution2").name == "solution"
    with pytest.raises(EvalError, match="not a known label"):
        label_format("maybe")

    assert candidates("Q?\n\nAnswer format: answer1/answer2/answer3", FORMATS["answer"]) == \
        ["answer1", "answer2", "answer3"]
    assert candidates("Q?\n\nAnswer format: ending1/ending2/ending3/ending4", FORMATS["ending"]) == \
        [f"ending{i}" for i in range(1, 5)]
    assert candidates("Q? Answer format: true/false", FORMATS["true/false"]) == ["true", "false"]
    # No format line: the kind's defaults, stretched to a gold label beyond them.
    assert candidates("Q?", FORMATS["answer"]) == ["answer1", "answer2", "answer3", "answer4"]
    assert candidates("Q?", FORMATS["answer"], gold="answer5")[-1] == "answer5"
    assert candidates("Q?", FORMATS["solution"]) == ["solution1", "solution2"]


def test_question_keeps_the_training_response_form():
    q = make_question(0, {"instruction": "Is it?\n\nAnswer format: true/false", "input": "",
                          "output": "the correct answer is true", "answer": "true"})
    assert q.response("false") == "the correct answer is false" and q.labels == ("true", "false")
    assert q.prompt == build_prompt("Is it?\n\nAnswer format: true/false")
    bare = make_question(1, {"instruction": "Pick.", "input": "", "output": "", "answer": "option2"})
    assert bare.response("option1") == "the correct answer is option1" and bare.labels == ("option1", "option2")


# --- a real (tiny, random) LLaMA --------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(seed=0)


def test_likelihood_scores_are_response_log_probabilities(llama):
    model, tok = llama
    rows = SET[:2]
    result = evaluate(model, tok, rows, modes=["likelihood"], loss=False, batch_size=3)
    model.eval()
    for record, r in zip(result.examples["likelihood"], rows):
        q = make_question(0, r)
        for label in q.labels:
            prompt_len = len(tok(q.prompt)["input_ids"])
            ids = tok(q.prompt + q.response(label), return_tensors="pt")["input_ids"]
            with torch.no_grad():
                logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            expected = logp[torch.arange(prompt_len - 1, ids.shape[1] - 1), ids[0, prompt_len:]].sum().item()
            assert record["scores"][label] == pytest.approx(expected, abs=1e-4)
    model.train()


def test_batching_and_padding_do_not_change_results(llama):
    model, tok = llama
    kwargs = dict(modes=["generate", "likelihood"], limit=5, max_new_tokens=6)  # prompts of different lengths
    one = evaluate(model, tok, SET, batch_size=1, **kwargs)
    many = evaluate(model, tok, SET, batch_size=3, **kwargs)
    assert [r["generation"] for r in one.examples["generate"]] == [r["generation"] for r in many.examples["generate"]]
    for a, b in zip(one.examples["likelihood"], many.examples["likelihood"]):
        assert a["prediction"] == b["prediction"]
        for label in a["scores"]:
            assert a["scores"][label] == pytest.approx(b["scores"][label], abs=1e-4)
    assert one.loss == pytest.approx(many.loss, rel=1e-5) and model.training


def test_loss_and_perplexity_match_the_training_loss(llama):
    model, tok = llama
    rows = [{"instruction": "Say hi.", "input": "", "output": "hi there", "answer": ""},
            {"instruction": "Count.", "input": "to three", "output": "one two three", "answer": ""}]
    result = evaluate(model, tok, rows, modes=["generate"], batch_size=1)  # Alpaca rows: loss only
    assert result.accuracy == {}
    columns, _ = tokenize_rows(rows, tok)
    batch = PadCollator(tok.pad_token_id)([{"input_ids": i, "labels": l} for i, l in
                                           zip(columns["input_ids"], columns["labels"])])
    model.eval()
    with torch.no_grad():
        expected = model(**batch).loss.item()  # HF: mean over all response tokens of the batch
    model.train()
    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(torch.tensor(expected).exp().item(), rel=1e-5)
    assert result.loss_tokens == sum(l != -100 for ls in columns["labels"] for l in ls[1:])
    with pytest.raises(EvalError, match="answer"):
        evaluate(model, tok, rows, modes=["likelihood"], loss=False)


def test_4bit_linears_keep_train_mode_so_the_model_can_go_on_training(tmp_path):
    import bitsandbytes as bnb

    tiny_llama(tmp_path, seed=0)
    cfg = RunConfig(base_model=str(tmp_path), load_in_4bit=True, lora_r=4)
    base, tok = load_base_model(cfg, device="cpu")
    model = wrap_with_lora(base, cfg)
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen.setdefault(name, module.training)
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (bnb.nn.Linear4bit, nn.Dropout)):
            module.register_forward_hook(record(name))
    evaluate(model, tok, SET[:2], modes=["likelihood"], batch_size=2)
    assert seen and all(seen[n] for n in seen if "lora_dropout" not in n)  # 4-bit layers: train mode
    assert not any(seen[n] for n in seen if "lora_dropout" in n)  # dropout: off
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in quantized)
    assert model.training
    loss = model(**PadCollator(tok.pad_token_id)([{"input_ids": [1, 5, 6, 7], "labels": [-100, 5, 6, 7]}])).loss
    loss.backward()  # still trains
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_report_table_and_json(tok):
    result = evaluate(ScriptedLM(tok, SCRIPT), tok, SET, modes=["generate", "likelihood"], loss=False, task="hand")
    console = Console(record=True, width=160)
    console.print(results_table([result]))
    text = console.export_text()
    assert "hand" in text and "0.6667 (4)" in text
    report = json.loads(json.dumps(results_json([result], {"model": "scripted"})))
    assert report["meta"] == {"model": "scripted"}
    assert report["tasks"][0]["accuracy"]["generate"] == pytest.approx(4 / 6)
    assert len(report["tasks"][0]["examples"]["likelihood"]) == 6


def test_eval_command_writes_table_and_json(tmp_path):
    from typer.testing import CliRunner

    from reflora_ds.cli import app

    tiny_llama(tmp_path / "tiny", seed=0)
    data = tmp_path / "set.json"
    data.write_text(json.dumps(SET))
    out = tmp_path / "report.json"
    runner = CliRunner()
    done = runner.invoke(app, ["eval", "--base-model", str(tmp_path / "tiny"), "--data", str(data), "--data",
                               str(data), "--mode", "both", "--limit", "3", "--batch-size", "2",
                               "--max-new-tokens", "4", "--out", str(out)])
    assert done.exit_code == 0, done.output
    report = json.loads(out.read_text())
    assert [t["rows"] for t in report["tasks"]] == [3, 3] and report["meta"]["modes"] == ["generate", "likelihood"]
    assert set(report["tasks"][0]["accuracy"]) == {"generate", "likelihood"} and report["tasks"][0]["loss"] > 0
    assert "acc" in done.output or "likelihood" in done.output

    bad = runner.invoke(app, ["eval", "--base-model", str(tmp_path / "tiny"), "--mode", "sample"])
    assert bad.exit_code == 2 and "choose generate" in bad.output


def test_options_differing_in_the_last_token_share_one_forward_and_score_the_same(llama):
    """Shared-prefix scoring is exact: every option's log-likelihood equals its own full forward's."""
    from reflora_ds.evaluate import _option_sequences, response_logprobs

    model, tok = llama
    middle = dict(SET[0], output="answer2 is the correct one")  # the label is not the last token: no sharing
    rows = [SET[0], SET[1], SET[4], middle]
    questions = [make_question(i, r) for i, r in enumerate(rows)]
    sequences = _option_sequences(questions, tok, "alpaca")
    per_question = {q.index: sum(s["index"] == q.index for s in sequences) for q in questions}
    assert per_question[0] == 1 and per_question[2] == 1  # answerN / endingN: one forward for all options
    assert per_question[3] == len(questions[3].labels)  # label mid-response: one forward per option

    result = evaluate(model, tok, rows, modes=["likelihood"], loss=False, batch_size=2)
    collate = PadCollator(tok.pad_token_id)
    model.eval()
    for q, record in zip(questions, result.examples["likelihood"]):
        for label in q.labels:
            columns, _ = tokenize_rows([{"instruction": q.instruction, "input": q.input, "output": q.response(label),
                                         "answer": label}], tok, cutoff_len=1 << 20)
            ids, labels = columns["input_ids"][0][:-1], columns["labels"][0][:-1]  # without the training EOS
            with torch.no_grad():
                alone = response_logprobs(model, collate([{"input_ids": ids, "labels": labels}])).total.item()
            assert record["scores"][label] == pytest.approx(alone, abs=1e-4)
    model.train()


@pytest.mark.parametrize("cutoff_len", [256, 110])  # 110: two rows are truncated in training
def test_loss_from_the_likelihood_forwards_equals_the_separate_loss_pass(llama, cutoff_len):
    """With likelihood and loss both asked for, one pass gives both: the same loss as scoring it alone."""
    model, tok = llama
    free_text = dict(SET[0], output="I think it is the second one")  # a training text that is not the template
    rows = [*SET, free_text]
    both = evaluate(model, tok, rows, modes=["likelihood"], loss=True, batch_size=3, cutoff_len=cutoff_len)
    alone = evaluate(model, tok, rows, modes=[], loss=True, batch_size=3, cutoff_len=cutoff_len)
    assert both.loss_tokens == alone.loss_tokens
    assert both.loss == pytest.approx(alone.loss, rel=1e-5)
    assert both.seconds["loss"] < both.seconds["likelihood"]  # the loss pass only covers what was left


def test_sample_loss_of_plain_text_equals_the_model_loss(llama):
    """Labels on every token (causal-LM text), rows of different lengths: the same loss as the model's own."""
    from reflora_ds.evaluate import sample_loss

    model, tok = llama
    texts = ["The quick brown fox jumps over the lazy dog.", "A tiny model learns.", "the correct answer is answer4"]
    samples = [{"input_ids": ids, "labels": ids} for ids in (tok(t)["input_ids"] for t in texts)]
    got = sample_loss(model, samples, batch_size=3, pad_token_id=tok.pad_token_id)
    batch = PadCollator(tok.pad_token_id)(samples)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).loss.item()  # HF: mean over every labelled token of the batch
    model.train()
    assert got["tokens"] == sum(len(s["input_ids"]) - 1 for s in samples)
    assert got["loss_sum"] / got["tokens"] == pytest.approx(expected, rel=1e-5)
