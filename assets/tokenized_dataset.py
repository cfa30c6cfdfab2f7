"""Asset ``tokenized_dataset``: chat-template tokens with prompt-masked labels (``pipeline.stages.tokenized_dataset``).

Stored under ``$MEDTUNE_DATA_DIR/processed/tokenized/<key>/{train,eval}.parquet``; the key
covers the data, tokenizer, chat template, ``max_seq_len`` and system prompt, so unchanged
inputs are reused instead of recomputed.
"""

import pandas as pd
from dagster import AssetExecutionContext, Config, Failure, MetadataValue, Output, asset

from pipeline.core.fingerprint import sha256_file
from pipeline.stages.alpaca_dataset import AlpacaDataset
from pipeline.stages.base_model import BaseModelInfo, load_tokenizer
from pipeline.stages.tokenized_dataset import (
    IGNORE_INDEX,
    TokenizedDataset,
    TokenizerSettings,
    tokenize_dataset,
)
from resources.data_root import DataRoot


class TokenizedDatasetConfig(Config, TokenizerSettings):
    """How rows become token sequences
    (declared in ``pipeline.stages.tokenized_dataset.TokenizerSettings``)."""


def _example_markdown(tokenizer, ds: TokenizedDataset) -> str:
    for split in ("train", "eval"):
        df = ds.load(split)
        if len(df):
            ids, labels = list(df.iloc[0]["input_ids"]), list(df.iloc[0]["labels"])
            first = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
            prompt = tokenizer.decode(ids[:first]).replace("\n", "⏎")
            answer = tokenizer.decode(ids[first:]).replace("\n", "⏎")
            return (
                "**prompt (masked, "
                f"{IGNORE_INDEX})**\n\n```\n{prompt[-300:]}\n```\n\n**supervised**\n\n```\n{answer[:300]}\n```"
            )
    return "_no rows_"


@asset(group_name="data", compute_kind="transformers", description=__doc__)
def tokenized_dataset(
    context: AssetExecutionContext,
    config: TokenizedDatasetConfig,
    data_root: DataRoot,
    alpaca_dataset: AlpacaDataset,
    base_model: BaseModelInfo,
) -> Output[TokenizedDataset]:
    tokenizer = load_tokenizer(base_model)
    # the cache is keyed by the fingerprint handed down: it must be the fingerprint of what is read
    if (actual := sha256_file(alpaca_dataset.path)) != alpaca_dataset.data_fingerprint:
        raise Failure(
            description=(
                f"{alpaca_dataset.path} changed after it was written ({actual[:12]}, not "
                f"{alpaca_dataset.data_fingerprint[:12]})"
            )
        )
    alpaca = pd.read_parquet(alpaca_dataset.path)
    ds = tokenize_dataset(
        alpaca,
        tokenizer,
        data_fingerprint=alpaca_dataset.data_fingerprint,
        tokenizer_fingerprint=base_model.tokenizer_fingerprint,
        out_root=data_root.tokenized_dir,
        max_seq_len=config.max_seq_len,
        system_prompt=config.system_prompt,
        log=context.log.info,
    )
    s = ds.stats
    context.log.info(
        f"{'reused cached' if ds.cache_hit else 'tokenized'} {s['rows']} rows at {ds.path}: "
        f"length p50 {s['length_p50']:.0f}, p95 {s['length_p95']:.0f}, max {s['length_max']}, "
        f"{s['truncated_rows']} truncated, {s['prompt_too_long_rows']} prompts too long"
    )
    if s["prompt_too_long_rows"]:
        context.log.warning(
            f"{s['prompt_too_long_rows']} rows left out: their prompt alone exceeds max_seq_len {config.max_seq_len} "
            f"(record ids {', '.join(s['prompt_too_long_ids'][:10])})"
        )
    return Output(
        ds,
        metadata={
            "rows": s["rows"],
            "train_rows": s["rows_by_split"]["train"],
            "eval_rows": s["rows_by_split"]["eval"],
            "cache_hit": ds.cache_hit,
            "cache_key": ds.key,
            "tokens": s["tokens"],
            "length_p50": s["length_p50"],
            "length_p95": s["length_p95"],
            "length_max": s["length_max"],
            "truncated_rows": s["truncated_rows"],
            "prompt_too_long_rows": s["prompt_too_long_rows"],
            "supervised_share": s["supervised_share"],
            "max_seq_len": config.max_seq_len,
            "example": MetadataValue.md(_example_markdown(tokenizer, ds)),
            "path": MetadataValue.path(ds.path),
        },
    )
