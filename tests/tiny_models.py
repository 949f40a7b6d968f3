"""A tiny random LLaMA and its tokenizer, built in-process: the model of the tests and quick benchmarks.

Nothing downloads: the tokenizer is a byte-level BPE trained on a few
sentences, the model a two-layer LLaMA with random weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

_TINY_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "Below is an instruction that describes a task, paired with an input that provides further context.",
    "### Instruction:\n### Input:\n### Response:\n",
    "Please choose the correct answer to the question: Which factor will most likely cause a fever?",
    "Answer1: a leg muscle Answer2: a bacterial population Answer3: viral particles Answer4: carbohydrates",
    "Answer format: answer1/answer2/answer3/answer4",
    "the correct answer is answer1. the correct answer is answer2. the correct answer is answer3.",
    "the correct answer is answer4. true false option1 option2 solution1 solution2",
    "The quick brown fox jumps over the lazy dog. A tiny model learns from a tiny corpus.",
]


def tiny_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in-process: any text encodes, nothing downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_TINY_CORPUS, trainer)
    # Prepend BOS as LLaMA tokenizers do, so the prompt masking sees a special token.
    bos_id = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.padding_side = "right"
    return tokenizer


def tiny_llama(
    save_dir: str | Path | None = None, seed: int = 0, **overrides
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A randomly initialised two-layer LLaMA and its tokenizer, built in-process.

    `overrides` go to LlamaConfig. With `save_dir` both are saved there as a
    safetensors directory, loadable as an ordinary HF base model.
    """
    tokenizer = tiny_tokenizer()
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        use_cache=False,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    model.train()
    if save_dir is not None:
        model.save_pretrained(save_dir)
        tokenizer.save_pretrained(save_dir)
    return model, tokenizer
