import torch

from ivreg.readout import IGNORE_LABEL, OnlineReadout


def test_unlabelled_samples_are_ignored_and_no_gradient_reaches_features() -> None:
    torch.manual_seed(0)
    readout = OnlineReadout(8, 3)
    feats = torch.randn(6, 8, requires_grad=True)
    labels = torch.tensor([0, 1, 2, IGNORE_LABEL, IGNORE_LABEL, 1])
    loss, hits, count = readout.loss_and_hits(feats, labels)
    with torch.no_grad():  # by hand, over the labelled rows of the same logits
        logits = readout(feats)
        kept = [0, 1, 2, 5]
        expected_loss = torch.nn.functional.cross_entropy(logits[kept], labels[kept])
        expected_hits = int((logits[kept].argmax(-1) == labels[kept]).sum())
    assert count.item() == 4 and hits.item() == expected_hits
    torch.testing.assert_close(loss.detach(), expected_loss)
    loss.backward()
    assert feats.grad is None
    all_unlabelled = torch.full((6,), IGNORE_LABEL)
    loss0, hits0, count0 = readout.loss_and_hits(torch.randn(6, 8), all_unlabelled)
    assert loss0.item() == 0.0 and hits0.item() == 0 and count0.item() == 0


def test_batchnorm_readout_is_invariant_to_feature_scale() -> None:
    """Feature norms grow by orders of magnitude under cosine-type losses; the standardised
    readout sees the same input whatever the scale."""
    torch.manual_seed(0)
    feats = torch.randn(32, 8)
    readout = OnlineReadout(8, 3, batchnorm=True).train()
    torch.testing.assert_close(readout(feats), readout(1000.0 * feats), atol=1e-4, rtol=1e-4)
    raw = OnlineReadout(8, 3, batchnorm=False).train()
    assert not torch.allclose(raw(feats), raw(1000.0 * feats))
