"""Batches of prompts of different lengths are exact: each sample's loss (and gradient) equals training it alone.

What makes it exact, each checked here or in test_exact.py:
- the cache holds every prompt at its own length; a batch pads at the END with zeros and a bool mask;
- the installed transformer's attention builds a per-sample joint mask from `encoder_hidden_states_mask`, so no
  image or text token attends to another row's padding;
- text RoPE positions are max(h/2, w/2) + 0..L-1 for every row (QwenEmbedRope), so right padding leaves each valid
  token at the position it has alone (left padding would not);
- everything else on the text stream (RMSNorm, projections, AdaLN, MLP) is per token.
"""

from __future__ import annotations

import torch

ALONE_TOL = 1e-6  # per-sample loss, as asked of the family
PRED_TOL = 2e-6  # velocity predictions of size ~1: a few fp32 ulps (masked vs unmasked attention reduce differently)


def _transformer(qwen_dir):
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel.from_pretrained(qwen_dir, subfolder="transformer")


def test_batch_of_two_lengths_equals_each_alone(fam, qwen_dir, cached, norm, make_batch, step, record_property):
    transformer = _transformer(qwen_dir)
    rows = [0, 1]  # 10 and 20 text tokens
    g = torch.Generator().manual_seed(3)
    sigma = torch.tensor([0.4, 0.8])
    noise = torch.randn(2, 64, 64, generator=g)
    batch = make_batch(cached, rows)
    assert batch["prompt_embeds_mask"].sum(1).tolist() == [10, 20]
    with torch.no_grad():
        loss, pred = step(transformer, batch, norm, sigma, noise)
        alone = [step(transformer, make_batch(cached, [r]), norm, sigma[i : i + 1], noise[i : i + 1])
                 for i, r in enumerate(rows)]  # fmt: skip
        # Without the mask the short row attends to 10 zero-padded text tokens.
        unmasked = {k: v for k, v in batch.items() if k != "prompt_embeds_mask"}
        _, wrong = step(transformer, unmasked, norm, sigma, noise)
        # Another prompt (same image) changes the prediction about as much: the text matters to the tiny model.
        swapped = {**make_batch(cached, [0]), "prompt_embeds": cached["prompt_embeds"][2][None]}
        del swapped["prompt_embeds_mask"]
        _, other = step(transformer, swapped, norm, sigma[:1], noise[:1])
    record_property("loss_diff", max(abs(loss[i].item() - a[0].item()) for i, a in enumerate(alone)))
    record_property("pred_diff", max((pred[i] - a[1][0]).abs().max().item() for i, a in enumerate(alone)))
    record_property("unmasked_pred_diff", (wrong[0] - alone[0][1][0]).abs().max().item())
    for i, (loss_i, pred_i) in enumerate(alone):
        assert abs(loss[i].item() - loss_i.item()) <= ALONE_TOL
        assert (pred[i] - pred_i[0]).abs().max().item() <= PRED_TOL
    assert (wrong[0] - alone[0][1][0]).abs().max().item() > 1e-3
    assert (wrong[1] - alone[1][1][0]).abs().max().item() <= PRED_TOL  # the longest row has no padding
    assert (other[0] - alone[0][1][0]).abs().max().item() > 1e-3


def test_batch_gradient_equals_the_mean_of_the_gradients_alone(
    fam, qwen_dir, cached, norm, make_batch, per_sample_loss, record_property
):
    """The same with LoRA gradients: d(mean batch loss) == mean of each sample's d(loss alone)."""
    from peft import LoraConfig

    transformer = _transformer(qwen_dir)
    transformer.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "add_k_proj"], init_lora_weights="gaussian")
    )
    with torch.no_grad():  # non-zero B so the gradients of A are non-zero too
        for n, p in transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    params = [p for p in transformer.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(4)
    sigma, noise = torch.tensor([0.3, 0.7]), torch.randn(2, 64, 64, generator=g)

    def grads(batch, s, n):
        loss = per_sample_loss(transformer, batch, norm, s, n).mean()
        return torch.autograd.grad(loss, params)

    together = grads(make_batch(cached, [2, 1]), sigma, noise)
    alone = [grads(make_batch(cached, [r]), sigma[i : i + 1], noise[i : i + 1]) for i, r in enumerate([2, 1])]
    worst = max((t - (a + b) / 2).abs().max().item() for t, a, b in zip(together, *alone, strict=True))
    scale = max(t.abs().max().item() for t in together)
    record_property("grad_diff", worst)
    record_property("grad_scale", scale)
    assert scale > 1e-4 and worst <= 1e-5 * scale  # measured: ~4e-7 of the largest gradient
