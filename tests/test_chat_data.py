"""Conversation data: OpenAI messages and ShareGPT rows, the chat template, and assistant-only labels."""

import json

import pytest

from reflora_ds import chat
from reflora_ds.config import ConfigError, build_config, check_files
from reflora_ds.data import IGNORE_INDEX, DataError, preprocess, read_rows, tokenize_source
from reflora_ds.evaluate import make_question
from tiny_models import tiny_tokenizer

# A ChatML-like template: every turn "<s>role\ncontent</s>\n"; the generation prompt "<s>assistant\n".
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Which is a mammal? answer1 or answer2"},
    {"role": "assistant", "content": "the correct answer is answer2"},
    {"role": "user", "content": "And the other?"},
    {"role": "assistant", "content": "the correct answer is answer1"},
]
SHAREGPT = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
            for m in CONVERSATION]


@pytest.fixture(scope="module")
def tok():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def labelled_spans(ids, labels, tokenizer) -> list[str]:
    """The trained-on tokens, decoded run by run."""
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    if current:
        spans.append(current)
    return [tokenizer.decode(s) for s in spans]


def test_every_assistant_turn_and_only_those_is_trained_on(tok, tmp_path):
    rows = read_rows(write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}]))
    assert rows.chat and rows.format == "chat_template"
    columns, stats = tokenize_source(rows, tok, template="alpaca", cutoff_len=512)
    ids, labels = columns["input_ids"][0], columns["labels"][0]
    assert stats == {"rows": 1, "truncated": 0, "dropped_no_target": 0}
    # Token by token: the whole rendered text, BOS once (the template's own is dropped: the tokenizer adds one).
    text = chat.render(tok, CONVERSATION)
    assert ids == tok(text)["input_ids"] and ids.count(tok.bos_token_id) == 5
    assert labelled_spans(ids, labels, tok) == ["the correct answer is answer2</s>\n",
                                                "the correct answer is answer1</s>\n"]
    masked = [t for t, l in zip(ids, labels) if l == IGNORE_INDEX]
    assert tok.decode(masked).count("assistant") == 2 and "Answer briefly." in tok.decode(masked)


def test_sharegpt_rows_train_exactly_as_openai_rows(tok, tmp_path):
    openai = read_rows(write_jsonl(tmp_path / "a.jsonl", [{"messages": CONVERSATION}]))
    sharegpt = read_rows(write_jsonl(tmp_path / "b.jsonl", [{"conversations": SHAREGPT}]))
    assert sharegpt.rows == openai.rows
    assert (tokenize_source(sharegpt, tok, template="alpaca", cutoff_len=512)
            == tokenize_source(openai, tok, template="alpaca", cutoff_len=512))


def test_truncation_keeps_the_turns_that_fit(tok):
    whole, _ = chat.tokenize_conversations([CONVERSATION], tok, cutoff_len=512)
    first = next(i for i, label in enumerate(whole["labels"][0]) if label != IGNORE_INDEX)
    columns, stats = chat.tokenize_conversations([CONVERSATION], tok, cutoff_len=first + 2)
    assert stats["truncated"] == 1 and columns["labels"][0] == whole["labels"][0][:first + 2]
    # Cut before the first assistant turn: nothing to learn, dropped and counted.
    columns, stats = chat.tokenize_conversations([CONVERSATION], tok, cutoff_len=first)
    assert stats["dropped_no_target"] == 1 and columns["input_ids"] == []


