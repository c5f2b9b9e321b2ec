"""Heads real users train: a one-logit binary classifier (``BCEWithLogitsLoss``, float 0./1. labels), multi-label
and regression targets, and the containers and dtypes model outputs come in."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import LitTiny, RecordingWriter, TinyCNN, read_events, tiny_trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_viz.callbacks import (
    AdversarialCallback,
    CAMCallback,
    ClassModelCallback,
    EmbeddingCallback,
    GradientCallback,
    OcclusionCallback,
)
from lightning_viz.callbacks.base import VisualizationWarning
from lightning_viz.callbacks.maps import panel_caption, probabilities
from lightning_viz.layers import LayerNotFoundError
from lightning_viz.logging import VizLogger
from lightning_viz.methods import class_activation_map, fgsm, gradient, occlusion
from lightning_viz.methods.adversarial import predict
from lightning_viz.methods.cam import scorecam_weights
from lightning_viz.methods.metrics import curve_auc, perturbation_curve, perturbation_curves
from lightning_viz.probe import ProbeSet
from lightning_viz.targets import binary_logits, check_labels, model_adapter
from lightning_viz.tracking import MapTracker


class LitBinary(LitTiny):
    """One logit per image, trained with BCEWithLogitsLoss on float 0./1. labels."""

    def __init__(self):
        super().__init__(TinyCNN(num_classes=1))

    def training_step(self, batch, batch_idx):
        return F.binary_cross_entropy_with_logits(self(batch[0]).squeeze(1), batch[1])

    def validation_step(self, batch, batch_idx):
        pass


def binary_data(n: int = 16, size: int = 8) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    y = (torch.arange(n) % 2).float()
    x = torch.randn(n, 3, size, size, generator=g)
    x[:, 0] += y.view(-1, 1, 1)
    return TensorDataset(x, y)


def test_one_logit_reads_as_two_classes():
    """(-z/2, z/2): softmax is (1 - sigmoid(z), sigmoid(z)), arg-max is z > 0, class 1 minus class 0 is z."""
    z = torch.tensor([[2.0], [-0.5], [0.0]])
    two = binary_logits(z)
    assert torch.equal(two, torch.tensor([[-1.0, 1.0], [0.25, -0.25], [0.0, 0.0]]))
    assert torch.allclose(two.softmax(1)[:, 1], torch.sigmoid(z[:, 0]))
    assert torch.equal(two.argmax(1), torch.tensor([1, 0, 0]))
    wide = torch.randn(3, 4)
    assert binary_logits(wide) is wide
    for labels in (torch.tensor([True, False]), torch.tensor([1.0, 0.0]), torch.tensor([1, 0], dtype=torch.uint8)):
        check_labels(labels, 2)  # bool, float and integer binary labels are class indices
    with pytest.raises(ValueError, match=r"class indices 0..1 .* include \[0.5\]"):
        check_labels(torch.tensor([0.5, 1.0]), 2)


def test_one_logit_attack_moves_the_logit():
    """AdversarialCallback's attacks move a one-logit model's z away from the predicted side (arg-max of one
    column was always 0: nothing could flip)."""
    torch.manual_seed(0)
    net = TinyCNN(num_classes=1).eval()
    with torch.no_grad():
        net.fc.bias.zero_()
        net.fc.weight.mul_(10)
    adapter = model_adapter(net)
    x = torch.randn(8, 3, 8, 8)
    clean = predict(adapter, x)
    adv = fgsm(adapter, x, clean, 0.5)
    with torch.no_grad():
        z, z_adv = net(x)[:, 0], net(adv)[:, 0]
    assert torch.equal(clean, (z > 0).long())
    assert bool(((z_adv - z) * (clean * 2 - 1) < 0).all())  # every logit moved toward the other side


def test_one_logit_targets_and_cam_by_hand():
    """Through the adapter: class 1's gradient is half dz/dx and class 0's its negative; CAM of class 1 is
    relu(sum_k w_k/2 A_k) and of class 0 relu(-sum_k w_k/2 A_k)."""
    torch.manual_seed(0)
    net = TinyCNN(num_classes=1).eval()
    x = torch.randn(4, 3, 8, 8)
    adapter = model_adapter(net)
    xr = x.clone().requires_grad_()
    (dz,) = torch.autograd.grad(net(xr).sum(), xr)
    assert torch.allclose(gradient(adapter, x, 1), 0.5 * dz, atol=1e-6)
    assert torch.allclose(gradient(adapter, x, 0), -0.5 * dz, atol=1e-6)
    labels = torch.tensor([0.0, 1.0, 1.0, 0.0])
    sign = (labels * 2 - 1).view(-1, 1, 1, 1)
    assert torch.allclose(gradient(adapter, x, "label", labels), sign * 0.5 * dz, atol=1e-6)
    # conv2 reaches the pooling through F.relu: CAM (as the callback) weighs ReLU(A), the maps whose GAP the head reads
    a = net.conv2(net.relu(net.bn1(net.conv1(x)))).relu().detach()
    m = torch.einsum("k,bkhw->bhw", net.fc.weight[0].detach() / 2, a)
    for cls, expected in ((1, m.relu()), (0, (-m).relu())):
        got = class_activation_map(adapter, x, "conv2", "cam", target=cls)
        assert torch.allclose(got, expected, atol=1e-5), cls


def test_one_logit_binary_classifier_through_fit(tmp_path):
    """target='label' (the default) on a BCE model with float labels used to index class 1 of a one-column output
    (IndexError at the first epoch end) and every softmax over one column was 1 (faithfulness curves flat at 1,
    occlusion's prob drop 0, AdversarialCallback never flipping). Now every callback runs, with sigmoid
    probabilities."""
    torch.manual_seed(0)
    ds = binary_data()
    tracker = MapTracker(faithfulness=True, deletion_steps=3)
    cbs = [
        GradientCallback(num_probes=4, tracker=tracker),
        CAMCallback(methods=["cam", "gradcam", "scorecam"], num_probes=4),
        OcclusionCallback(window=4, stride=4, num_probes=4, target="predicted"),
        EmbeddingCallback(num_probes=8),
        ClassModelCallback(steps=2),
        AdversarialCallback(steps=2, num_probes=2, min_flip_iterations=1),
    ]
    model = LitBinary()
    trainer = tiny_trainer(str(tmp_path), cbs, max_epochs=1, limit_train_batches=2)
    trainer.fit(model, DataLoader(ds, batch_size=8), DataLoader(ds, batch_size=8))
    acc = read_events(str(tmp_path))
    scalars = {t: acc.Scalars(t)[-1].value for t in acc.Tags()["scalars"]}
    auc = scalars["viz-gradients/saliency/input/faithfulness/deletion_auc"]
    assert 0.0 < auc < 0.99  # a sigmoid probability, not a softmax over one column (always 1)
    assert scalars["viz-occlusion/occlusion/prob/stats/max_abs"] > 0
    assert {"viz-class_model/class000/score", "viz-class_model/class001/score"} <= set(scalars)
    for cb in cbs:
        assert cb.last_logged_tags, type(cb).__name__
    # the faithfulness curve follows sigmoid(z) for label 1 and 1 - sigmoid(z) for label 0
    probe = cbs[0].probes
    x, net = probe.to("cpu"), model.net.eval()
    with torch.no_grad():
        z, z0 = net(x)[:, 0], net(torch.zeros_like(x))[:, 0]
    pos = probe.labels > 0.5
    assert bool(pos.any()) and bool((~pos).any())
    curve = perturbation_curve(model_adapter(net), x, torch.rand(len(x), 8, 8), "label", probe.labels, steps=1)
    for col, logit in ((0, z), (1, z0)):
        p = torch.where(pos, torch.sigmoid(logit), 1 - torch.sigmoid(logit))
        assert torch.allclose(curve[:, col], p, atol=1e-5)


class Squeezed(TinyCNN):
    """A binary classifier whose forward squeezes its one logit: ``[B]`` (``[]`` for one image with ``squeeze()``)."""

    def __init__(self, squeeze_all: bool = False):
        super().__init__(num_classes=1)
        self.squeeze_all = squeeze_all

    def forward(self, x):
        z = super().forward(x)
        return z.squeeze() if self.squeeze_all else z.squeeze(1)


class LitHead(LitTiny):
    def __init__(self, net, loss):
        super().__init__(net)
        self.loss = loss

    def training_step(self, batch, batch_idx):
        return self.loss(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        pass


@pytest.mark.parametrize("squeeze_all", [False, True])
def test_squeezed_one_logit_output(tmp_path, squeeze_all):
    """A model returning ``[B]`` (was: refused at setup, 'needs logits [B, K]') reads as one logit ``[B, 1]``."""
    torch.manual_seed(0)
    net = Squeezed(squeeze_all)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model_adapter(net)(x), binary_logits(TinyCNN.forward(net, x)))
        assert model_adapter(net)(x[:1]).shape == (1, 2)
    cbs = [GradientCallback(num_probes=4), CAMCallback(methods=["cam"], num_probes=4)]
    model = LitHead(net, F.binary_cross_entropy_with_logits)
    ds = binary_data()
    tiny_trainer(str(tmp_path), cbs, max_epochs=1, limit_train_batches=2).fit(
        model, DataLoader(ds, batch_size=8), DataLoader(ds, batch_size=8)
    )
    assert all(cb.last_logged_tags for cb in cbs)


def test_regression_targets_are_no_class_labels(tmp_path):
    """Float regression targets (2.7, -1.3) used to be cast to class indices (2, -1): target='label' then indexed
    a wrong class or crashed at the epoch end, EmbeddingCallback crashed coloring by label -1. Now they are no
    labels: target='label' fails at setup naming the callback, the others run."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(16, 3, 8, 8, generator=g), torch.randn(16, generator=g) * 3)

    def mse(out, y):
        return F.mse_loss(out.squeeze(1), y)

    loaders = DataLoader(ds, batch_size=8), DataLoader(ds, batch_size=8)
    with pytest.raises(ValueError, match=r"GradientCallback: target='label' .*regression target"):
        tiny_trainer(str(tmp_path / "a"), [GradientCallback(num_probes=4)], max_epochs=1).fit(
            LitHead(TinyCNN(num_classes=1), mse), *loaders
        )
    cbs = [GradientCallback(num_probes=4, target="predicted"), EmbeddingCallback(num_probes=8)]
    tiny_trainer(str(tmp_path / "b"), cbs, max_epochs=1, limit_train_batches=2).fit(
        LitHead(TinyCNN(num_classes=1), mse), *loaders
    )
    assert cbs[1].probes.labels is None
    assert all(cb.last_logged_tags for cb in cbs)


def test_explicit_probe_labels_are_read_as_items_labels_are():
    """ProbeSet(images, labels=...) cast labels to long: regression targets 0.5, 1.2 became classes 0, 1 silently,
    multi-hot and one-hot rows [N, K] failed with '4 probe images but 16 labels'. Now one-hot rows are their class (as
    a dataset's items), [N, 1] a column, and multi-hot rows, fractions and negatives fail saying what they look like."""
    x = torch.zeros(4, 3, 8, 8)
    assert ProbeSet(x, labels=F.one_hot(torch.tensor([2, 0, 1, 3]), 4).float()).labels.tolist() == [2, 0, 1, 3]
    assert ProbeSet(x, labels=torch.tensor([[1.0], [0.0], [1.0], [1.0]])).labels.tolist() == [1, 0, 1, 1]
    with pytest.raises(ValueError, match=r"one class index per probe \(\[4\]\); got shape \(4, 3\) .*multi-hot"):
        ProbeSet(x, labels=torch.tensor([[1.0, 0.0, 1.0]] * 4))
    with pytest.raises(ValueError, match=r"class indices \(whole numbers >= 0\); got \[0.5, 1.2\] \(regression"):
        ProbeSet(x, labels=torch.tensor([0.5, 1.2, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"got \[-1\] .*-1 marking unlabeled"):
        ProbeSet(x, labels=torch.tensor([0, -1, 1, 2]))


def test_one_logit_class_errors_say_how_the_logit_is_read(tmp_path):
    """A class out of range or one class name on a one-logit model said 'model(x) gave logits of shape (1, 2)' (the
    model gave (1, 1)); now it says the one logit is read as classes 0 and 1 and, for names, what to give."""
    loaders = DataLoader(binary_data(), batch_size=8), DataLoader(binary_data(), batch_size=8)
    for cb, msg in (
        (GradientCallback(num_probes=2, target=2), r"class 2 is out of range: .*gave one logit, shape \(1, 1\), read"),
        (CAMCallback(num_probes=2, class_names=["dog"]), r"1 names .* classes 0 \(negative\) .*\['not dog', 'dog'\]"),
    ):
        with pytest.raises(ValueError, match=msg):
            tiny_trainer(str(tmp_path), [cb], max_epochs=1).fit(LitBinary(), *loaders)


def test_one_class_name_of_a_one_logit_model_names_the_positive_class(tmp_path):
    """Data naming its one class (classes = ['dog']) for a one-logit model: class 0, the negative one, was captioned
    'dog' and class 1 '1'; now the names are ['not dog', 'dog']."""

    class Dogs(TensorDataset):
        classes = ["dog"]

    ds = Dogs(*binary_data().tensors)
    cb = GradientCallback(num_probes=2)
    trainer = tiny_trainer(str(tmp_path), [cb], max_epochs=1, limit_train_batches=1)
    trainer.fit(LitBinary(), DataLoader(ds, batch_size=8), DataLoader(ds, batch_size=8))
    assert cb.get_class_names(trainer) == ["not dog", "dog"]
    caption = panel_caption(
        "p000",
        cb.probes,
        {"pred:class": torch.tensor([0]), "pred:prob": torch.tensor([0.8])},
        0,
        cb.get_class_names(trainer),
    )
    assert caption.endswith("pred: not dog 80%")


def test_label_out_of_range_fails_at_setup(tmp_path):
    """Labels 1..K on a K-class head (an off-by-one) fail before training with the callback's name, not with an
    index error at the first epoch end."""
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(12, 3, 8, 8, generator=g), torch.arange(12) % 3 + 1)
    model = LitHead(TinyCNN(num_classes=3), lambda out, y: F.cross_entropy(out, y.clamp_max(2)))
    with pytest.raises(ValueError, match=r"OcclusionCallback: target='label' needs class indices 0..2 .*\[3\]"):
        tiny_trainer(str(tmp_path), [OcclusionCallback(num_probes=2)], max_epochs=1).fit(
            model, DataLoader(ds, batch_size=6), DataLoader(ds, batch_size=6)
        )
    assert model.global_step == 0


def test_ignore_labels_fail_at_setup_saying_what_they_look_like(tmp_path):
    """Whole-number labels outside the classes (-1 for unlabeled images, an ignore_index of 255) are not called
    'a regression target?' but what they likely are; fractions still are."""
    with pytest.raises(ValueError, match=r"include \[255\] \(-1 marking unlabeled images, an ignore_index such as 255"):
        check_labels(torch.tensor([0, 255]), 3)
    with pytest.raises(ValueError, match=r"include \[2.5\] \(a regression target\?\)"):
        check_labels(torch.tensor([0.0, 2.5]), 3)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(12) % 3
    y[5] = -1  # not the item the setup forward reads: the probes then have no labels
    ds = TensorDataset(torch.randn(12, 3, 8, 8, generator=g), y)
    model = LitHead(TinyCNN(num_classes=3), lambda out, y: F.cross_entropy(out, y, ignore_index=-1))
    with pytest.raises(ValueError, match=r"GradientCallback: target='label' .*-1 marking unlabeled images"):
        tiny_trainer(str(tmp_path), [GradientCallback(num_probes=12)], max_epochs=1).fit(
            model, DataLoader(ds, batch_size=6), DataLoader(ds, batch_size=6)
        )
    assert model.global_step == 0


class SoftmaxNet(TinyCNN):
    """Probabilities out of the forward (a softmax inside the model)."""

    def forward(self, x):
        return super().forward(x).softmax(dim=1)


def test_probabilities_from_forward_warn_at_setup_and_run(tmp_path):
    """A softmax in the forward: every map still runs (gradients of probabilities), with one warning at setup
    naming the callback and the fix; the log-probabilities fix is silent and its softmax is the model's output."""
    torch.manual_seed(0)
    loaders = (
        DataLoader(TensorDataset(*tiny_data()), batch_size=6),
        DataLoader(TensorDataset(*tiny_data()), batch_size=6),
    )
    nll = lambda out, y: F.nll_loss(out.clamp_min(1e-8).log(), y)
    cbs = [GradientCallback(num_probes=3), CAMCallback(methods=["gradcam"], num_probes=3)]
    with pytest.warns(VisualizationWarning, match=r"GradientCallback: model\(x\) returns probabilities"):
        tiny_trainer(str(tmp_path / "a"), cbs, max_epochs=1, limit_train_batches=2).fit(
            LitHead(SoftmaxNet(), nll), *loaders
        )
    assert all(cb.last_logged_tags for cb in cbs)
    fixed = GradientCallback(num_probes=3, logits_fn=lambda model, x: model(x).log())
    with warnings.catch_warnings():
        warnings.simplefilter("error", VisualizationWarning)
        tiny_trainer(str(tmp_path / "b"), [fixed], max_epochs=1, limit_train_batches=2).fit(
            LitHead(SoftmaxNet(), nll), *loaders
        )
    # a model returning logits does not warn
    with warnings.catch_warnings():
        warnings.simplefilter("error", VisualizationWarning)
        tiny_trainer(str(tmp_path / "c"), [GradientCallback(num_probes=3)], max_epochs=1, limit_train_batches=2).fit(
            LitHead(TinyCNN(), F.cross_entropy), *loaders
        )


class SigmoidNet(TinyCNN):
    """A binary classifier ending in nn.Sigmoid (trained with BCELoss): probabilities out of the forward."""

    def __init__(self):
        super().__init__(num_classes=1)
        self.out = torch.nn.Sigmoid()

    def forward(self, x):
        return self.out(super().forward(x)).squeeze(1)


def test_sigmoid_in_forward_warns_at_setup(tmp_path):
    """A forward ending in a sigmoid returned p in (0, 1), read as the logit of class 1: every probe was predicted
    class 1 (argmax of (-p/2, p/2)) at 50-73%, silently. Now a warning at setup names the callback and the fix;
    logits_fn with torch.logit is silent and predicts as the model does."""
    torch.manual_seed(0)
    loaders = DataLoader(binary_data(), batch_size=8), DataLoader(binary_data(), batch_size=8)
    model = LitHead(SigmoidNet(), F.binary_cross_entropy)
    cbs = [GradientCallback(num_probes=4), CAMCallback(methods=["gradcam"], num_probes=4)]
    with pytest.warns(VisualizationWarning, match=r"GradientCallback: model\(x\) ends in a sigmoid.*every probe is "):
        tiny_trainer(str(tmp_path / "a"), cbs, max_epochs=1, limit_train_batches=2).fit(model, *loaders)
    fixed = GradientCallback(num_probes=4, logits_fn=lambda m, x: torch.logit(m(x), eps=1e-6))
    with warnings.catch_warnings():
        warnings.simplefilter("error", VisualizationWarning)
        tiny_trainer(str(tmp_path / "b"), [fixed], max_epochs=1, limit_train_batches=2).fit(model, *loaders)
    x = fixed.probes.images
    with torch.no_grad():
        p = model.net.eval()(x)
    got = fixed.predict(fixed.adapted(model), fixed.probes)
    assert torch.equal(got["pred:class"], (p > 0.5).long())
    assert torch.allclose(got["pred:prob"], torch.maximum(p, 1 - p), atol=1e-5)
    # a multi-label head ending in torch.sigmoid is seen as well (functional, then a reshape)
    multi = LitHead(TinyCNN(num_classes=4), F.binary_cross_entropy)
    multi.forward = lambda x: torch.sigmoid(multi.net(x)).view(x.shape[0], 4)
    with pytest.warns(VisualizationWarning, match=r"ends in a sigmoid, so it returns probabilities.*torch.logit"):
        GradientCallback(num_probes=2, target=0)._warn_sigmoid(multi(x[:1].requires_grad_()), "model(x)")


def tiny_data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(12, 3, 8, 8, generator=g), torch.arange(12) % 3


def test_one_class_of_a_multilabel_model_as_a_binary_classifier(tmp_path):
    """Multi-label (sigmoid per class): logits_fn selecting one column makes a one-logit model of that class, so its
    probabilities are sigmoids; 'cam' then refuses at setup, saying the logits are not the head's outputs (was:
    'differs from the logits by up to inf')."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(12, 3, 8, 8, generator=g), (torch.rand(12, 4, generator=g) > 0.5).float())
    loaders = DataLoader(ds, batch_size=6), DataLoader(ds, batch_size=6)

    def column2(model, x):
        return model(x)[:, 2:3]

    cbs = [
        GradientCallback(num_probes=2, target=1, logits_fn=column2, tracker=MapTracker(faithfulness=True)),
        CAMCallback(methods=["gradcam"], num_probes=2, target=1, logits_fn=column2),
    ]
    bce = F.binary_cross_entropy_with_logits
    tiny_trainer(str(tmp_path / "a"), cbs, max_epochs=1, limit_train_batches=2).fit(
        LitHead(TinyCNN(num_classes=4), bce), *loaders
    )
    assert all(cb.last_logged_tags for cb in cbs)
    cam = CAMCallback(methods=["cam"], num_probes=2, target=1, logits_fn=column2)
    with pytest.raises(
        LayerNotFoundError, match=r"CAMCallback: CAM reads each class's weights .* 4 outputs .* shape \(1, 2\)"
    ):
        tiny_trainer(str(tmp_path / "b"), [cam], max_epochs=1).fit(LitHead(TinyCNN(num_classes=4), bce), *loaders)


class ChannelMeans(torch.nn.Module):
    """Logits ``z_c = 4 * mean(x_c)``: one class per input channel, every probability computable by hand."""

    def forward(self, x):
        return 4 * x.mean(dim=(2, 3))


def multilabel_image():
    x = torch.zeros(1, 3, 8, 8)
    x[0, 0] = 1.0  # z_0 = 4
    x[0, 1, :4] = -1.0  # z_1 = -2
    x[0, 2, :, :4] = 0.5  # z_2 = 1
    return x


def test_sigmoid_captions_are_sigmoid_of_the_max_logit():
    """Multi-label: caption probability sigmoid(max logit) (softmax would share it among the classes), predicted
    class the arg-max of the logits; the default stays the softmax."""
    x = multilabel_image()
    z = torch.tensor([4.0, -2.0, 1.0])
    probe = ProbeSet(x)
    sig = GradientCallback(probabilities="sigmoid").predict(ChannelMeans(), probe)
    assert sig["pred:class"].tolist() == [0]
    assert torch.allclose(sig["pred:prob"], torch.sigmoid(torch.tensor([4.0])))
    soft = GradientCallback().predict(ChannelMeans(), probe)
    assert soft["pred:class"].tolist() == [0]
    assert torch.allclose(soft["pred:prob"], z.softmax(0)[:1])
    assert not torch.allclose(sig["pred:prob"], soft["pred:prob"])
    assert torch.allclose(probabilities(z[None], "sigmoid")["pred:prob"], torch.sigmoid(z[:1]))


def test_sigmoid_captions_name_every_predicted_class():
    """Multi-label panels named only the arg-max class ('pred: circle 98%' on an image the model also finds a
    triangle in); with probabilities='sigmoid' they name every class over 50%, most probable first (at most 3,
    then '+n'), or the most probable one when none is over 50%. Softmax captions keep one class."""
    names = ["circle", "square", "triangle", "cross", "star"]
    probe = ProbeSet(multilabel_image())  # z = (4, -2, 1)
    sig = GradientCallback(probabilities="sigmoid").predict(ChannelMeans(), probe)
    assert panel_caption("p000", probe, sig, 0, names) == "p000  pred: circle 98%, triangle 73%"
    soft = GradientCallback().predict(ChannelMeans(), probe)
    assert panel_caption("p000", probe, soft, 0, names) == "p000  pred: circle 95%"
    none = probabilities(torch.tensor([[-1.0, -3.0, -0.5]]), "sigmoid")
    assert panel_caption("p000", probe, none, 0, names) == "p000  pred: triangle 38%"
    many = probabilities(torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]]), "sigmoid")
    assert panel_caption("p000", probe, many, 0, names) == "p000  pred: star 99%, cross 98%, triangle 95% +2"


def test_sigmoid_faithfulness_curve_end_points():
    """Deletion (zero baseline) runs from sigmoid(z_c(x)) to sigmoid(0) = 0.5; insertion ends at sigmoid(z_c(x))."""
    x = multilabel_image()
    saliency = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(0))
    for c, zc in ((0, 4.0), (1, -2.0), (2, 1.0)):
        curves = perturbation_curves(
            ChannelMeans(), x, {"m": saliency}, torch.tensor([c]), steps=4, probabilities="sigmoid"
        )
        dele, ins = curves["deletion"]["m"][0], curves["insertion"]["m"][0]
        assert dele[0].item() == pytest.approx(torch.sigmoid(torch.tensor(zc)).item(), abs=1e-6)
        assert dele[-1].item() == pytest.approx(0.5, abs=1e-6)
        assert ins[-1].item() == pytest.approx(torch.sigmoid(torch.tensor(zc)).item(), abs=1e-6)
        soft = perturbation_curve(ChannelMeans(), x, saliency, torch.tensor([c]), steps=4)
        assert soft[0, -1].item() == pytest.approx(1 / 3, abs=1e-6)  # softmax of zero logits, the default


def test_sigmoid_occlusion_prob_drop():
    """prob = sigmoid(z) - sigmoid(z_occluded): a 4x4 zero window over class 0's ones lowers z_0 by 4 * 16/64 = 1."""
    x = multilabel_image()
    drops = occlusion(ChannelMeans(), x, 0, window=4, stride=4, fill="zero", probabilities="sigmoid")
    s = torch.sigmoid
    assert torch.allclose(drops["score"], torch.ones(1, 2, 2))
    assert torch.allclose(drops["prob"], (s(torch.tensor(4.0)) - s(torch.tensor(3.0))).expand(1, 2, 2))
    drops2 = occlusion(ChannelMeans(), x, 2, window=4, stride=4, fill="zero", probabilities="sigmoid")
    left = s(torch.tensor(1.0)) - s(torch.tensor(0.5))  # windows over the left half hold 0.5s: z_2 drops by 0.5
    assert torch.allclose(drops2["prob"], torch.stack([left, torch.tensor(0.0)]).repeat(2).view(1, 2, 2))
    soft = occlusion(ChannelMeans(), x, 0, window=4, stride=4, fill="zero")["prob"]
    z = torch.tensor([4.0, -2.0, 1.0])
    # the window zeroes every channel: each window's logits (row-major), class 0's softmax depends on all of them
    zo = torch.tensor([[3.0, -1.0, 0.5], [3.0, -1.0, 1.0], [3.0, -2.0, 0.5], [3.0, -2.0, 1.0]])
    assert torch.allclose(soft, (z.softmax(0)[0] - zo.softmax(1)[:, 0]).view(1, 2, 2))


def test_sigmoid_scorecam_weights():
    """Score-CAM weight of a channel = sigmoid(z_c) of the image masked by that channel (normalized to [0, 1])."""
    x = multilabel_image()
    acts = torch.zeros(1, 2, 4, 4)
    acts[0, 0, :2] = 1.0  # top half (upsampled bilinearly: a soft edge)
    acts[0, 1] = 2.0  # constant: an all-zero mask, z = 0
    classes = torch.tensor([0])
    w = scorecam_weights(ChannelMeans(), x, acts, "predicted", classes=classes, probabilities="sigmoid")
    mask = F.interpolate(acts[:, :1], size=(8, 8), mode="bilinear", align_corners=False)[0, 0]
    mask = (mask - mask.min()) / (mask.max() - mask.min())
    z0 = 4 * mask.mean()  # channel 0 of x is all ones
    assert torch.allclose(w, torch.stack([torch.sigmoid(z0), torch.tensor(0.5)])[None])
    soft = scorecam_weights(ChannelMeans(), x, acts, "predicted", classes=classes)
    assert soft[0, 1].item() == pytest.approx(1 / 3, abs=1e-6)


def test_sigmoid_reaches_the_tracker_and_occlusion_callback():
    """The callbacks pass their option down: the tracker's deletion AUC and OcclusionCallback's 'prob' map are
    those of the sigmoid (not the softmax)."""
    x, probe = multilabel_image(), ProbeSet(multilabel_image(), labels=torch.tensor([0]))
    saliency = {"m": torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(0))}
    for how in ("sigmoid", "softmax"):
        tracker = MapTracker(faithfulness=True, drift=False, pointing_game=False, deletion_steps=4)
        cb = GradientCallback(target="label", probabilities=how, tracker=tracker)
        out = tracker.compute(ChannelMeans(), probe, saliency, callback=cb)
        curves = perturbation_curves(ChannelMeans(), x, saliency, torch.tensor([0]), steps=4, probabilities=how)
        assert torch.allclose(out["track:deletion/m"], curve_auc(curves["deletion"]["m"]))
        occ = OcclusionCallback(target=0, window=4, stride=4, fill="zero", probabilities=how)
        prob = occ.compute_maps(ChannelMeans(), probe)["occlusion/prob"]
        expected = occlusion(ChannelMeans(), x, 0, window=4, stride=4, fill="zero", probabilities=how)["prob"]
        assert torch.allclose(prob, expected.repeat_interleave(4, 1).repeat_interleave(4, 2))
        if how == "sigmoid":  # every window lowers z_0 from 4 to 3
            assert torch.allclose(
                prob, (torch.sigmoid(torch.tensor(4.0)) - torch.sigmoid(torch.tensor(3.0))).expand(1, 8, 8)
            )


@pytest.mark.parametrize(
    "mode,how,expected",
    [
        ("untargeted", "softmax", 3 / 8),  # z_0 - 4e < z_2 + 4e: the arg-max moves to class 2
        ("next_class", "softmax", 3 / 4),  # z_1 + 4e > z_0 - 4e
        ("untargeted", "sigmoid", 1.0),  # class 0's own decision: z_0 - 4e <= 0 (class 0 no longer predicted)
        ("next_class", "sigmoid", 1 / 2),  # class 1 becomes a yes: z_1 + 4e > 0
    ],
)
def test_sigmoid_adversarial_flips_one_class_decision(mode, how, expected):
    """Multi-label: with probabilities='sigmoid' AdversarialCallback flips one class's own decision (sigmoid > 0.5)
    instead of the arg-max (which was all it measured: a flip of the arg-max among classes that all stay predicted).
    FGSM moves each channel mean by epsilon, so each logit z_c = 4 mean(x_c) by 4 epsilon; z = (4, -2, 1)."""
    probe = ProbeSet(multilabel_image())
    cb = AdversarialCallback(
        epsilon=0.5,
        epsilon_units="input",
        attack="fgsm",
        min_flip_attack="fgsm",
        min_flip_max_epsilon=2.0,
        min_flip_iterations=10,
        mode=mode,
        probabilities=how,
    )
    out = cb.compute(ChannelMeans(), probe)
    assert out["min_eps"].item() == pytest.approx(expected, abs=2 / 1024 + 1e-6)
    assert out["flipped"].item() == (expected < 0.5)  # the logged attack's budget is 0.5
    if how == "sigmoid":
        decided, z = (0, 4.0) if mode == "untargeted" else (1, -2.0)
        assert out["decided"].item() == decided
        assert out["prob"].item() == pytest.approx(torch.sigmoid(torch.tensor(z)).item(), abs=1e-6)
        z_adv = z - 2.0 if mode == "untargeted" else z + 2.0
        assert out["adv_prob"].item() == pytest.approx(torch.sigmoid(torch.tensor(z_adv)).item(), abs=1e-6)


def test_sigmoid_prediction_flips_count_any_class_decision():
    """Multi-label drift: a probe whose arg-max stays but another class's decision changes (z_2 from 1 to -1: the
    triangle no longer predicted) counted as no flip; with probabilities='sigmoid' it is one (any class's sigmoid
    crossing 0.5), while the softmax default keeps arg-max flips."""
    before, after = multilabel_image(), multilabel_image()
    after[0, 2, :, :4] = -0.5  # z_2 = 1 -> -1; z_0 = 4 stays the largest
    for how, expected in (("sigmoid", 1.0), ("softmax", 0.0)):
        tracker = MapTracker(filmstrip=False, custom_scalars=False)
        cb = GradientCallback(target="predicted", probabilities=how, tracker=tracker)
        w = RecordingWriter()
        for step, x in enumerate((before, after)):
            probe = ProbeSet(x)
            maps = {"m": torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(step))}
            results = tracker.compute(ChannelMeans(), probe, maps, callback=cb)
            assert results["track:pred"].tolist() == [0]
            tracker.log(VizLogger(w, step), maps, results, probe, callback=cb)
        assert w.scalars["viz-gradients/drift/prediction_flips"] == [(1, expected)], how


