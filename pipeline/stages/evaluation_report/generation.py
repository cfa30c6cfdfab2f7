"""The models' side of the evaluation: answer-token losses, batched greedy generation, loading the
tuned model, and where and in what dtype it runs."""

from __future__ import annotations


from pipeline.stages.tokenized_dataset import IGNORE_INDEX, pad_token_id

# ---------------------------------------------------------------- model figures


def answer_losses(model, rows: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 4) -> list[tuple[float, int]]:
    """(summed loss, supervised tokens) per row, on the answer tokens only.

    Batched; each row's figure equals the model's own loss on that row alone (a test checks it).
    """
    import torch
    import torch.nn.functional as F

    from pipeline.stages.lora_adapter.batching import collate_padded as collate

    out: list[tuple[float, int]] = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(model.device) for k, v in collate(rows[start : start + batch_size], pad_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            token_loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
            ).view(labels.shape)
            mask = labels != IGNORE_INDEX
            for k in range(labels.size(0)):
                out.append((float(token_loss[k][mask[k]].sum()), int(mask[k].sum())))
    return out


def generate_greedy(model, tokenizer, prompts: list[str], *, max_new_tokens: int, stop_ids: list[int], batch_size: int = 8) -> list[list[int]]:
    """Greedy continuations (new token ids, up to and excluding the first stop token), in batches
    with left padding; prompts of similar length are batched together."""
    import torch

    pad_id = pad_token_id(tokenizer, stop_ids[0])
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    results: list[list[int]] = [[] for _ in prompts]
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids = encoded[i]
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention[row, width - len(ids) :] = 1
            generated = model.generate(
                input_ids=input_ids.to(model.device),
                attention_mask=attention.to(model.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=stop_ids,
                pad_token_id=pad_id,
            )
            for row, i in enumerate(idx):
                new = generated[row, width:].tolist()
                cut = next((k for k, t in enumerate(new) if t in stop_ids), len(new))
                results[i] = new[:cut]
    return results



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
    model, tokenizer, _ = load_trained(base_path, adapter_path, trust_remote_code=trust_remote_code, dtype=torch_dtype,
                                       device=inference_device())
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
