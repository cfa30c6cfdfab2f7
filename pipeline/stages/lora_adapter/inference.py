"""A finished training loaded for inference, whatever its method, behind one interface.

``load_trained(base_path, folder)`` returns a model that answers like a causal LM (``forward``
with ``input_ids`` / ``attention_mask`` / ``past_key_values`` / ``logits_to_keep``, ``generate``,
``device``) and whose ``disable_adapter()`` context gives the base model, so that evaluation,
the merge check and ``pipeline.ask`` treat every method alike:

* adapters (LoRA family, LoHa, LoKr, AdaLoRA, IA3): peft's ``PeftModel`` as it is;
* prompt learning: :class:`PromptLearningModel`, the inputs run over the virtual tokens' KV cache
  (``methods.virtual_prefix``, the same computation as in training);
* ``full``: :class:`FullModel`, the trained model with the base weights loaded apart.
"""

from __future__ import annotations

import contextlib

import torch

from pipeline.stages.lora_adapter.spec import trained_method


class PromptLearningModel(torch.nn.Module):
    """A prompt-learning ``PeftModel`` as a plain causal LM: every call without a cache starts from
    the virtual tokens' cache, and every attention mask is extended over them."""

    def __init__(self, peft_model):
        super().__init__()
        self.peft_model = peft_model
        self.n_virtual = peft_model.active_peft_config.num_virtual_tokens
        self._disabled = False

    @property
    def base(self):
        return self.peft_model.get_base_model()

    @property
    def device(self):
        return self.base.device

    @property
    def config(self):
        return self.base.config

    @property
    def dtype(self):
        return self.base.dtype

    @property
    def generation_config(self):
        return self.base.generation_config

    @contextlib.contextmanager
    def disable_adapter(self):
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = False

    def _mask(self, attention_mask, total: int | None = None):
        """A 2D mask over the real tokens only, extended over the virtual tokens; a mask that already
        covers ``total`` positions (the cache's, virtual tokens included, and the inputs) or a 4D
        mask is the caller's own and kept as it is."""
        if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[1] == total:
            return attention_mask
        ones = attention_mask.new_ones((attention_mask.shape[0], self.n_virtual))
        return torch.cat([ones, attention_mask], dim=1)

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=None, **kwargs):
        if self._disabled:
            return self.base(
                input_ids=input_ids,
                attention_mask=attention_mask,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
        from pipeline.stages.lora_adapter.methods import virtual_prefix

        if past_key_values is None:
            past_key_values = virtual_prefix(self.peft_model, input_ids.shape[0])
        total = past_key_values.get_seq_length() + input_ids.shape[1]
        return self.base(
            input_ids=input_ids,
            attention_mask=self._mask(attention_mask, total),
            past_key_values=past_key_values,
            use_cache=True,
            **kwargs,
        )

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """The base model's ``generate`` continuing from the virtual tokens' cache: the ids it is given
        open with placeholders for the virtual tokens (the cache already holds them, so they are never
        read), which are cut from the output again."""
        if self._disabled:
            return self.base.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        from pipeline.stages.lora_adapter.methods import virtual_prefix

        batch = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        placeholders = input_ids.new_full((batch, self.n_virtual), int(kwargs.get("pad_token_id") or 0))
        out = self.base.generate(
            input_ids=torch.cat([placeholders, input_ids], dim=1),
            attention_mask=self._mask(attention_mask),
            past_key_values=virtual_prefix(self.peft_model, batch),
            **kwargs,
        )
        return out[:, self.n_virtual :]


class FullModel(torch.nn.Module):
    """A fully fine-tuned model and its base, loaded apart; ``disable_adapter()`` switches to the base."""

    def __init__(self, tuned, base):
        super().__init__()
        self.tuned, self.base = tuned, base
        self._active = tuned

    @property
    def device(self):
        return self._active.device

    @property
    def config(self):
        return self._active.config

    @property
    def dtype(self):
        return self._active.dtype

    @property
    def generation_config(self):
        return self._active.generation_config

    @contextlib.contextmanager
    def disable_adapter(self):
        self._active = self.base
        try:
            yield
        finally:
            self._active = self.tuned

    def forward(self, *args, **kwargs):
        return self._active(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self._active.generate(*args, **kwargs)


def load_trained(
    base_path: str, folder: str, *, trust_remote_code: bool = False, dtype=torch.float32, device: str = "cpu"
):
    """(model, tokenizer, method): the training in ``folder`` over the base in ``base_path``, in
    ``dtype`` on ``device``, in eval mode. Weights load from safetensors only."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.stages.base_model import check_adapter_folder
    from pipeline.stages.lora_adapter.methods import is_prompt_learning

    method = trained_method(folder)
    if method != "full":
        check_adapter_folder(folder)  # safetensors only, checked before anything in the folder is read
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)

    def load(path):
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )

    if method == "full":
        model = FullModel(load(folder), load(base_path))
    else:
        model = PeftModel.from_pretrained(load(base_path), folder, autocast_adapter_dtype=False)
        model.to(dtype=dtype)
        if is_prompt_learning(method):
            model = PromptLearningModel(model)
    model.to(device)
    model.eval()
    return model, tokenizer, method