def test_probabilities_option_is_validated(tmp_path):
    """A bad value fails at construction, naming the callback, the option and the allowed values; 'sigmoid' on a
    one-logit head (whose softmax already is sigmoid(z)) fails at setup."""
    for cls in (GradientCallback, OcclusionCallback, CAMCallback, AdversarialCallback):
        with pytest.raises(ValueError, match=rf"{cls.__name__}\(probabilities=...\) must be 'softmax' or 'sigmoid'"):
            cls(probabilities="softmx")
    with pytest.raises(ValueError, match=r"probabilities must be 'softmax' or 'sigmoid'.*'log'"):
        occlusion(ChannelMeans(), multilabel_image(), 0, probabilities="log")
    loaders = DataLoader(binary_data(), batch_size=8), DataLoader(binary_data(), batch_size=8)
    with pytest.raises(ValueError, match=r"GradientCallback\(probabilities='sigmoid'\): the model has one logit"):
        tiny_trainer(str(tmp_path), [GradientCallback(num_probes=2, probabilities="sigmoid")], max_epochs=1).fit(
            LitBinary(), *loaders
        )


def test_sigmoid_probabilities_through_fit(tmp_path):
    """A multi-label model trained with BCEWithLogitsLoss: captions, faithfulness, occlusion 'prob' and Score-CAM
    run with probabilities='sigmoid' and log their maps."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(8, 3, 8, 8, generator=g), (torch.rand(8, 4, generator=g) > 0.5).float())
    loaders = DataLoader(ds, batch_size=4), DataLoader(ds, batch_size=4)
    cbs = [
        GradientCallback(
            num_probes=2, target="predicted", probabilities="sigmoid", tracker=MapTracker(faithfulness=True)
        ),
        OcclusionCallback(num_probes=2, target="predicted", window=4, probabilities="sigmoid"),
        CAMCallback(methods=["scorecam"], num_probes=2, target="predicted", probabilities="sigmoid"),
        AdversarialCallback(num_probes=2, steps=2, min_flip_iterations=2, probabilities="sigmoid"),
        EmbeddingCallback(num_probes=8, projector=False),
    ]
    # multi-hot labels are no class indices: the embeddings say so and what to do
    with pytest.warns(VisualizationWarning, match=r"multi-hot rows of a multi-label task.*probes=ProbeSet\(images"):
        tiny_trainer(str(tmp_path), cbs, max_epochs=1, limit_train_batches=1).fit(
            LitHead(TinyCNN(num_classes=4), F.binary_cross_entropy_with_logits), *loaders
        )
    acc = read_events(str(tmp_path))
    tags = set(acc.Tags()["images"])
    assert "viz-embeddings/penultimate/pca" in tags
    assert "viz-embeddings/penultimate/silhouette" not in acc.Tags()["scalars"]
    assert any("occlusion" in t for t in tags) and any("scorecam" in t or "cam" in t for t in tags)
    assert {"viz-adversarial/p000", "viz-adversarial/p001"} <= tags
    assert 0.0 <= acc.Scalars("viz-adversarial/flip_rate")[-1].value <= 1.0
