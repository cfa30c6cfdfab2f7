"""The training engine's pieces against the plain computation they replace: loss at supervised
positions in chunks, padding-free packed rows, frozen base weights in bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import demo_records
from pipeline.stages.lora_adapter.batching import collate_padded, flatten
from pipeline.stages.lora_adapter.loss import LinearCrossEntropy, token_losses
from pipeline.stages.lora_adapter.spec import TrainSpec
from pipeline.stages.tokenized_dataset import tokenize_rows


@pytest.fixture(scope="module")
def rows(tokenizer):
    recs = demo_records(6)
    out = tokenize_rows(
        tokenizer,
        [r["instruction"] for r in recs],
        [r["input"] for r in recs],
        [r["output"] for r in recs],
        "你是助手。",
        256,
    )
    return [(r.input_ids, r.labels) for r in out]


def load(tiny_model_dir, precision="fp32", attn="auto"):
    from pipeline.stages.lora_adapter.model import SupervisedLM, load_for_training

    spec = TrainSpec(
        base_model_path=str(tiny_model_dir),
        tokenized_path="",
        output_dir="",
        checkpoint_dir="",
        lora_dropout=0.0,
        precision=precision,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    peft_model, attn_name, _ = load_for_training(spec, precision, on_gpu=False)
    # a non-zero adapter, so that the adapter's path is part of what is compared
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return SupervisedLM(peft_model, attn_name, logits_chunk_tokens=7).eval()


def own_row_loss(model, row) -> tuple[float, int]:
    """The model's own loss on one row alone, as a sum over its supervised tokens."""
    batch = collate_padded([row], pad_id=0)
    with torch.no_grad():
        out = model.peft_model(**batch)
    n = int((batch["labels"][:, 1:] != -100).sum())
    return out.loss.item() * n, n


def test_chunked_linear_cross_entropy_equals_torch_in_value_and_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = torch.randn(300, 16)
    targets = torch.randint(0, 300, (50,))
    scale = torch.rand(50)
    ours = LinearCrossEntropy.apply(hidden, weight, targets, 7)
    (ours * scale).sum().backward()
    grad_ours, hidden.grad = hidden.grad.clone(), None
    ref = F.cross_entropy(hidden @ weight.T, targets, reduction="none")
    (ref * scale).sum().backward()
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)
    assert torch.allclose(grad_ours, hidden.grad, atol=1e-5, rtol=0)


def test_a_trainable_head_takes_the_checkpointed_path_with_the_same_result():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False)
    hidden, targets = torch.randn(20, 16), torch.randint(0, 300, (20,))
    positions = torch.arange(20)
    got = token_losses(hidden, head, positions, targets, chunk=6)
    got.sum().backward()
    assert head.weight.grad is not None
    assert torch.allclose(got, F.cross_entropy(head(hidden), targets, reduction="none"), atol=1e-5, rtol=0)


def test_loss_at_supervised_positions_equals_the_models_own_loss(tiny_model_dir, rows):
    model = load(tiny_model_dir)
    for row in rows[:3]:
        batch = flatten([row])
        with torch.no_grad():
            ours = model(
                batch.input_ids, batch.position_ids, batch.positions, batch.targets, row_lengths=batch.row_lengths
            )
        total, n = own_row_loss(model, row)
        assert ours.shape == (n,)
        assert abs(ours.mean().item() - total / n) < 1e-5


def test_each_packed_row_loses_exactly_what_it_loses_alone(tiny_model_dir, rows):
    model = load(tiny_model_dir)
    batch = flatten(rows[:4])
    assert batch.input_ids.shape[0] == 1 and batch.tokens == sum(len(r[0]) for r in rows[:4])
    assert batch.position_ids[0].tolist() == [p for r in rows[:4] for p in range(len(r[0]))]
    with torch.no_grad():
        losses = model(
            batch.input_ids, batch.position_ids, batch.positions, batch.targets, row_lengths=batch.row_lengths
        )
    start = 0
    for row in rows[:4]:
        total, n = own_row_loss(model, row)
        assert abs(losses[start : start + n].sum().item() - total) < 1e-4
        start += n
    assert start == batch.supervised


def test_packing_matches_transformers_flattening_collator_through_sdpa(tiny_model_dir, rows):
    """The reference: DataCollatorWithFlattening's batch through the model's own forward, where
    transformers derives a block-diagonal mask from the restarting position ids."""
    from transformers import DataCollatorWithFlattening

    ours_model = load(tiny_model_dir)
    ref_model = load(tiny_model_dir, attn="sdpa")
    ref_batch = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": i, "labels": l} for i, l in rows[:3]])
    batch = flatten(rows[:3])
    assert torch.equal(ref_batch["position_ids"], batch.position_ids)
    with torch.no_grad():
        ref = ref_model.peft_model(
            input_ids=ref_batch["input_ids"], position_ids=ref_batch["position_ids"], labels=ref_batch["labels"]
        ).loss
        ours = ours_model(
            batch.input_ids, batch.position_ids, batch.positions, batch.targets, row_lengths=batch.row_lengths
        )
    assert abs(ours.mean().item() - ref.item()) < 1e-5


