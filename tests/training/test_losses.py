import math

import pytest
import torch

from personafuse.training.losses import contrastive_loss, lm_loss_sums, router_loss, trait_consistency_loss


def test_contrastive_loss_hand_computed():
    # Two experts in 2-D: e0 along x, e1 along y. h along x: s = [1, 0].
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    h = torch.tensor([[2.0, 0.0]])
    assert contrastive_loss(h, e, torch.tensor([[1, 0]])).item() == pytest.approx(0.0)
    # Wrong label: positive e1 (s=0) costs (1-0)^2 = 1, negative e0 (s=1) costs (1-0)^2 = 1.
    assert contrastive_loss(h, e, torch.tensor([[0, 1]])).item() == pytest.approx(2.0)
    # With margin 0.5 the negative costs (1-0.5)^2.
    assert contrastive_loss(h, e, torch.tensor([[0, 1]]), margin=0.5).item() == pytest.approx(1.25)
    # h at 45 degrees, both positive: 2 * (1 - 1/sqrt(2))^2; batch mean over two identical rows.
    h45 = torch.tensor([[1.0, 1.0], [3.0, 3.0]])
    want = 2 * (1 - 1 / math.sqrt(2)) ** 2
    assert contrastive_loss(h45, e, torch.tensor([[1, 1], [1, 1]])).item() == pytest.approx(want, rel=1e-6)


def test_trait_consistency_hand_computed():
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # pairs: (0,1) cos 0 -> 1, (0,2) cos 1 -> 0, (1,2) cos 0 -> 1; mean 2/3
    assert trait_consistency_loss(h).item() == pytest.approx(2 / 3)
    assert trait_consistency_loss(h[:1]).item() == 0.0


def test_router_loss_combines_with_beta_and_has_gradients():
    torch.manual_seed(0)
    h = torch.randn(4, 8, requires_grad=True)
    e = torch.randn(10, 8, requires_grad=True)
    p = torch.zeros(4, 10)
    p[:, 3] = 1
    loss, parts = router_loss(h, e, p, beta=0.5)
    assert loss.item() == pytest.approx(parts["contrastive"] + 0.5 * parts["trait"], rel=1e-6)
    loss.backward()
    assert h.grad.abs().sum() > 0 and e.grad.abs().sum() > 0


def test_lm_loss_masks_prompt_and_reduces_per_sequence():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 1, 2, 3], [-100, 4, 5, -100, -100]])
    sums, counts = lm_loss_sums(logits, labels)
    per_seq = sums / counts
    ref0 = torch.nn.functional.cross_entropy(logits[0, 1:4], labels[0, 2:5])
    ref1 = torch.nn.functional.cross_entropy(logits[1, 0:2], labels[1, 1:3])
    torch.testing.assert_close(per_seq, torch.stack([ref0, ref1]))
    token_mean = (ref0 * 3 + ref1 * 2) / 5
    torch.testing.assert_close(sums.sum() / counts.sum(), token_mean)
    torch.testing.assert_close(counts, torch.tensor([3.0, 2.0]))


def test_trait_consistency_with_p_counts_only_same_vector_pairs():
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    p = torch.tensor([[1, 0], [1, 0], [0, 1]])
    # only pair (0, 1) shares p: distance 1
    assert trait_consistency_loss(h, p).item() == pytest.approx(1.0)
    same = torch.ones(3, 2)
    assert trait_consistency_loss(h, same).item() == pytest.approx(trait_consistency_loss(h).item())
    assert trait_consistency_loss(h, torch.eye(3)).item() == 0.0


@pytest.mark.parametrize("kind", ["llama", "qwen2", "peft"])
def test_loss_on_scored_positions_only_equals_full_logits(kind):
    # causal_lm_loss_sums projects only response positions through the LM head; value and
    # gradients must equal the plain full-logits computation.
    from conftest import tiny_causal_lm
    from personafuse.training.losses import causal_lm_loss_sums, lm_loss_sums

    torch.manual_seed(0)
    model = tiny_causal_lm("llama" if kind == "peft" else kind, init_range=0.3)
    if kind == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = torch.randint(7, 150, (3, 8))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    labels = ids.clone()
    labels[:, :3] = -100
    labels[2, 6:] = -100
    labels[1, 3:5] = -100
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for fn in ("full", "scored"):
        for p in params:
            p.grad = None
        if fn == "full":
            sums, counts = lm_loss_sums(model(input_ids=ids, attention_mask=mask).logits, labels)
        else:
            sums, counts = causal_lm_loss_sums(model, ids, mask, labels)
        sums.sum().backward()
        results.append((sums.detach(), counts, [p.grad.clone() for p in params]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    assert results[1][1].tolist() == [5.0, 3.0, 3.0]
    for a, b in zip(results[0][2], results[1][2], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
