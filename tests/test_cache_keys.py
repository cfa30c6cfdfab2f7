"""Cache keys stay put: for unchanged data and settings, tokenization, training, evaluation and
export compute the keys they computed before the layout moved (values recorded from the commit
before the move), so a `make run` on a data folder from before retrains and re-exports nothing.
A change that means to invalidate caches changes a format or engine version and these literals."""

from assets.evaluation_report import EvaluationReportConfig, evaluation_key
from assets.lora_adapter import LoraAdapterConfig, training_key
from assets.merged_model import MergedModelConfig, merged_key
from pipeline.stages.tokenized_dataset import DEFAULT_SYSTEM_PROMPT, cache_key

TOKENIZED = "0c5589f19a57dfac6fa2d24079d429f0314a7388eee7bf5b59f301925d357605"
ADAPTER = "fca23461038536e8"
# a key changes only on purpose: a new evaluation or export format, or a new setting of either
EVALUATION = "68b4c973ff8555ee"
MERGED = "a99101a8d958801e"
# an earlier default system prompt (76 tokens, half of every prompt; now 20): pinned at it
SYSTEM_PROMPT_BEFORE = "你是一名中医药知识助手。请根据患者描述的症状，推荐适合的中成药，并说明它的功效与用法。"


def test_the_default_keys_are_those_from_before_the_move():
    assert cache_key("data-fp", "tokenizer-fp", "{{ template }}", 2048, SYSTEM_PROMPT_BEFORE) == TOKENIZED
    assert (
        cache_key("data-fp", "tokenizer-fp", "{{ template }}", 2048, DEFAULT_SYSTEM_PROMPT) != TOKENIZED
    )  # moved on purpose
    # the move kept every default; r and alpha changed after it (16 / 32 then), epochs and
    # opening_repeats later (1 / 2 then): pinned at those values
    before = LoraAdapterConfig(r=16, lora_alpha=32, epochs=1.0, opening_repeats=2)
    aid, settings, _ = training_key(before, TOKENIZED, 2048, "base-fp")
    assert aid == ADAPTER and settings["max_seq_len"] == 2048
    assert evaluation_key(EvaluationReportConfig(), aid, TOKENIZED, "alpaca-fp")[:16] == EVALUATION
    assert merged_key(MergedModelConfig(), aid, "base-fp") == MERGED


def test_every_setting_and_input_moves_the_training_key():
    aid = training_key(LoraAdapterConfig(), TOKENIZED, 2048, "base-fp")[0]
    assert training_key(LoraAdapterConfig(learning_rate=2e-3), TOKENIZED, 2048, "base-fp")[0] != aid
    assert training_key(LoraAdapterConfig(), TOKENIZED, 4096, "base-fp")[0] != aid
    assert training_key(LoraAdapterConfig(), "other", 2048, "base-fp")[0] != aid
    assert training_key(LoraAdapterConfig(), TOKENIZED, 2048, "other")[0] != aid
    # where it logs and how often it saves are not part of what it learns
    assert (
        training_key(LoraAdapterConfig(log_every=1, eval_every=7, save_every=9), TOKENIZED, 2048, "base-fp")[0] == aid
    )
