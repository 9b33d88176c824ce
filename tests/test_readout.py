import torch
import torch.nn.functional as F

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


def test_labelled_means_are_torchmetrics_accuracy_and_loss_on_the_labelled_images() -> None:
    """The validation metrics (sync-free sums and counts over batches) equal torchmetrics'
    top-1/top-5 accuracy and the mean cross-entropy of the labelled images alone."""
    from torchmetrics.classification import MulticlassAccuracy

    from ivreg.readout import LabelledMean, top_k_hits

    torch.manual_seed(0)
    top1, top5, loss = LabelledMean(), LabelledMean(), LabelledMean()
    ref1, ref5 = MulticlassAccuracy(10, top_k=1, average="micro"), MulticlassAccuracy(10, top_k=5, average="micro")
    all_losses = []
    for batch in range(3):
        logits, labels = torch.randn(16, 10), torch.randint(0, 10, (16,))
        labels[batch::4] = -1  # unlabelled images
        top1.update(top_k_hits(logits, labels, 1), labels)
        top5.update(top_k_hits(logits, labels, 5), labels)
        loss.update(F.cross_entropy(logits, labels, ignore_index=-1, reduction="none"), labels)
        keep = labels >= 0
        ref1.update(logits[keep], labels[keep])
        ref5.update(logits[keep], labels[keep])
        all_losses.append(F.cross_entropy(logits[keep], labels[keep], reduction="none"))
    torch.testing.assert_close(top1.compute(), ref1.compute())
    torch.testing.assert_close(top5.compute(), ref5.compute())
    torch.testing.assert_close(loss.compute(), torch.cat(all_losses).mean())
    assert top_k_hits(torch.randn(2, 3), torch.tensor([0, 1]), 5).all()  # k beyond the classes: every class
    empty = LabelledMean()
    empty.update(torch.ones(4), torch.full((4,), -1))
    assert torch.isnan(empty.compute())  # no labelled image: no accuracy, not 0%
