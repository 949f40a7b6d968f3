"""Accuracy, loss and perplexity of a causal LM on instruction-format sets.

Multiple-choice sets in the LLM-Adapters format carry their label in `answer`
(answer1..answerK, true/false, option1/2, solution1/2, ending1..4) and list the
allowed labels in the instruction's last line, "Answer format: a/b/c". Two ways
to score them:

- generate: greedy decoding after the prompt template, then the first label of
  the set's kind found in the text (as LLM-Adapters' commonsense_evaluate.py
  does); a generation without a label counts as wrong.
- likelihood: the log-likelihood of the response with each allowed label in
  place of the gold one ("the correct answer is answer3"), the best one wins.

Loss and perplexity use the training tokenization (data.tokenize_rows: loss on
the response and EOS only), so they read the same as the training loss.

Under torch.distributed every rank scores its own stride of the rows and the
per-row records are gathered on every rank. Models partitioned by ZeRO-3 need
every rank to run the same number of forwards; the short ranks run dummies.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from . import dist
from .data import IGNORE_INDEX, PadCollator, read_rows, row_prompt, tokenize_rows

MODES = ("generate", "likelihood")


class EvalError(ValueError):
    """A set that cannot be scored, with the row that shows why."""


# --- labels -----------------------------------------------------------------------


@dataclass(frozen=True)
class LabelFormat:
    """One kind of label: numbered (stem + digit, e.g. answer3) or true/false."""

    name: str
    stem: str | None  # None for true/false
    default_count: int = 0  # numbered labels assumed when the instruction lists none

    @property
    def pattern(self) -> re.Pattern:
        # Case-insensitive and "ending 2" = "ending2": generations vary in both.
        if self.stem is None:
            return re.compile(r"\b(true|false)\b", re.IGNORECASE)
        return re.compile(rf"{self.stem}\s?([0-9]+)", re.IGNORECASE)

    def normalise(self, match: re.Match) -> str:
        if self.stem is None:
            return match.group(1).lower()
        return f"{self.stem}{int(match.group(1))}"

    def find(self, text: str) -> str | None:
        """The first label of this kind in free text, normalised; None if there is none."""
        match = self.pattern.search(text)
        return self.normalise(match) if match else None

    def parse(self, label: str) -> str | None:
        """A label given on its own (a gold answer, an option list entry), normalised."""
        match = self.pattern.fullmatch(label.strip())
        return self.normalise(match) if match else None

    def defaults(self) -> list[str]:
        if self.stem is None:
            return ["true", "false"]
        return [f"{self.stem}{i}" for i in range(1, self.default_count + 1)]


# The sets of LLM-Adapters' commonsense benchmark and the label each uses.
LABEL_FORMATS = (
    LabelFormat("answer", "answer", 4),  # ARC-Easy, ARC-Challenge, OpenBookQA (4-5), Social IQa (3)
    LabelFormat("true/false", None),  # BoolQ
    LabelFormat("option", "option", 2),  # WinoGrande
    LabelFormat("solution", "solution", 2),  # PIQA
    LabelFormat("ending", "ending", 4),  # HellaSwag
)

_ANSWER_FORMAT_LINE = re.compile(r"answer format:\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)


def label_format(answer: str) -> LabelFormat:
    """The label kind of a gold answer; EvalError if it is none of the known ones."""
    for fmt in LABEL_FORMATS:
        if fmt.parse(answer) is not None:
            return fmt
    known = "answerN, true/false, optionN, solutionN, endingN"
    raise EvalError(f"answer {answer!r} is not a known label ({known})")


def candidates(instruction: str, fmt: LabelFormat, gold: str | None = None) -> list[str]:
    """The labels a row allows: its "Answer format:" line, else the format's defaults."""
    found = _ANSWER_FORMAT_LINE.findall(instruction)
    labels: list[str] = []
    if found:
        for part in found[-1].split("/"):
            label = fmt.parse(part)
            if label is not None and label not in labels:
                labels.append(label)
    if not labels:
        labels = fmt.defaults()
        if gold is not None and fmt.stem is not None:
            # A gold answer beyond the defaults (answer5) says how many there are.
            n = int(gold[len(fmt.stem):])
            labels = [f"{fmt.stem}{i}" for i in range(1, max(n, len(labels)) + 1)]
    if gold is not None and gold not in labels:
        labels.append(gold)
    return labels


