"""The models' side of the evaluation: one forward per row that gives its answer loss, its prompt's
KV cache and its first greedy token; greedy decoding from those caches in batches; loading the
tuned model, and where and in what dtype it runs.

Why this shape: a row's prompt is most of
what generation, medicine-choice scoring and the answer loss each used to run again; a forward of
prompt + answer computes the prompt's keys and values as a by-product (causal attention: the
prompt's positions never see the answer), so one forward per row serves all three. Logits are
projected onto the vocabulary only from the last prompt position on (the prompt's own predictions
are never read). Decoding then runs all of a batch's rows together over their caches, stacked with
left padding; its position ids continue each row's own, so the answers equal one-at-a-time greedy
decoding (a test compares them, and with ``model.generate``).

Batch-invariant: a row's tokens are the same whatever batch it is decoded in, bit for bit (a test
decodes the same prompts at batch 1, 7 and 32). Two things made them differ, each an argmax flip
away from another answer: attention over the padded batch (its sums run over the batch's width),
so each row attends over its own cache (``attention.rows_attention``); and a matrix product of a
single row, which takes another kernel than two or more rows do (on this CPU its bf16 rounding
differs), so a lone row is decoded beside a copy of itself.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from pipeline.stages.tokenized_dataset import IGNORE_INDEX


def prompt_length(labels: list[int]) -> int:
    """The prompt's tokens: the labels' leading run of ``IGNORE_INDEX``."""
    return next((k for k, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))


@dataclass
class Prefilled:
    """One row after its forward: what generation and choice scoring continue from."""

    cache: object  # the KV cache of the prompt (and a prompt-learning model's virtual tokens)
    after_prompt: object  # log-probabilities of the token after the prompt (vocabulary,)
    loss: float = 0.0  # summed cross-entropy over the supervised answer tokens
    tokens: int = 0  # supervised answer tokens

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()


def prefill(model, input_ids: list[int], labels: list[int] | None = None) -> Prefilled:
    """Run ``input_ids`` (prompt, then optionally the answer) once: the answer tokens' summed loss
    where ``labels`` mark them, and the prompt's cache with the next-token distribution after it."""
    import torch
    import torch.nn.functional as F

    labels = labels if labels is not None else [IGNORE_INDEX] * len(input_ids)
    p = prompt_length(labels)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor([input_ids], dtype=torch.long, device=model.device),
            use_cache=True,
            logits_to_keep=len(input_ids) - p + 1,
        )
        logits = out.logits[0]  # predictions from the prompt's last position on
        loss, tokens = 0.0, 0
        if len(input_ids) > p:
            target = torch.tensor(labels[p:], dtype=torch.long, device=logits.device)
            loss = float(F.cross_entropy(logits[:-1].float(), target, ignore_index=IGNORE_INDEX, reduction="sum"))
            tokens = int((target != IGNORE_INDEX).sum())
        cache = out.past_key_values
        crop_to(cache, cache.get_seq_length() - (len(input_ids) - p))  # keep the prompt's part
        after = torch.log_softmax(logits[0].float(), dim=-1)
    return Prefilled(cache, after, loss, tokens)