@pytest.mark.parametrize("turns, problem", [
    ([], "non-empty list"),
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}], "unknown role 'wizard'"),
    ([{"role": "user"}, {"role": "assistant", "content": "x"}], "role/content"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], "content is int"),
])
def test_malformed_conversations_are_named_by_row(tmp_path, turns, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": CONVERSATION}, {"messages": turns}])
    with pytest.raises(DataError, match=f"row 1: messages: .*{problem}"):
        read_rows(path)
    assert len(read_rows(path, skip_malformed=True).rows) == 1


def test_a_tokenizer_without_template_gets_one_line_naming_the_key(tmp_path):
    bare = tiny_tokenizer()
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    with pytest.raises(DataError, match="no chat template: set chat_template"):
        preprocess(path, bare, cache_root=tmp_path / "cache")


def test_chat_template_from_a_file_or_inline(tmp_path):
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    assert chat.resolve_chat_template(str(tmp_path / "t.jinja")) == TEMPLATE
    assert chat.resolve_chat_template(TEMPLATE) == TEMPLATE
    with pytest.raises(ConfigError, match="chat_template: .*missing.jinja' is neither a Jinja template nor a file"):
        check_files(build_config({"chat_template": str(tmp_path / "missing.jinja")}))
    with pytest.raises(DataError, match="'chatml' is neither"):  # a name is not a template
        chat.resolve_chat_template("chatml")
    tokenizer = tiny_tokenizer()
    chat.use_chat_template(tokenizer, str(tmp_path / "t.jinja"))
    assert tokenizer.chat_template == TEMPLATE


def test_the_chat_template_is_part_of_the_cache_key(tok, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    first = preprocess(path, tok, cache_root=tmp_path / "cache")
    other = tiny_tokenizer()
    other.chat_template = TEMPLATE + "{# another template #}"
    second = preprocess(path, other, cache_root=tmp_path / "cache")
    assert first.path != second.path and not second.from_cache
    assert preprocess(path, tok, cache_root=tmp_path / "cache").from_cache


def test_evaluation_prompts_end_with_the_generation_prompt(tok):
    row = {"messages": chat.normalise_conversation(CONVERSATION), "answer": "answer1"}
    evaluation = chat.evaluation_row(tok, row)
    assert evaluation["prompt"] == chat.render(tok, CONVERSATION[:4], add_generation_prompt=True)
    assert evaluation["prompt"].endswith("And the other?</s>\n<s>assistant\n")
    assert evaluation["output"] == "the correct answer is answer1"
    question = make_question(0, evaluation)
    assert question.prompt == evaluation["prompt"] and question.answer == "answer1"
    assert question.response("answer2") == "the correct answer is answer2"


def test_a_conversation_column_of_another_name(tok, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"dialogue": SHAREGPT}])
    with pytest.raises(DataError, match="no 'messages' .* or 'conversations'"):
        read_rows(path, "chat_template")
    rows = read_rows(path, field_messages="dialogue")
    assert rows.chat and rows.rows[0]["messages"] == chat.normalise_conversation(CONVERSATION)
    cfg = build_config({"datasets": [{"path": str(path), "type": "chat_template", "field_messages": "dialogue"}]})
    assert cfg.datasets[0].field_messages == "dialogue"


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    tokenizer = tiny_tokenizer()
    # The generation prompt differs from how an assistant turn is rendered: the turn cannot be located.
    tokenizer.chat_template = TEMPLATE.replace("<s>assistant\n{% endif %}", "<s>bot\n{% endif %}")
    with pytest.raises(DataError, match="rewrites earlier turns"):
        chat.tokenize_conversations([CONVERSATION], tokenizer, cutoff_len=512)


def test_reflora_ds_eval_scores_chat_rows_in_both_modes(tmp_path):
    from reflora_ds.evaluate import evaluate
    from tiny_models import tiny_llama

    model, tokenizer = tiny_llama(seed=0)
    tokenizer.chat_template = TEMPLATE
    rows = [{"messages": CONVERSATION, "answer": "answer1"},
            {"messages": CONVERSATION[:3], "answer": "answer2"}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    result = evaluate(model, tokenizer, path, modes=["generate", "likelihood"], max_new_tokens=4)
    assert result.rows == 2 and set(result.accuracy) == {"generate", "likelihood"}
    assert result.loss is not None and result.loss > 0
    # What was scored: the options after the generation prompt.
    question = make_question(0, chat.evaluation_row(tokenizer, read_rows(path).rows[0]))
    assert question.prompt.endswith("And the other?</s>\n<s>assistant\n") and question.answer == "answer1"
    assert len(result.examples["likelihood"]) == 2