@dataclass(frozen=True)
class Question:
    """A row ready to score: its prompt, gold label, allowed labels and response template."""

    index: int
    prompt: str
    instruction: str
    input: str
    answer: str
    format: LabelFormat
    labels: tuple[str, ...]
    template: str  # the response with "{label}" where the label goes

    def response(self, label: str) -> str:
        return self.template.replace("{label}", label)


def make_question(index: int, row: dict, template: str = "alpaca") -> Question:
    try:
        fmt = label_format(row["answer"])
    except EvalError as err:
        raise EvalError(f"row {index}: {err}") from None
    gold = fmt.parse(row["answer"])
    output = row.get("output") or ""
    # The training target with the gold label swapped out, so every candidate
    # is scored in exactly the form the model was fine-tuned to produce.
    position = output.lower().rfind(row["answer"].strip().lower()) if row["answer"].strip() else -1
    if position >= 0:
        response = output[:position] + "{label}" + output[position + len(row["answer"].strip()):]
    else:
        response = "the correct answer is {label}"
    return Question(
        index=index,
        prompt=row_prompt(row, template),
        instruction=row["instruction"],
        input=row.get("input", ""),
        answer=gold,
        format=fmt,
        labels=tuple(candidates(row["instruction"], fmt, gold)),
        template=response,
    )


# --- model state and distribution ------------------------------------------------


def _is_4bit_linear(module) -> bool:
    if "bitsandbytes" not in sys.modules:
        return False
    import bitsandbytes as bnb

    return isinstance(module, bnb.nn.Linear4bit)


@contextlib.contextmanager
def inference_mode(model) -> Iterator[None]:
    """Dropout off and no gradients for the duration; every module's mode restored after.

    bitsandbytes (>= 0.49, AVX512-BF16 CPUs) repacks a 4-bit weight in place at
    its first eval-mode no-grad forward, and such a model no longer trains.
    4-bit linears therefore keep the mode they had: a model in train mode can
    be evaluated mid-training and go on training. (A model loaded only for
    evaluation is in eval mode already, and a repack there does no harm.)
    """
    modes = [(module, module.training) for module in model.modules()]
    try:
        for module, was_training in modes:
            module.training = was_training if _is_4bit_linear(module) else False
        with torch.no_grad():
            yield
    finally:
        for module, was_training in modes:
            module.training = was_training


def _gather(records: list[dict]) -> list[dict]:
    """Every rank's records on every rank, in row order."""
    parts = dist.all_gather_objects(records)
    return sorted((r for part in parts for r in part), key=lambda r: r["index"])


def _lockstep(model) -> bool:
    """Whether every rank must run the same number of forwards (ZeRO-3 gathers parameters in each)."""
    return dist.has_partitioned_params(model) and dist.rank_and_world()[1] > 1