def crop_to(cache, length: int) -> None:
    """Drop a cache's entries after its first ``length`` positions."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def stack_caches(caches: list, dtype=None):
    """One batch cache from single-row caches, left-padded to the longest (pad slots are zeros,
    masked out); returns (cache, attention mask of the cached width)."""
    import torch
    from transformers import DynamicCache

    lengths = [c.get_seq_length() for c in caches]
    width = max(lengths)
    batch = DynamicCache()
    for li in range(len(caches[0].layers)):
        k0 = caches[0].layers[li].keys
        keys = k0.new_zeros((len(caches), k0.shape[1], width, k0.shape[3]))
        values = keys.clone()
        for b, c in enumerate(caches):
            keys[b, :, width - lengths[b] :] = c.layers[li].keys[0]
            values[b, :, width - lengths[b] :] = c.layers[li].values[0]
        batch.update(keys, values, li)
    mask = torch.zeros((len(caches), width), dtype=torch.long, device=k0.device)
    for b, n in enumerate(lengths):
        mask[b, width - n :] = 1
    return batch, mask


def decode_greedy(
    model, rows: list[Prefilled], *, max_new_tokens: int, stop_ids: list[int], pad_id: int
) -> list[list[int]]:
    """Greedy continuations of prefilled rows, all rows a step at a time over their stacked caches:
    new token ids up to and excluding the first stop token (batch-invariant: see the module)."""
    import torch

    from pipeline.stages.lora_adapter.attention import ROWS_NAME, register

    register()
    alone = len(rows) == 1
    rows = rows * 2 if alone else rows  # a one-row matrix product would round differently
    cache, mask = stack_caches([r.cache for r in rows])
    device = mask.device
    starts = [mask.shape[1] - r.length for r in rows]
    positions = torch.tensor([r.length for r in rows], device=device)
    token = torch.stack([r.after_prompt.argmax() for r in rows]).to(device)
    stops = torch.tensor(stop_ids, device=device)
    out = [token]
    done = torch.isin(token, stops)
    with torch.no_grad(), attention_as(model, ROWS_NAME):
        for step in range(1, max_new_tokens):
            if bool(done.all()):
                break
            logits = model(
                input_ids=token[:, None],
                position_ids=(positions + step - 1)[:, None],
                past_key_values=cache,
                use_cache=True,
                row_starts=starts,
            ).logits[:, -1]
            token = torch.where(done, torch.full_like(token, pad_id), logits.argmax(-1))
            out.append(token)
            done = done | torch.isin(token, stops)
    ids = torch.stack(out, dim=1).tolist()[:1] if alone else torch.stack(out, dim=1).tolist()
    return [row[: next((k for k, t in enumerate(row) if t in stop_ids), len(row))] for row in ids]


@contextmanager
def attention_as(model, name: str):
    """The model's attention implementation set to ``name`` for the block (a PeftModel's base's)."""
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def generate_greedy(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    stop_ids: list[int],
    batch_size: int = 8,
    progress=None,
) -> list[list[int]]:
    """Greedy continuations (new token ids, up to and excluding the first stop token) of text
    prompts: each prompt prefilled alone (no padding), then decoded ``batch_size`` rows at a time,
    prompts of similar length together."""
    from pipeline.stages.tokenized_dataset import pad_token_id

    pad_id = pad_token_id(tokenizer, stop_ids[0])
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    results: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        answers = decode_greedy(
            model,
            [prefill(model, encoded[i]) for i in idx],
            max_new_tokens=max_new_tokens,
            stop_ids=stop_ids,
            pad_id=pad_id,
        )
        for i, a in zip(idx, answers):
            results[i] = a
        if progress:
            progress(start + len(idx), len(order))
    return results


def answer_losses(
    model, rows: list[tuple[list[int], list[int]]], pad_id: int | None = None, batch_size: int | None = None
) -> list[tuple[float, int]]:
    """(summed loss, supervised tokens) per row, on the answer tokens only: each row alone (no
    padding), its logits projected onto the vocabulary from its last prompt position on. Equals the
    model's own loss on that row (a test checks it). ``pad_id`` and ``batch_size`` are not used."""
    out = []
    for ids, labels in rows:
        r = prefill(model, list(ids), list(labels))
        out.append((r.loss, r.tokens))
    return out


def stop_token_ids(tokenizer) -> list[int]:
    """The end-of-turn token first, then the tokenizer's eos if it differs."""
    from pipeline.stages.tokenized_dataset import end_of_turn_id

    ids = [end_of_turn_id(tokenizer)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def load_tuned_model(base_path: str, adapter_path: str, trust_remote_code: bool = False, dtype: str = "fp32"):
    """The trained model over its base (safetensors only; ``dtype`` fp32, bf16 or fp16), whatever the
    method (``pipeline.stages.lora_adapter.inference``): its ``disable_adapter()`` gives the base
    model. Returns the model and the training's tokenizer."""
    import torch

    from pipeline.stages.lora_adapter.inference import load_trained

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    model, tokenizer, _ = load_trained(
        base_path, adapter_path, trust_remote_code=trust_remote_code, dtype=torch_dtype, device=inference_device()
    )
    return model, tokenizer


def eval_dtype(setting: str) -> str:
    """``auto``: bf16 where the device computes it natively (the training's own choice), else fp32."""
    if setting != "auto":
        return setting
    import torch

    from pipeline.stages.lora_adapter.model import resolve_precision

    return "bf16" if resolve_precision("auto", torch.cuda.is_available()) == "bf16" else "fp32"


def inference_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