def test_no_token_attends_across_rows(tiny_model_dir, rows, monkeypatch):
    from pipeline.stages.lora_adapter import attention

    model = load(tiny_model_dir)
    seen = []
    real = attention.packed_attention

    def spy(module, q, k, v, mask, *args, **kwargs):
        seen.append((mask, kwargs.get("row_lengths")))
        return real(module, q, k, v, mask, *args, **kwargs)

    from transformers import AttentionInterface

    monkeypatch.setitem(AttentionInterface._global_mapping, attention.NAME, spy)
    decoder = model.peft_model.get_base_model().get_decoder()

    def hidden(pack):
        b = flatten(pack)
        with torch.no_grad():
            return decoder(
                input_ids=b.input_ids, position_ids=b.position_ids, row_lengths=b.row_lengths
            ).last_hidden_state[0]

    a, b, c = rows[:3]
    changed = ([t if i < 5 else (t + 17) % 1000 for i, t in enumerate(b[0])], b[1])
    before, after = hidden([a, b, c]), hidden([a, changed, c])
    n_a, n_b = len(a[0]), len(b[0])
    assert torch.equal(before[:n_a], after[:n_a])  # the row before is untouched
    assert torch.equal(before[n_a + n_b :], after[n_a + n_b :])  # and so is the row after
    assert not torch.allclose(before[n_a + 5 : n_a + n_b], after[n_a + 5 : n_a + n_b])
    assert seen and all(mask is None and lengths == (n_a, n_b, len(c[0])) for mask, lengths in seen)


def test_packed_attention_refuses_a_mask_rather_than_ignore_it():
    from pipeline.stages.lora_adapter.attention import packed_attention

    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="without a mask"):
        packed_attention(None, q, q, q, torch.ones(1, 1, 4, 4, dtype=torch.bool), row_lengths=(2, 2))


def test_short_bf16_rows_run_their_attention_in_fp32_on_cpu(monkeypatch):
    """A bf16 row up to FP32_MAX_TOKENS runs the fp32 kernel (the output is the fp32 result rounded
    once to bf16, and gradients flow back in bf16); a longer row stays in bf16."""
    from pipeline.stages.lora_adapter import attention

    class Layer(torch.nn.Module):
        num_key_value_groups = 3
        is_causal = True

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, 40, 16).bfloat16().requires_grad_() for h in (6, 2, 2))

    from transformers.integrations import sdpa_attention

    real, seen = sdpa_attention.sdpa_attention_forward, []

    def spy(module, query, *args, **kwargs):
        seen.append((query.shape[2], query.dtype, torch.is_autocast_enabled("cpu")))
        return real(module, query, *args, **kwargs)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", spy)

    def run(limit):
        monkeypatch.setattr(attention, "FP32_MAX_TOKENS", limit)
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = attention.packed_attention(Layer(), q, k, v, None, row_lengths=[30, 10])
        return out

    def exact(s, n):  # one row in fp32, causal, each query head on its key/value head
        kk, vv = (x[:, :, s : s + n].float().repeat_interleave(3, dim=1) for x in (k, v))
        return torch.nn.functional.scaled_dot_product_attention(
            q[:, :, s : s + n].float(), kk, vv, is_causal=True
        ).transpose(1, 2)

    reference = torch.cat([exact(0, 30), exact(30, 10)], dim=1)
    short = run(64)
    assert seen == [(30, torch.float32, False), (10, torch.float32, False)]
    assert short.dtype == torch.bfloat16
    assert torch.allclose(short.float(), reference, rtol=2**-8, atol=1e-6)  # fp32, rounded once to bf16
    short.float().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and q.grad.abs().sum() > 0
    run(20)  # the 30-token row now runs in bf16, the 10-token row still in fp32
    assert seen == [(30, torch.bfloat16, True), (10, torch.float32, False)]


def test_bf16_frozen_base_gives_the_fp32_loss_within_tolerance(tiny_model_dir, rows):
    """Base weights held in bf16 (adapter in fp32, matmuls under autocast) against everything in fp32:
    the mean loss agrees within 0.5% (measured on this random model: 1.6e-5 relative)."""
    fp32, bf16 = load(tiny_model_dir, "fp32"), load(tiny_model_dir, "bf16")
    base_dtypes = {p.dtype for n, p in bf16.named_parameters() if "lora_" not in n}
    adapter_dtypes = {p.dtype for n, p in bf16.named_parameters() if "lora_" in n}
    assert base_dtypes == {torch.bfloat16} and adapter_dtypes == {torch.float32}
    batch = flatten(rows[:4])
    args = (batch.input_ids, batch.position_ids, batch.positions, batch.targets)
    with torch.no_grad():
        ref = fp32(*args, row_lengths=batch.row_lengths).mean().item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = bf16(*args, row_lengths=batch.row_lengths).mean().item()
    assert abs(got - ref) / ref < 5e-3, (got, ref)


def test_targets_never_cross_into_the_next_row(rows):
    batch = flatten(rows[:2])
    n0 = sum(1 for t in rows[0][1][1:] if t != -100)
    positions = batch.positions.tolist()
    assert positions[n0 - 1] == len(rows[0][0]) - 2  # the first row's last target is its own last token
    assert positions[n0] > len(rows[0][0])  # the second row's first target lies in its answer
    assert batch.targets.tolist()[:n0] == [t for t in rows[0][1][1:] if t != -100]


def test_opening_copies_are_cut_after_the_opening_and_never_end_the_turn(rows):
    from pipeline.stages.lora_adapter.batching import with_openings

    out = with_openings(rows[:3], opening_tokens=4, repeats=2)
    assert out[:3] == rows[:3] and len(out) == 3 + 2 * 3
    for (ids, labels), (cut_ids, cut_labels) in zip(rows[:3] * 2, out[3:]):
        first = next(i for i, t in enumerate(labels) if t != -100)
        assert cut_ids == ids[: first + 4] and cut_labels == labels[: first + 4]
        assert sum(t != -100 for t in cut_labels) == 4  # the answer's first 4 tokens; no end-of-turn
    assert with_openings(rows[:3], opening_tokens=4, repeats=0) == rows[:3]