def _batches_in_lockstep(items: Sequence, batch_size: int, lockstep: bool) -> Iterator[tuple[list, bool]]:
    """(batch, real) pairs; with lockstep, dummy batches pad every rank to the longest rank's count."""
    batches = [list(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
    extra = 0
    if lockstep:
        # Agreed before the first forward: a collective here must not interleave with the forwards' own.
        extra = max(dist.all_gather_objects(len(batches))) - len(batches)
    for batch in batches:
        yield batch, True
    for _ in range(extra):
        yield [], False


def _device(model) -> torch.device:
    return next(model.parameters()).device


# --- generate and parse ---------------------------------------------------------


@contextlib.contextmanager
def _padding_side(tokenizer, side: str) -> Iterator[None]:
    before = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = before


def _generate(model, tokenizer, prompts: list[str], max_new_tokens: int, synced: bool) -> list[str]:
    from transformers import GenerationConfig

    # Left padding: every prompt ends at the same column, where generation starts.
    with _padding_side(tokenizer, "left"):
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=True)
    batch = {k: batch[k].to(_device(model)) for k in ("input_ids", "attention_mask")}
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    kwargs = {"synced_gpus": True} if synced else {}
    out = model.generate(**batch, generation_config=config, **kwargs)
    new_tokens = out[:, batch["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def score_generate(
    model, tokenizer, questions: Sequence[Question], *, batch_size: int = 8, max_new_tokens: int = 32,
    dummy: Question | None = None, on_batch: Callable[[int], None] | None = None,
) -> list[dict]:
    """One record per question: the generation, the label parsed from it (or None), and correctness.

    Prompts of similar length are batched together (left padding, one KV
    cache per batch), so little of each batch is padding; records are keyed
    by the question's index.
    """
    model = dist.unwrap(model)
    lockstep = _lockstep(model)
    records = []
    by_length = sorted(questions, key=lambda q: len(q.prompt))
    with inference_mode(model):
        for batch, real in _batches_in_lockstep(by_length, batch_size, lockstep):
            if not real:
                _generate(model, tokenizer, [(dummy or questions[0]).prompt], max_new_tokens, synced=True)
                continue
            texts = _generate(model, tokenizer, [q.prompt for q in batch], max_new_tokens, synced=lockstep)
            for q, text in zip(batch, texts):
                predicted = q.format.find(text)
                records.append({"index": q.index, "answer": q.answer, "prediction": predicted,
                                "correct": predicted == q.answer, "generation": text})
            if on_batch:
                on_batch(len(batch))
    return records


# --- likelihood of each option ------------------------------------------------------


@dataclass
class LogProbs:
    """Per row of a batch: ``total``, the summed log p of the labelled tokens; with alternatives,
    ``prefix``, that sum before the label position, and ``alternatives``, log p of each candidate there."""

    total: torch.Tensor
    prefix: torch.Tensor | None = None
    alternatives: list[list[float]] | None = None


def response_logprobs(model, batch: dict[str, torch.Tensor], alternatives: Sequence[Sequence[int]] | None = None,
                      after: Sequence[int] | None = None) -> LogProbs:
    """Log-probabilities of the labelled (non-IGNORE_INDEX) tokens of each row, one forward.

    With ``alternatives`` (token ids per row): log p of each of them at the
    row's label position, in place of the token there: the last labelled
    position, or ``after[b]`` positions before it (an EOS may follow the
    label). One forward then scores a row's options that share all but their
    label token: option k scores ``prefix + alternatives[k]``.
    """
    device = _device(model)
    batch = _to_left_padding(batch)
    # Only positions from the first labelled one on need logits: with left padding that is the last
    # `keep` columns of every row, and the model computes (and we normalise) no others.
    labelled = (batch["labels"][:, 1:] != IGNORE_INDEX).any(0).nonzero()  # as targets: label j is predicted at j-1
    keep = batch["labels"].shape[1] - int(labelled[0]) if len(labelled) else 1
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                   position_ids=batch["position_ids"].to(device), logits_to_keep=keep).logits
    logits = logits[:, -keep:-1].float()
    norm = logits.logsumexp(-1)
    targets = batch["labels"][:, -keep + 1:].to(logits.device)
    mask = targets != IGNORE_INDEX
    token_logp = logits.gather(-1, targets.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1) - norm
    token_logp = token_logp * mask
    if alternatives is None:
        return LogProbs(token_logp.sum(-1))
    positions = torch.arange(mask.shape[1], device=mask.device)
    at = (mask * positions).argmax(-1) - torch.as_tensor(after or [0] * len(mask), device=mask.device)
    prefix = (token_logp * (positions[None, :] < at[:, None])).sum(-1)
    alt = [(logits[b, at[b], list(ids)] - norm[b, at[b]]).tolist() for b, ids in enumerate(alternatives)]
    return LogProbs(token_logp.sum(-1), prefix, alt)


def _to_left_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A right-padded batch (PadCollator) moved to the left, with the position ids the tokens had unpadded."""
    lengths = batch["attention_mask"].sum(1)
    width = batch["input_ids"].shape[1]
    shift = (torch.arange(width)[None, :] - (width - lengths)[:, None]) % width  # row b rolled right by its padding
    moved = {k: batch[k].gather(1, shift) for k in ("input_ids", "attention_mask", "labels")}
    moved["position_ids"] = (moved["attention_mask"].cumsum(1) - 1).clamp_min(0)
    # A row's first token has no predecessor (in the right-padded batch it sat in column 0, never a target).
    first = torch.nn.functional.pad(moved["attention_mask"][:, :-1], (1, 0)) == 0
    moved["labels"] = moved["labels"].masked_fill(first, IGNORE_INDEX)
    return moved


def option_samples(questions: Sequence[Question], tokenizer, template: str, eos: bool = False) -> list[dict]:
    """Prompt + response for every (question, label), labels on the response (and with ``eos`` the EOS)."""
    rows, owners = [], []
    for q in questions:
        for label in q.labels:
            rows.append({"prompt": q.prompt, "instruction": q.instruction, "input": q.input, "output": q.response(label),
                         "answer": label})
            owners.append((q.index, label))
    if not rows:
        return []
    columns, _ = tokenize_rows(rows, tokenizer, template=template, cutoff_len=1 << 20)
    samples = []
    for (index, label), ids, labels in zip(owners, columns["input_ids"], columns["labels"]):
        if not eos and ids[-1] == tokenizer.eos_token_id:  # the training EOS: not part of the option
            ids, labels = ids[:-1], labels[:-1]
        samples.append({"index": index, "label": label, "input_ids": ids, "labels": labels})
    return samples


def _option_sequences(questions: Sequence[Question], tokenizer, template: str, eos: bool = False) -> list[dict]:
    """What to run forwards on: one sequence per question whose options differ only in their
    label token (each option read off that position), else one per option.

    Each sequence carries ``options``, the (label, label token id) pairs it
    scores, and ``gold``: whether it is the gold answer's own sequence (with
    ``eos``, its log-likelihood is then that row's training loss).
    """
    cut = 2 if eos else 1  # the tokens after the shared part: the label's last token (and the EOS)
    answers = {q.index: q.answer for q in questions}
    by_question: dict[int, list[dict]] = {}
    for sample in option_samples(questions, tokenizer, template, eos):
        by_question.setdefault(sample["index"], []).append(sample)
    sequences = []
    for index, samples in by_question.items():
        first = samples[0]
        shared = all(len(s["input_ids"]) == len(first["input_ids"]) and s["input_ids"][:-cut] == first["input_ids"][:-cut]
                     and s["labels"][-cut] != IGNORE_INDEX for s in samples)
        groups = [samples] if shared else [[s] for s in samples]
        for group in groups:
            own = next((s for s in group if s["label"] == answers[index]), group[0])  # the gold's tokens when here
            sequences.append({"index": index, "input_ids": own["input_ids"], "labels": own["labels"],
                              "options": [(s["label"], s["input_ids"][-cut]) for s in group],
                              "gold": own["label"] == answers[index], "after": cut - 1})
    return sequences


def score_likelihood(
    model, tokenizer, questions: Sequence[Question], *, batch_size: int = 8, template: str = "alpaca",
    dummy: Question | None = None, on_batch: Callable[[int], None] | None = None,
) -> list[dict]:
    """One record per question: each label's log-likelihood, the best label, and correctness.

    Options that differ only in their last token (every LLM-Adapters label
    format with a LLaMA tokenizer) share one forward; others get one each.
    batch_size counts sequences. Right padding with an attention mask leaves
    every real token's logits as without padding.
    """
    return _likelihood(model, tokenizer, questions, batch_size, template, dummy, on_batch)[0]


def _likelihood(model, tokenizer, questions: Sequence[Question], batch_size: int, template: str,
                dummy: Question | None, on_batch, loss_cutoff: int | None = None,
                outputs: dict[int, str] | None = None) -> tuple[list[dict], dict | None]:
    """score_likelihood's records; with ``loss_cutoff``, also the response loss of the gold answers
    (the gold's sequence then ends with EOS, as in training) over the rows whose gold response is
    their training ``outputs`` text and fits in loss_cutoff tokens, and the indices of the others
    ("uncovered": their loss is the caller's to compute)."""
    model = dist.unwrap(model)
    lockstep = _lockstep(model)
    collate = PadCollator(tokenizer.pad_token_id)
    eos = loss_cutoff is not None
    # Similar lengths side by side waste less compute on padding; scores are keyed, so order is free.
    sequences = sorted(_option_sequences(questions, tokenizer, template, eos), key=lambda x: len(x["input_ids"]))
    scores: dict[int, dict[str, float]] = {q.index: {} for q in questions}
    loss = {"loss_sum": 0.0, "tokens": 0, "uncovered": []}
    same_text = {q.index for q in questions if outputs is not None and q.response(q.answer) == outputs.get(q.index)}
    with inference_mode(model):
        for batch, real in _batches_in_lockstep(sequences, batch_size, lockstep):
            if not real:
                response_logprobs(model, collate(option_samples([dummy or questions[0]], tokenizer, template)[:1]))
                continue
            out = response_logprobs(model, collate(batch), [[t for _, t in s["options"]] for s in batch],
                                    [s["after"] for s in batch])
            for sequence, total, base, alt in zip(batch, out.total.tolist(), out.prefix.tolist(), out.alternatives):
                for (label, _), value in zip(sequence["options"], alt):
                    scores[sequence["index"]][label] = base + value
                if eos and sequence["gold"]:
                    # Truncated in training, or a training text other than the gold response: not this loss.
                    if len(sequence["input_ids"]) > loss_cutoff or sequence["index"] not in same_text:
                        loss["uncovered"].append(sequence["index"])
                    else:
                        loss["loss_sum"] -= total
                        loss["tokens"] += sum(label != IGNORE_INDEX for label in sequence["labels"][1:])
            if on_batch:
                on_batch(sum(len(s["options"]) for s in batch))
    records = []
    for q in questions:
        options = {label: scores[q.index][label] for label in q.labels}
        finite = [label for label in q.labels if math.isfinite(options[label])]
        # First label wins a tie; without one finite score there is no prediction (counted wrong).
        predicted = max(finite, key=lambda label: options[label]) if finite else None
        records.append({"index": q.index, "answer": q.answer, "prediction": predicted,
                        "correct": predicted == q.answer, "scores": options})
    return records, loss if eos else None


# --- loss and perplexity -------------------------------------------------------------


def sample_loss(model, samples: Sequence[dict], *, batch_size: int, pad_token_id: int, dummy: dict | None = None,
                on_batch: Callable[[int], None] | None = None) -> dict:
    """Summed loss over the labelled tokens of tokenized samples, and their count (sum across ranks).

    ``samples``: {"input_ids", "labels"} dicts, e.g. rows of a tokenized
    dataset; batches keep their order. Under ZeRO-3 every rank runs the same
    number of forwards, ``dummy`` (any sample) filling in where a rank has fewer.
    """
    model = dist.unwrap(model)
    collate = PadCollator(pad_token_id)
    total, tokens = 0.0, 0
    with inference_mode(model):
        for batch, real in _batches_in_lockstep(samples, batch_size, _lockstep(model)):
            if not real:
                response_logprobs(model, collate([dummy or samples[0]]))
                continue
            collated = collate(batch)
            total -= response_logprobs(model, collated).total.sum().item()
            tokens += int((collated["labels"][:, 1:] != IGNORE_INDEX).sum())
            if on_batch:
                on_batch(len(batch))
    return {"loss_sum": total, "tokens": tokens}


def score_loss(
    model, tokenizer, rows: Sequence[dict], *, batch_size: int = 8, cutoff_len: int = 256,
    template: str = "alpaca", dummy: dict | None = None, on_batch: Callable[[int], None] | None = None,
) -> dict:
    """Summed response-token loss and token count of these rows (combine across ranks by summing)."""

    def samples_of(part):
        if not part:
            return []
        columns, _ = tokenize_rows(list(part), tokenizer, template=template, cutoff_len=cutoff_len)
        return [{"input_ids": i, "labels": l} for i, l in zip(columns["input_ids"], columns["labels"])]

    samples = sorted(samples_of(rows), key=lambda x: len(x["input_ids"]))  # less padding; sums ignore order
    # What a rank with fewer batches runs under ZeRO-3 (its loss is thrown away): any tokens will do.
    filler = dummy or rows[0]
    ids = tokenizer(row_prompt(filler, template))["input_ids"][:cutoff_len]
    return sample_loss(model, samples, batch_size=batch_size, pad_token_id=tokenizer.pad_token_id,
                       dummy={"input_ids": ids, "labels": ids}, on_batch=on_batch)


def dataset_loss(model, dataset, *, batch_size: int, pad_token_id: int) -> float:
    """Token-mean loss of a tokenized dataset on all ranks together (each takes a stride of the rows)."""
    rank, world = dist.rank_and_world()
    mine = dataset.select(range(rank, len(dataset), world), keep_in_memory=True)
    samples = [{"input_ids": ids, "labels": labels} for ids, labels in zip(mine["input_ids"], mine["labels"])]
    first = {"input_ids": dataset[0]["input_ids"], "labels": dataset[0]["labels"]}
    local = sample_loss(model, samples, batch_size=batch_size, pad_token_id=pad_token_id, dummy=first)
    total, count = dist.all_reduce([local["loss_sum"], local["tokens"]], _device(dist.unwrap(model)))
    return total / max(count, 1)


# --- one set, all ranks ---------------------------------------------------------------


@dataclass
class EvalResult:
    """What one set scored; accuracy and correct are per mode, loss over response tokens."""

    task: str
    rows: int
    accuracy: dict[str, float] = field(default_factory=dict)
    correct: dict[str, int] = field(default_factory=dict)
    unparsed: int | None = None  # generations in which no label was found
    note: str | None = None  # what could not be scored, and why
    loss: float | None = None
    perplexity: float | None = None
    loss_tokens: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # per mode, "loss" and "total"
    examples: dict[str, list[dict]] = field(default_factory=dict)  # mode -> per-row records

    def summary(self) -> dict:
        out = asdict(self)
        out.pop("examples")
        return out


def _rows_of(data, tokenizer, limit: int | None) -> tuple[str, list[dict]]:
    """The task name and the (first ``limit``) rows; a conversation becomes the row evaluation scores: its
    prompt runs up to the last assistant turn, with the generation prompt."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        name = path.parent.name if path.stem in ("test", "train", "dev", "validation") else path.stem
        rows = read_rows(path).rows
    else:
        name, rows = "data", list(data)
    rows = rows[:limit] if limit is not None else rows
    if any("messages" in row for row in rows):
        from .chat import evaluation_row

        rows = [evaluation_row(tokenizer, row) if "messages" in row else row for row in rows]
    return name, rows


def evaluate(
    model,
    tokenizer,
    data,
    *,
    modes: Iterable[str] = ("generate",),
    loss: bool = True,
    task: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    cutoff_len: int = 256,
    template: str = "alpaca",
    progress: Callable[[str, int, int], None] | None = None,
    generate_batch_size: int | None = None,
) -> EvalResult:
    """Accuracy in each mode (rows with an `answer`), and loss/perplexity, of one set.

    `data` is a file path or a list of rows. Works on a PeftModel, a plain HF
    model or a DeepSpeed engine; leaves every module in the mode it found it
    (see inference_mode for why that matters for 4-bit bases). Under
    torch.distributed call it on every rank: each scores rows rank, rank+W, ...
    and every rank returns the combined result. `progress(stage, done, total)`
    is called after each batch with this rank's counts. With likelihood and
    loss both asked for, the loss comes from the likelihood forwards (the gold
    answer's sequence, with EOS as in training). `generate_batch_size`
    (default batch_size): prompts per generate call.
    """
    modes = list(modes)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise EvalError(f"unknown mode(s) {unknown}; known: {', '.join(MODES)}")
    name, rows = _rows_of(data, tokenizer, limit)
    if not rows:
        raise EvalError(f"{task or name}: no rows to evaluate")
    result = EvalResult(task=task or name, rows=len(rows))
    rank, world = dist.rank_and_world()
    start = time.perf_counter()

    def report(stage: str, total: int) -> Callable[[int], None] | None:
        if progress is None:
            return None
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            progress(f"{result.task} {stage}", done[0], total)
        return advance

    # A training-format set without labels (Alpaca) still has a loss.
    unlabelled = sum(not row.get("answer") for row in rows)
    if modes and unlabelled and not loss:
        raise EvalError(f"{result.task}: rows without an 'answer' label cannot be scored for accuracy")
    scored = modes if not unlabelled else []
    if modes and unlabelled:
        result.note = (f"no accuracy: {unlabelled} of {len(rows)} rows have no 'answer' label "
                       "(the LLM-Adapters format has one); loss only")
    merged_loss = None  # the loss taken from the likelihood forwards, when both are asked for
    if scored:
        questions = [make_question(i, row, template) for i, row in enumerate(rows)]
        mine = questions[rank::world]
        for mode in scored:
            mode_start = time.perf_counter()
            if mode == "generate":
                local = score_generate(model, tokenizer, mine, batch_size=generate_batch_size or batch_size,
                                       max_new_tokens=max_new_tokens, dummy=questions[0],
                                       on_batch=report(mode, len(mine)))
            else:
                sequences = sum(len(q.labels) for q in mine)
                local, merged_loss = _likelihood(model, tokenizer, mine, batch_size, template, questions[0],
                                                 report(mode, sequences), cutoff_len if loss else None,
                                                 {q.index: rows[q.index].get("output", "") for q in mine})
            records = _gather(local)
            result.examples[mode] = records
            result.correct[mode] = sum(r["correct"] for r in records)
            result.accuracy[mode] = result.correct[mode] / len(records)
            if mode == "generate":
                result.unparsed = sum(r["prediction"] is None for r in records)
            result.seconds[mode] = time.perf_counter() - mode_start

    if loss:
        loss_start = time.perf_counter()
        # Rows the likelihood pass did not cover (all of them without it; else those longer than cutoff_len).
        left = rows[rank::world] if merged_loss is None else [rows[i] for i in merged_loss["uncovered"]]
        local = score_loss(model, tokenizer, left, batch_size=batch_size, cutoff_len=cutoff_len,
                           template=template, dummy=rows[0], on_batch=report("loss", len(left)))
        if merged_loss is not None:
            local = {k: local[k] + merged_loss[k] for k in ("loss_sum", "tokens")}
        parts = _gather([{"index": rank, **local}])
        total, tokens = sum(p["loss_sum"] for p in parts), sum(p["tokens"] for p in parts)
        if tokens:
            result.loss = total / tokens
            result.perplexity = math.exp(min(result.loss, 700.0))
            result.loss_tokens = tokens
        result.seconds["loss"] = time.perf_counter() - loss_start
    result.seconds["total"] = time.perf_counter() - start
    return result


def accuracy_rows(cfg, eval_set) -> list[dict] | None:
    """The evaluation rows a training run scores for accuracy, or None when accuracy is off.

    They are the rows behind the tokenized evaluation samples (source_row), in
    the same order, the first eval_accuracy_limit of them. With eval_accuracy
    null, accuracy is on when every one carries an answer label this module knows.
    """
    from .data import EMBEDDED_TRAIN, DataError

    if eval_set is None or cfg.eval_accuracy is False:
        return None
    from .data import source_rows

    own_file = cfg.eval_data_path is not None
    source = cfg.eval_data_path if own_file else cfg.data_path
    rows = (read_rows(source, skip_malformed=cfg.skip_malformed_rows).rows if own_file else source_rows(cfg))
    picked = [(i, rows[i]) for i in eval_set["source_row"]][:cfg.eval_accuracy_limit]
    for index, row in picked:
        problem = _label_problem(row)
        if problem is None:
            continue
        if cfg.eval_accuracy or cfg.metric_for_best_model == "eval_accuracy":
            raise DataError(f"eval_accuracy: {source or EMBEDDED_TRAIN}: row {index}: {problem} "
                            "(set eval_accuracy: false to evaluate the loss only)")
        return None
    return [row for _, row in picked]


def _label_problem(row: dict) -> str | None:
    """Why a row cannot be scored for accuracy, or None if it can."""
    if not row.get("answer"):
        return "no answer label"
    try:
        label_format(row["answer"])
    except EvalError as err:
        return str(err)
    return None


# Tokens generated per row when a training run scores accuracy in generate mode (as `reflora-ds eval`).
TRAINING_MAX_NEW_TOKENS = 32


def run_scores(engine, tokenizer, eval_set, rows: list[dict] | None, cfg) -> dict:
    """What a training run measures at each evaluation: eval_loss, and eval_accuracy on ``rows``
    when there are any (all ranks together; the model's modes are restored after)."""
    scores = {"eval_loss": dataset_loss(engine, eval_set, batch_size=cfg.micro_batch_size,
                                        pad_token_id=tokenizer.pad_token_id)}
    if rows is not None:
        result = evaluate(engine, tokenizer, rows, modes=[cfg.eval_accuracy_mode], loss=False,
                          batch_size=cfg.micro_batch_size, max_new_tokens=TRAINING_MAX_NEW_TOKENS,
                          template=cfg.prompt_template)
        scores["eval_accuracy"] = result.accuracy[cfg.eval_accuracy_mode]
    return scores


# --- reporting -------------------------------------------------------------------------


def results_table(results: Sequence[EvalResult], title: str = "evaluation"):
    """A rich table: one row per set, accuracy per mode, loss and perplexity."""
    from rich.table import Table

    modes = [m for m in MODES if any(m in r.accuracy for r in results)]
    table = Table(title=title, caption="generate / likelihood: accuracy (rows correct)" if modes else None)
    table.add_column("task")
    table.add_column("rows", justify="right")
    for mode in modes:
        table.add_column(mode, justify="right")
    if "generate" in modes:
        table.add_column("unparsed", justify="right")
    table.add_column("loss", justify="right")
    table.add_column("ppl", justify="right")
    table.add_column("time", justify="right")
    for r in results:
        cells = [r.task, str(r.rows)]
        for mode in modes:
            cells.append(f"{r.accuracy[mode]:.4f} ({r.correct[mode]})" if mode in r.accuracy else "-")
        if "generate" in modes:
            cells.append("-" if r.unparsed is None else str(r.unparsed))
        cells.append("-" if r.loss is None else f"{r.loss:.4f}")
        cells.append("-" if r.perplexity is None else f"{r.perplexity:.3f}")
        cells.append(f"{r.seconds['total']:.1f}s")
        table.add_row(*cells)
    return table


def results_json(results: Sequence[EvalResult], meta: dict | None = None, examples: bool = True) -> dict:
    """The JSON report: run metadata, one summary per set and (optionally) every row's record."""
    tasks = []
    for r in results:
        entry = r.summary()
        if examples:
            entry["examples"] = r.examples
        tasks.append(entry)
    return {"meta": meta or {}, "tasks": tasks}
