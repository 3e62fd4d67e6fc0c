"""The fused LM head + cross entropy agrees with the plain `cross_entropy(linear(h, W).float(), y)`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from parcae.model.head import IGNORE_INDEX, linear_cross_entropy


def plain(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX)


def inputs(rows: int = 3, seq: int = 11, width: int = 16, vocab: int = 37, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, seq, width, generator=generator, requires_grad=True)
    weight = (0.3 * torch.randn(vocab, width, generator=generator)).requires_grad_()
    labels = torch.randint(0, vocab, (rows, seq), generator=generator)
    labels[0, :4] = IGNORE_INDEX
    return hidden, weight, labels


@pytest.mark.parametrize("chunk_tokens", [1, 5, 33, 1000])
def test_loss_and_gradients_match_the_plain_head(chunk_tokens: int) -> None:
    hidden, weight, labels = inputs()
    expected = plain(hidden, weight, labels)
    expected_grads = torch.autograd.grad(2.5 * expected, (hidden, weight))
    fused = linear_cross_entropy(hidden, weight, labels, chunk_elements=chunk_tokens * weight.shape[0])
    grads = torch.autograd.grad(2.5 * fused, (hidden, weight))
    torch.testing.assert_close(fused, expected)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_only_the_inputs_that_need_gradients_get_them() -> None:
    hidden, weight, labels = inputs()
    weight.requires_grad_(False)
    fused = linear_cross_entropy(hidden, weight, labels, chunk_elements=4 * weight.shape[0])
    fused.backward()
    reference = hidden.detach().requires_grad_()
    plain(reference, weight, labels).backward()
    torch.testing.assert_close(hidden.grad, reference.grad, atol=1e-6, rtol=1e-5)
    assert weight.grad is None


def test_a_second_backward_is_refused_clearly() -> None:
    hidden, weight, labels = inputs()
    loss = linear_cross_entropy(hidden, weight, labels, chunk_elements=7 * weight.shape[0])
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph is not supported"):
        loss.backward()


def test_no_grad_and_all_ignored() -> None:
    hidden, weight, labels = inputs()
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels, 5 * weight.shape[0]),
                                   plain(hidden, weight, labels))  # fmt: skip
    ignored = torch.full_like(labels, IGNORE_INDEX)
    loss = linear_cross_entropy(hidden, weight, ignored)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0


def test_bfloat16_autocast_matches_the_plain_head() -> None:
    hidden, weight, labels = inputs(width=32, vocab=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = plain(hidden, weight, labels)
        expected_grads = torch.autograd.grad(expected, (hidden, weight))
        fused = linear_cross_entropy(hidden, weight, labels, chunk_elements=8 * weight.shape[0])
        grads = torch.autograd.grad(fused, (hidden, weight))
    torch.testing.assert_close(fused, expected)
    for got, want in zip(grads, expected_grads, strict=True):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-2)


def test_labels_out_of_range_are_refused() -> None:
    hidden, weight, labels = inputs()
    labels[1, 2] = weight.shape[0]
    with pytest.raises(IndexError, match="labels must be in"):
        linear_cross_entropy(hidden, weight, labels)
