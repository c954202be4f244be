"""A teacher ensemble's distribution against a direct computation, and its fingerprint."""

import torch

from data_pipeline.exports import ensemble_fingerprint
from distill.ensemble import ensemble_log_probs


def test_the_mixture_is_the_mean_of_the_members_probabilities_over_the_real_items():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(2, 3, 9, generator=g) * 3 for _ in range(3))
    mixed = ensemble_log_probs([a, b, c])
    probs = sum(torch.softmax(x[..., 1:], -1) for x in (a, b, c)) / 3
    torch.testing.assert_close(mixed[..., 1:].exp(), probs)
    assert (mixed[..., 0] == torch.finfo(torch.float32).min).all()  # padding stays out
    torch.testing.assert_close(torch.logsumexp(mixed[..., 1:], -1), torch.zeros(2, 3), atol=1e-6, rtol=0)
    # One member: its own log-softmax (the same ranking, top-k and normalised labels).
    torch.testing.assert_close(ensemble_log_probs([a])[..., 1:], torch.log_softmax(a[..., 1:], -1))
    # A member sure of an item the other gives nothing keeps half its mass there (a logit mean would not).
    sure = torch.tensor([[0.0, 50.0, 0.0, 0.0]])
    unsure = torch.tensor([[0.0, -50.0, 0.0, 0.0]])
    assert abs(float(ensemble_log_probs([sure, unsure])[0, 1].exp()) - 0.5) < 1e-6


def test_the_ensemble_fingerprint_ignores_order_and_one_member_is_itself():
    assert ensemble_fingerprint(["a" * 64, "b" * 64]) == ensemble_fingerprint(["b" * 64, "a" * 64])
    assert ensemble_fingerprint(["a" * 64, "b" * 64]) not in ("a" * 64, "b" * 64)
    assert ensemble_fingerprint(["c" * 64]) == "c" * 64


def test_members_may_come_one_at_a_time_and_must_agree_in_shape():
    import pytest

    a, b = torch.randn(2, 5), torch.randn(2, 5)
    torch.testing.assert_close(ensemble_log_probs(x for x in (a, b)), ensemble_log_probs([a, b]))
    with pytest.raises(ValueError, match="differ in shape"):
        ensemble_log_probs([a, torch.randn(2, 6)])
    with pytest.raises(ValueError, match="at least one"):
        ensemble_log_probs([])
