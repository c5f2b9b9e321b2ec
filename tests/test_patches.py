"""Receptive fields (arithmetic and gradient), top-k per unit with deterministic merges, and TopPatchesCallback."""

from __future__ import annotations

import itertools

import pytest
import torch
import torchvision
from helpers import LitTiny, check_untouched, image_steps, read_events, scalar_steps, tiny_loaders, tiny_trainer
from torch import nn

from lightning_viz.callbacks.base import _concat
from lightning_viz.callbacks.patches import TopPatchesCallback, resize_patches
from lightning_viz.capture import capture, isolated
from lightning_viz.layers import LayerNotFoundError, get_layer
from lightning_viz.methods.patches import TopK, merge_topk, scan_topk, scan_topk_layers, topk_per_unit
from lightning_viz.methods.receptive_field import (
    NotAConvStackError,
    _unclip,
    crop_boxes,
    gradient_receptive_boxes,
    gradient_receptive_field,
    graph_receptive_boxes,
    receptive_field,
    stack_receptive_field,
)
from lightning_viz.probe import ProbeSet


def known_stack(pool: nn.Module, relu: bool) -> nn.Sequential:
    """conv3 p1 -> pool2 -> conv3 s2 p1 -> conv3 dilation 2 p2.

    By hand: R = 1 + 2 = 3; pool: + 1*1 = 4 (J = 2); conv s2: + 2*2 = 8 (J = 4); dilated: + 2*2*4 = 24.
    Offset P = 1 (conv) + 0 + 1*2 (conv) + 2*4 (dilated) = 11. Grid on 16 px: 16 -> 8 -> 4 -> 4.
    """
    act = nn.ReLU(inplace=True) if relu else nn.Identity()
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        act,
        pool,
        nn.Conv2d(2, 2, 3, stride=2, padding=1),
        nn.Conv2d(2, 2, 3, dilation=2, padding=2),
    ).eval()


def test_stack_receptive_field_is_hand_computed():
    rf = stack_receptive_field(known_stack(nn.MaxPool2d(2), relu=True), "4", (1, 16, 16))
    assert (rf.size, rf.jump, rf.offset, rf.grid) == ((24, 24), (4, 4), (11, 11), (4, 4))
    assert rf.box(0, 0) == (-11, -11, 13, 13)
    assert rf.box(2, 3) == (-3, 1, 21, 25)
    assert torch.equal(rf.boxes()[2, 3], torch.tensor([-3, 1, 21, 25]))
    # VGG11 up to the third max-pool (features.10): R = 30, J = 8, P = 11 by hand
    vgg = torchvision.models.vgg11(weights=None).eval()
    rf = stack_receptive_field(vgg, "features.10", (3, 32, 32))
    assert (rf.size, rf.jump, rf.offset, rf.grid) == ((30, 30), (8, 8), (11, 11), (4, 4))


def test_arithmetic_receptive_field_leaves_a_training_model_as_it_was():
    """The shape-probing forward of a training-mode model (BatchNorm, dropout) updates no running statistics and
    draws no dropout mask; so for a branching model ('auto' follows its ops); the gradient method refuses a
    training-mode model (batch statistics), with its buffers untouched."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Dropout(0.5), nn.MaxPool2d(2))
    model.train()
    mean, batches, rng = model[1].running_mean.clone(), int(model[1].num_batches_tracked), torch.get_rng_state()
    rf = receptive_field(model, "3", (1, 8, 8))
    assert rf.shape == (4, 4, 4) and torch.equal(rf[0, 0], torch.tensor([-1, -1, 3, 3]))
    assert torch.equal(model[1].running_mean, mean) and int(model[1].num_batches_tracked) == batches
    assert torch.equal(torch.get_rng_state(), rng) and model.training and model[1].training
    branching = torchvision.models.resnet18(weights=None)
    buffers = [b.clone() for b in branching.buffers()]
    rng = torch.get_rng_state()
    rf = receptive_field(branching, "layer2", (3, 16, 16))
    assert rf.shape == (2, 2, 4) and branching.training and branching.bn1.training
    with pytest.raises(ValueError, match="training mode"):
        receptive_field(branching, "layer2", (3, 16, 16), method="gradient")
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(buffers, branching.buffers()))


def test_ceil_mode_pool_output_size_like_torch():
    # ceil_mode drops a last window that would start in the right padding (torch's pooling rule):
    # conv3 p1 on 5 px -> 5; pool k2 s2 p1 ceil: ceil((5 + 2 - 2) / 2) + 1 = 4, but (4 - 1) * 2 >= 5 + 1 -> 3.
    # By hand: R = 3 + 1 = 4, J = 2, P = 1 + 1 = 2.
    for pool in (
        nn.MaxPool2d(2, stride=2, padding=1, ceil_mode=True),
        nn.AvgPool2d(2, stride=2, padding=1, ceil_mode=True),
    ):
        model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), pool).eval()
        rf = stack_receptive_field(model, "1", (1, 5, 5))
        assert (rf.size, rf.jump, rf.offset, rf.grid) == ((4, 4), (2, 2), (2, 2), (3, 3))
    # kernel 1 stride 2 ceil on 4 px: torch gives 2 positions (a third would start past the input)
    rf = stack_receptive_field(nn.Sequential(nn.MaxPool2d(1, stride=2, ceil_mode=True)), "0", (1, 4, 4))
    assert rf.grid == (2, 2)


def test_same_padding_with_an_even_kernel():
    # padding='same', k = 4: torch pads 1 left / 2 right, the output keeps the input size. By hand: R = 4, J = 1,
    # P = 1; then conv3 p1: R = 6, P = 2. Unit (0, 0) sees rows/cols [-2, 4).
    model = nn.Sequential(nn.Conv2d(1, 1, 4, padding="same"), nn.Conv2d(1, 1, 3, padding=1)).eval()
    rf = stack_receptive_field(model, "1", (1, 6, 7))
    assert (rf.size, rf.jump, rf.offset, rf.grid) == ((6, 6), (1, 1), (2, 2), (6, 7))
    assert rf.box(0, 0) == (-2, -2, 4, 4)
    # the gradient support agrees inside the image
    _, gboxes = gradient_receptive_field(model, "1", (1, 6, 7), trials=1)
    assert torch.equal(gboxes[2, 3], torch.tensor([0, 1, 6, 7]))


def test_gradient_receptive_field_batches_within_the_memory_budget():
    """The positions' copies go through the model in batches the memory budget holds (was: 64 at a time whatever
    the model, 4.4 GB for a ResNet-50's layer4 at 224 px on the CPU, whose default budget is 512 MiB); the boxes do
    not depend on the batching."""
    from lightning_viz.methods.batching import GRAD_FACTOR, activation_bytes_per_image

    model = known_stack(nn.AvgPool2d(2), relu=False)  # layer '4': 12 x 12 positions at 48 px
    per_image = activation_bytes_per_image(model, torch.zeros(1, 1, 48, 48)) * GRAD_FACTOR
    sizes: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, inputs: sizes.append(inputs[0].shape[0]))
    try:
        support, boxes = gradient_receptive_field(model, "4", (1, 48, 48), trials=1, memory_mb=5.5 * per_image / 2**20)
    finally:
        hook.remove()
    assert sizes[0] == 1 and max(sizes[1:]) == 5 and sum(sizes[1:]) == 144  # one probe forward, then batches of 5
    ref_support, ref_boxes = gradient_receptive_field(model, "4", (1, 48, 48), trials=1, chunk_size=144)
    assert torch.equal(support, ref_support) and torch.equal(boxes, ref_boxes)


def test_gradient_support_equals_arithmetic_box_inside_the_image():
    model = known_stack(nn.AvgPool2d(2), relu=False)  # linear: every path carries gradient
    boxes = stack_receptive_field(model, "4", (1, 48, 48)).boxes()
    support, gboxes = gradient_receptive_field(model, "4", (1, 48, 48), trials=1)
    assert support.shape == (12, 12, 48, 48)
    for i, j in [(5, 5), (3, 8), (8, 3)]:  # positions whose receptive field lies inside the image
        assert torch.equal(gboxes[i, j], boxes[i, j]), (i, j)
    # at the border the gradient box is the arithmetic box clipped to the image
    torch.testing.assert_close(gboxes[0, 0], boxes[0, 0].clamp(0, 48))
    # with ReLU and max-pool the support (united over random inputs) stays inside the arithmetic box
    model = known_stack(nn.MaxPool2d(2), relu=True)
    support, gboxes = gradient_receptive_field(model, "4", (1, 48, 48), trials=3)
    b = boxes[5, 5].tolist()
    assert support[5, 5].any()
    assert not support[5, 5][: b[0]].any() and not support[5, 5][b[2] :].any()
    assert not support[5, 5][:, : b[1]].any() and not support[5, 5][:, b[3] :].any()


def test_branching_model_falls_back_to_gradient():
    net = torchvision.models.resnet18(weights=None).eval()
    with pytest.raises(NotAConvStackError, match="downsample"):
        stack_receptive_field(net, "layer2", (3, 32, 32))
    assert stack_receptive_field(net, "layer1", (3, 32, 32)).size == (43, 43)  # stride-1 residual blocks: a chain
    boxes = receptive_field(net, "layer2", (3, 32, 32), method="auto")  # RF 99 px > image: whole image
    assert boxes.shape == (4, 4, 4)
    assert torch.equal(boxes[1, 1], torch.tensor([0, 0, 32, 32]))
    with pytest.raises(ValueError, match="method must be"):
        receptive_field(net, "layer2", (3, 32, 32), method="exact")


class TwoBranches(nn.Module):
    """A 3x3 and a 5x5 conv (same padding) side by side on one input, concatenated: an Inception block in small."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 5, padding=2)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


def test_parallel_branches_of_one_size_are_not_a_chain():
    """Both branches keep the size, so the size check passed and the walk composed them in series: R = 1 + 2 + 4 = 7
    (found against torchvision GoogLeNet's inception3a: 75 where the gradient gives 43). The union is the 5x5: unit
    (i, j) sees rows and columns [i - 2, i + 3)."""
    torch.manual_seed(0)
    model = nn.Sequential(TwoBranches(), nn.Conv2d(2, 1, 1)).eval()
    with pytest.raises(NotAConvStackError, match="'0.a' and '0.b' both read one tensor"):
        stack_receptive_field(model, "1", (1, 12, 12))
    boxes = receptive_field(model, "1", (1, 12, 12), method="auto")  # the gradient's support
    i = torch.arange(12)
    expected = torch.stack(torch.broadcast_tensors(i.view(12, 1) - 2, i.view(1, 12) - 2), -1)
    assert torch.equal(boxes, torch.cat([expected, expected + 5], -1))
    # an in-place activation hands its input on (a chain, not a branch); ReLU after the join is a chain too
    chain = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(1, 1, 3, padding=1))
    assert stack_receptive_field(chain, "2", (1, 12, 12)).size == (5, 5)


def test_arithmetic_receptive_field_on_a_branched_model_fails_at_setup(tmp_path):
    """receptive_field='arithmetic' on a layer behind parallel branches (any Inception block or ResNet downsample) was
    refused only when the first epoch's patches were drawn (a VisualizationError after a whole epoch of training):
    now at setup, before the first training step, saying what works. A layer before the branches still runs."""
    net = nn.Sequential(TwoBranches(), nn.Conv2d(2, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    cb = TopPatchesCallback(layers=["net.0.a", "net.1"], receptive_field="arithmetic", num_probes=6, k=2)
    trainer = tiny_trainer(str(tmp_path), [cb], max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    with pytest.raises(ValueError) as err:
        trainer.fit(LitTiny(net), *tiny_loaders(n=12, channels=1))
    assert trainer.global_step == 0
    assert str(err.value) == (
        "TopPatchesCallback: receptive_field='arithmetic' does not apply to layer 'net.1': the model branches before "
        "the end of 'net.1' ('net.0.a' and 'net.0.b' both read one tensor: parallel paths, e.g. an Inception block), "
        "so layer arithmetic does not apply. Use receptive_field='auto' (layer arithmetic where it applies, else the "
        "gradient) or 'gradient'."
    )
    cb = TopPatchesCallback(layers=["net.0.a"], receptive_field="arithmetic", num_probes=6, k=2)
    tiny_trainer(str(tmp_path / "ok"), [cb], max_epochs=1, limit_train_batches=1, limit_val_batches=1).fit(
        LitTiny(net), *tiny_loaders(n=12, channels=1)
    )
    assert "viz-top_patches/net.0.a/unit000" in cb.last_logged_tags


def test_crop_boxes_pads_at_borders():
    img = torch.arange(16.0).view(1, 1, 4, 4)
    crops = crop_boxes(img.expand(2, 1, 4, 4), torch.tensor([[-1, -1, 2, 2], [1, 1, 4, 4]]), pad_value=-1.0)
    assert torch.equal(crops[0, 0], torch.tensor([[-1.0, -1, -1], [-1, 0, 1], [-1, 4, 5]]))
    assert torch.equal(crops[1, 0], torch.tensor([[5.0, 6, 7], [9, 10, 11], [13, 14, 15]]))
    big = crop_boxes(img, torch.tensor([[-10, -10, 14, 14]]), max_size=(4, 4))  # capped, centered
    assert torch.equal(big, img)


def brute_force_topk(act: torch.Tensor, k: int) -> list[list[tuple[float, int, int, int]]]:
    """Per unit: (value, image, y, x) sorted by value desc then image asc; first max position per image."""
    out = []
    for u in range(act.shape[1]):
        cands = []
        for b in range(act.shape[0]):
            flat = act[b, u].flatten().tolist()
            best = max(flat)
            pos = flat.index(best)
            cands.append((best, b, pos // act.shape[3], pos % act.shape[3]))
        out.append(sorted(cands, key=lambda c: (-c[0], c[1]))[:k])
    return out


def as_list(top: TopK) -> list[list[tuple[float, int, int, int]]]:
    return [
        list(zip(top.values[u].tolist(), top.image[u].tolist(), top.y[u].tolist(), top.x[u].tolist()))
        for u in range(top.values.shape[0])
    ]


def test_topk_and_merge_over_shards_equal_topk_of_whole_set_with_ties():
    g = torch.Generator().manual_seed(0)
    act = torch.randint(0, 4, (13, 3, 3, 3), generator=g).float()  # many ties
    whole = topk_per_unit(act, k=5)
    assert as_list(whole) == brute_force_topk(act, 5)
    for cuts in ([0, 5, 9, 13], [0, 1, 13], [0, 4, 4, 13]):  # shards, one of them empty
        parts = [topk_per_unit(act[a:b], 5, torch.arange(a, b)) for a, b in itertools.pairwise(cuts) if b > a]
        # ranks send rows [k, U, 4]; the base concatenates them on dim 0 in rank order
        rows = torch.cat([p.to_rows() for p in parts], dim=0)
        merged = merge_topk([TopK.from_rows(rows)], 5)
        assert as_list(merged) == as_list(whole)
        assert as_list(merge_topk(parts[::-1], 5)) == as_list(whole)  # order of parts does not matter


class Identity2d(nn.Module):
    def __init__(self):
        super().__init__()
        self.feat = nn.Identity()

    def forward(self, x):
        return self.feat(x)


def test_scan_topk_over_batches():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 2, 4, 4, generator=g)
    model = Identity2d()
    top = scan_topk(model, x, "feat", units=[1], k=4, batch_size=3, offset=100)
    expected = brute_force_topk(x[:, [1]], 4)
    assert as_list(top) == [[(v, b + 100, y, xx) for v, b, y, xx in expected[0]]]
    with pytest.raises(ValueError, match=r"units \[5\] out of range for layer 'feat' with 2 channels"):
        scan_topk(model, x, "feat", units=[5], k=2)


def test_callback_logs_one_grid_per_unit_and_ddp_merge_equals_single(tmp_path):
    cb = TopPatchesCallback(layers=["net.conv2"], units=[0, 2], k=3, num_probes=20, chunk_size=8, patch_px=8)
    train, val = tiny_loaders()
    model = LitTiny()
    trainer = tiny_trainer(str(tmp_path), [cb], max_epochs=2)
    trainer.fit(model, train, val)
    acc = read_events(str(tmp_path))
    for unit in ("unit000", "unit002"):
        assert image_steps(acc, f"viz-top_patches/net.conv2/{unit}") == [0, 1]
        assert scalar_steps(acc, f"viz-top_patches/net.conv2/{unit}/max") == [0, 1]
    img = acc.Images("viz-top_patches/net.conv2/unit000")[-1]
    # caption (3 lines), k=3 patches, classes
    assert (img.height, img.width) == (3 * 16 + 8 + 1 + 11 + 4, 3 * (8 + 2) + 2)
    assert "viz-top_patches/net.conv2/unit001" not in acc.Tags()["images"]
    # TinyCNN conv1+conv2 (3x3, pad 1): receptive field 5x5, arithmetic
    assert torch.equal(cb.boxes(model, "net.conv2", (3, 8, 8))[0, 0], torch.tensor([-2, -2, 3, 3]))

    # What three DDP ranks would send, concatenated in rank order by the base, equals one rank's result.
    probe = cb.probes
    model.train()
    with isolated(model):
        single = cb.compute(model, probe)
        shards = [cb.compute(model, probe.shard(r, 3)) for r in range(3)]
    gathered = _concat(shards)
    assert gathered["net.conv2"].shape == (9, 2, 4)
    a = merge_topk([TopK.from_rows(gathered["net.conv2"])], 3)
    b = merge_topk([TopK.from_rows(single["net.conv2"])], 3)
    assert as_list(a) == as_list(b)
    assert set(a.image.flatten().tolist()) <= set(range(20))
    cb.every_n_epochs = 1
    check_untouched(model, lambda: cb.run(trainer, model))
    # under inference mode (trainer.validate), also the gradient receptive field works
    cb.receptive_field, cb._boxes = "gradient", {}
    with torch.inference_mode():
        check_untouched(model, lambda: cb.run(trainer, model))
    assert torch.equal(cb.boxes(model, "net.conv2", (3, 8, 8))[3, 3], torch.tensor([1, 1, 6, 6]))


def test_callback_runs_a_model_in_another_dtype_than_the_probes():
    model = LitTiny().double()  # e.g. Trainer(precision="64-true"); the probes stay float32
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cb = TopPatchesCallback(layers=["net.conv2"], units=[1], k=2, chunk_size=2)
    with isolated(model):
        out = cb.compute(model, ProbeSet(images=x, labels=torch.tensor([0, 1, 2, 0, 1])))
        expected = scan_topk(model, x.double(), "net.conv2", [1], 2)
    assert as_list(TopK.from_rows(out["net.conv2"])) == as_list(expected)


def test_several_layers_are_scanned_in_one_forward_per_chunk():
    """Two layers: one pass over the probes (not one per layer), each layer's top-k as when scanned alone."""
    model = LitTiny()
    calls = []
    model.net.register_forward_pre_hook(lambda m, inputs: calls.append(inputs[0].shape[0]))
    x = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cb = TopPatchesCallback(layers=["net.conv1", "net.conv2"], units=[1, 3], k=3, chunk_size=4)
    with isolated(model):
        out = cb.compute(model, ProbeSet(images=x, labels=torch.arange(10) % 3))
        calls_compute = list(calls)
        for layer in ("net.conv1", "net.conv2"):
            assert as_list(TopK.from_rows(out[layer])) == as_list(scan_topk(model, x, layer, [1, 3], 3, batch_size=4))
    # one forward per chunk of 4 probes for both layers (was twice as many), after one of an image that finds the cut
    assert calls_compute == [1, 4, 4, 2]


def test_scan_stops_each_forward_after_the_layers_with_the_top_k_of_the_whole_forward():
    """What follows the scanned layers is not computed (after one image's pass finds the cut), and the top-k is that
    of plain whole forwards; a layer whose output a later in-place ReLU rectifies (bn1) keeps its own values."""
    model = LitTiny().eval()
    x = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    heads = []
    model.net.fc.register_forward_pre_hook(lambda m, inputs: heads.append(inputs[0].shape[0]))
    units = {"net.bn1": [0, 2], "net.conv1": None}
    with isolated(model):
        tops = scan_topk_layers(model, x, units, 3, batch_size=4)
        cut = list(heads)
        with torch.no_grad(), capture(model, list(units)) as cap:
            model(x)  # the straightforward way: one whole forward of every probe
            whole = {"net.bn1": cap["net.bn1"][:, [0, 2]], "net.conv1": cap["net.conv1"]}
    assert cut == [1]  # only the first image's pass reached the head
    for layer, act in whole.items():
        assert as_list(tops[layer]) == as_list(topk_per_unit(act, 3))


def test_probes_that_do_not_activate_a_unit_are_not_shown_as_its_top_patches(tmp_path):
    """A dead unit (all-zero map after the ReLU) had its "top patches" drawn from the top-left corners of the first
    probes, and a unit active on one probe only filled its row with arbitrary ones: those tiles are now blank (light
    gray), labeled "not active", and the caption of a unit active nowhere says so."""
    import io

    import numpy as np
    from PIL import Image

    net = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net.append(nn.Linear(2, 3))
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.copy_(torch.tensor([-1.0, -1.0]))  # unit 0: never > 0
        net[0].weight[1, 0, 1, 1] = 1.0  # unit 1: > 0 only where input channel 0 exceeds 1
    x = torch.zeros(4, 3, 8, 8)
    x[2, 0, 3, 3] = 5.0
    probes = ProbeSet(images=x, labels=torch.tensor([0, 1, 2, 0]))
    cb = TopPatchesCallback(layers="net.1", k=3, probes=probes, class_names=["cat", "dog", "bird"])
    tiny_trainer(str(tmp_path), [cb], max_epochs=1).fit(LitTiny(net, lr=0.0), *tiny_loaders(n=12))
    acc = read_events(str(tmp_path))

    def patches(unit):
        (img,) = acc.Images(f"viz-top_patches/net.1/unit{unit:03d}")
        rgb = np.asarray(Image.open(io.BytesIO(img.encoded_image_string)).convert("RGB"))
        band = rgb[-2 - 11 - 1 - 64 : -2 - 11 - 1]  # the 64 px patches above their labels (11) and the padding
        return [band[:, 2 + 66 * i : 66 * (i + 1)] for i in range(3)]

    assert all((p == 230).all() for p in patches(0))  # light gray: no probe excites unit 0
    first, *rest = patches(1)
    assert all((p == 230).all() for p in rest) and not (first == 230).all()  # only probe 2 excites unit 1
    assert [v.value for v in acc.Scalars("viz-top_patches/net.1/unit001/max")] == [4.0]


def test_default_units_and_errors():
    model = LitTiny()
    cb = TopPatchesCallback(layers=["net.conv1"], num_units=3, k=2, num_probes=4)
    probe = ProbeSet(images=torch.randn(4, 3, 8, 8), labels=torch.tensor([0, 1, 2, 0]))
    with isolated(model):
        out = cb.compute(model, probe)
    assert out["units:net.conv1"].tolist() == [[0, 1, 2]]
    assert out["net.conv1"].shape == (2, 3, 4)
    with pytest.raises(LayerNotFoundError, match="Unknown layer 'net.conv9'"):
        TopPatchesCallback(layers=["net.conv9"]).check(model)
    with pytest.raises(ValueError, match=r"units \[7\] out of range for layer 'net.conv2' with 4 channels"):
        TopPatchesCallback(layers=["net.conv2"], units=[7]).check(model)
    with pytest.raises(ValueError, match="k must be >= 1"):
        TopPatchesCallback(layers=["net.conv2"], k=0)


def test_patches_are_shown_at_64_px_and_large_receptive_fields_averaged_down(tmp_path):
    """Default patch_px is 64 (32 made a ResNet-50 layer3 patch of a 224 px probe, its whole receptive field,
    a 7x-subsampled thumbnail); small fields are upsampled with nearest, large ones area-averaged (no aliasing)."""
    small = torch.arange(4.0).view(1, 1, 2, 2)
    assert torch.equal(resize_patches(small, 4), small.repeat_interleave(2, -2).repeat_interleave(2, -1))
    stripes = (torch.arange(32) % 2).float().view(1, 1, 1, 32).expand(2, 3, 32, 32)  # 1 px stripes
    shown = resize_patches(stripes, 8)
    assert shown.shape == (2, 3, 8, 8) and torch.equal(shown, torch.full_like(shown, 0.5))  # nearest: all 0 or 1
    # non-square crops (a 99 px field capped by a 64 x 96 probe) keep their aspect ratio (were squashed square)
    assert resize_patches(torch.rand(2, 3, 64, 96), 64).shape == (2, 3, 43, 64)
    assert resize_patches(torch.rand(1, 1, 5, 3), 64).shape == (1, 1, 64, 38)

    cb = TopPatchesCallback(layers=["net.conv2"], units=[0], k=2, num_probes=8)
    tiny_trainer(str(tmp_path), [cb], max_epochs=1).fit(LitTiny(), *tiny_loaders(n=12))
    img = read_events(str(tmp_path)).Images("viz-top_patches/net.conv2/unit000")[-1]
    # 5x5 fields shown at 64 px; the caption on 2 lines
    assert (img.height, img.width) == (2 * 16 + 64 + 1 + 11 + 4, 2 * (64 + 2) + 2)


@pytest.mark.parametrize("kind", ["embeddings", "top_patches"])
def test_probe_scans_default_to_the_memory_budget(tmp_path, monkeypatch, kind):
    """EmbeddingCallback (chunk_size was 256) and TopPatchesCallback (64) pushed their probe set through the model
    in fixed batches: 128 probes of a 224 px ResNet-50 took 1.3 GB at once. By default they now fill each forward
    up to the memory budget, like the other batched methods, with the same results as one batch."""
    import lightning_viz.methods.batching as batching
    from lightning_viz.callbacks.embeddings import EmbeddingCallback

    def make(chunk_size):
        if kind == "embeddings":
            return EmbeddingCallback(num_probes=12, projector=False, chunk_size=chunk_size)
        return TopPatchesCallback(layers=["net.conv2"], units=[0, 1], k=3, num_probes=12, chunk_size=chunk_size)

    batches: list[int] = []
    monkeypatch.setattr(batching, "CPU_MEMORY_MB", 1e-9)  # one image per forward

    results = {}
    for chunk_size in (None, 12):
        torch.manual_seed(0)
        model, cb = LitTiny(), make(chunk_size)
        sizes: list[int] = []
        model.net.register_forward_pre_hook(lambda _m, args, sizes=sizes: sizes.append(int(args[0].shape[0])))
        train, val = tiny_loaders(n=12, batch_size=2)
        tiny_trainer(str(tmp_path / str(chunk_size)), [cb], max_epochs=1).fit(model, train, val)
        batches.append(max(sizes))
        with isolated(model):
            results[chunk_size] = cb.compute(model, cb.probes)
    assert batches == [2, 12]  # default: at most the training batch (2) through the net; explicit 12 wins
    for key, value in results[None].items():
        torch.testing.assert_close(value, results[12][key], rtol=1e-5, atol=1e-6)


def test_scan_topk_and_extract_features_refuse_a_training_model_and_leave_its_statistics():
    """Both rank or embed each image on its own: a training-mode BatchNorm would mix the images of a batch and update
    its running statistics. They refuse it, naming the function, and the statistics are as they were."""
    from helpers import TinyCNN

    from lightning_viz.methods.embeddings import extract_features

    net = TinyCNN().train()
    x = torch.rand(4, 3, 8, 8)
    stats = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="scan_topk: the model is in training mode"):
        scan_topk(net, x, "conv2", [0], 2)
    with pytest.raises(ValueError, match="extract_features: the model is in training mode"):
        extract_features(net, x)
    assert all(torch.equal(v, stats[k]) for k, v in net.state_dict().items())
    top = scan_topk(net.eval(), x, "conv2", [0], 2)  # in eval mode: as before
    assert top.values.shape == (1, 2)


def test_gradient_receptive_field_stops_the_batched_passes_after_the_layer():
    """The layers after ``layer`` add nothing to d unit / d input, so the batched passes stop right after it (was: every
    pass went through the whole model, ~2x the forward work for resnet18's layer2 at 224 px); the supports equal those
    of the model cut at the layer, computed position by position with plain autograd."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2, 2, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(2, 3, 3),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 2),
    ).eval()
    head_batches: list[int] = []
    hook = model[5].register_forward_pre_hook(lambda m, inputs: head_batches.append(inputs[0].shape[0]))
    try:
        support, _ = gradient_receptive_field(model, "4", (1, 12, 12), trials=2, chunk_size=10)
    finally:
        hook.remove()
    assert head_batches == [1]  # only the first one-image pass runs whole (was [1, 10, 10, 10, 6, 1, 10, ...])
    gen = torch.Generator().manual_seed(0)
    expected = torch.zeros(6, 6, 12, 12, dtype=torch.bool)
    for _ in range(2):  # the same seeded inputs, one backward per position through the cut model
        x0 = torch.randn(1, 1, 12, 12, generator=gen)
        for i, j in itertools.product(range(6), range(6)):
            x = x0.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(model[:5](x)[0, :, i, j].sum(), x)
            expected[i, j] |= g[0].abs().sum(0) > 0
    assert torch.equal(support, expected)
    assert expected.any() and not expected.all()  # not a trivial support (all or nothing)


@pytest.mark.parametrize(
    "arch,layer,shape",
    [
        ("resnet18", "layer1", (3, 50, 37)),  # residual blocks, zero-padded convs and a padded max-pool at the border
        ("squeezenet1_1", "features.4", (3, 39, 50)),  # ceil_mode max-pools: the last row of windows is cut short
        ("mobilenet_v3_small", "features.3", (3, 72, 56)),  # depthwise convs, squeeze-excitation (whole image)
        ("googlenet", "inception3a", (3, 56, 72)),  # parallel branches of several kernel sizes
    ],
)
def test_gradient_receptive_boxes_equal_the_boxes_of_every_position(arch, layer, shape):
    """The boxes derived from the middle row and column (translation equivariance) equal those of one backward per
    position, clipped at the border included, on non-square images."""
    torch.manual_seed(0)
    kw = {"init_weights": True, "aux_logits": False} if arch == "googlenet" else {}
    net = getattr(torchvision.models, arch)(weights=None, **kw).eval()
    _, full = gradient_receptive_field(net, layer, shape)
    fast = gradient_receptive_boxes(net, layer, shape)
    assert torch.equal(fast, full)
    assert full.shape[0] * full.shape[1] >= 63  # a grid where the derivation saves positions


def _backward_images(net: nn.Module, layer: str, fn) -> tuple[object, int]:
    """``fn()``'s result and how many images went through ``layer`` with autograd on (the per-position copies)."""
    sizes: list[int] = []
    hook = get_layer(net, layer).register_forward_hook(
        lambda m, i, out: sizes.append(out.shape[0]) if out.requires_grad else None
    )
    try:
        return fn(), sum(sizes)
    finally:
        hook.remove()


def test_gradient_receptive_field_of_a_residual_net_runs_rows_and_columns_only():
    """``receptive_field`` (TopPatchesCallback's boxes) takes the middle row and column of positions and a few checks
    (was: every position, 392 backward images for resnet18's layer3 at 224 px); the boxes are those of every one."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None).eval()
    shape = (3, 48, 64)  # layer1: 12 x 16 positions
    boxes, n = _backward_images(net, "layer1", lambda: receptive_field(net, "layer1", shape, method="gradient"))
    assert n == 2 * (12 + 16 - 1 + 16)  # 2 trials x (the middle column and row, 16 corner and quarter checks)
    (_, full), n_full = _backward_images(net, "layer1", lambda: gradient_receptive_field(net, "layer1", shape))
    assert n_full == 2 * 12 * 16
    assert torch.equal(boxes, _unclip(full, 48, 64))


class _NotEquivariant(nn.Module):
    """A conv, then a coordinate-dependent step: ``pos`` adds a positional embedding, ``mask`` zeroes the top-left
    corner of the feature map, ``halves`` uses a dilated conv on the left half and a plain one on the right."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=3, dilation=3)
        self.pos = nn.Parameter(3 * torch.randn(1, 8, 16, 20))

    def forward(self, x):
        y = torch.relu(self.c1(x) + (self.pos if self.kind == "pos" else 0))
        if self.kind == "mask":
            y = y * (torch.arange(16).view(16, 1) >= 4).logical_or(torch.arange(20) >= 5)
        if self.kind == "halves":
            return torch.cat([self.c3(y)[..., :10], self.c2(y)[..., 10:]], -1)
        return self.c2(y)


@pytest.mark.parametrize("kind,derived", [("pos", True), ("mask", False), ("halves", False)])
def test_gradient_receptive_boxes_of_a_model_that_is_not_translation_equivariant(kind, derived):
    """Where the checks see that the boxes do not follow the middle row and column, every position is computed: the
    boxes equal those of one backward per position."""
    torch.manual_seed(0)
    net = nn.Sequential(_NotEquivariant(kind)).eval()
    fast, n = _backward_images(net, "0", lambda: gradient_receptive_boxes(net, "0", (3, 32, 40)))
    (_, full), n_full = _backward_images(net, "0", lambda: gradient_receptive_field(net, "0", (3, 32, 40)))
    assert torch.equal(fast, full)
    assert n == (2 * (16 + 20 - 1 + 16) if derived else n_full)  # checked, then the other positions computed
    if kind == "mask":  # the masked corner's units see nothing: empty boxes there, not the derived ones
        assert not full[:3, :4].any() and (full[4:, 5:, 2:] > full[4:, 5:, :2]).all()


class SEStack(nn.Module):
    """conv3 p1 -> squeeze-and-excitation (torchvision's module, or timm's functional mean) -> conv3 p1."""

    def __init__(self, functional: bool):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.se = torchvision.ops.SqueezeExcitation(4, 2)
        self.reduce, self.expand = nn.Conv2d(4, 2, 1), nn.Conv2d(2, 4, 1)
        self.functional = functional

    def forward(self, x):
        x = self.conv1(x)
        if self.functional:
            x = x * self.expand(self.reduce(x.mean((2, 3), keepdim=True)).relu()).sigmoid()
        else:
            x = self.se(x)
        return self.conv2(x)


@pytest.mark.parametrize("functional", [False, True])
def test_gradient_receptive_field_treats_squeeze_and_excitation_gates_as_constants(functional):
    """After an SE block (EfficientNet, MobileNetV3, SE-ResNets) every unit depends on every pixel through the gate:
    the receptive field was the whole image for every position (top patches were whole probes); the gate counts as
    a constant now, so the field is the convs' 5 x 5 (here on a 12 x 20 image)."""
    model = SEStack(functional).eval()
    boxes = receptive_field(model, "conv2", (3, 12, 20))
    assert boxes.shape == (12, 20, 4)
    assert boxes[4, 7].tolist() == [2, 5, 7, 10] and boxes[0, 0].tolist() == [-2, -2, 3, 3]
    assert boxes[11, 19].tolist() == [9, 17, 14, 22]


def test_gradient_receptive_field_larger_than_the_short_side_is_exact():
    """A 45 px field on a 40 x 64 image: no position's field lies inside the 40 px side, so the boxes cut by both
    borders were 'extended' to the largest cut size (40), off-center; the edges inside the image give the field,
    which equals the layer arithmetic (and resnet18's layer2, 99 px, on 64 x 96: [-49, 50) at position 0)."""
    torch.manual_seed(0)
    convs = [nn.Conv2d(3 if k == 0 else 4, 4, 5, stride=2 if k < 2 else 1, padding=2) for k in range(4)]
    net = nn.Sequential(*[m for c in convs for m in (c, nn.ReLU())]).eval()
    for shape in [(3, 40, 64), (3, 64, 40)]:
        arith = receptive_field(net, "6", shape, method="arithmetic")
        assert stack_receptive_field(net, "6", shape).size == (45, 45)
        assert torch.equal(receptive_field(net, "6", shape, method="gradient"), arith), shape
    with isolated(torchvision.models.resnet18(weights=None)) as m:
        boxes = receptive_field(m, "layer2", (3, 64, 96))
    assert boxes[0, 0].tolist() == [-49, -49, 50, 50] and boxes[7, 11].tolist() == [7, 39, 106, 138]


@pytest.mark.parametrize(
    "arch,layer,shape",
    [
        ("resnet18", "layer2", (3, 64, 80)),  # residual sums, a strided 1x1 shortcut
        ("resnet18", "layer3", (3, 64, 80)),  # a field larger than the image both ways: cut boxes, as the gradient's
        ("resnet50", "layer2.1", (3, 56, 72)),  # bottlenecks
        ("densenet121", "features.transition1", (3, 48, 64)),  # concatenations, an average pool
        ("efficientnet_b0", "features.3", (3, 64, 48)),  # depthwise convs, squeeze-and-excitation gates
        ("squeezenet1_1", "features.4", (3, 39, 50)),  # ceil-mode pools; the last column is seen by no unit
        ("googlenet", "inception3a", (3, 56, 72)),  # parallel branches of several kernel sizes
        ("shufflenet_v2_x0_5", "stage2", (3, 64, 64)),  # chunk and channel shuffle (view, transpose)
    ],
)
def test_receptive_field_of_a_branched_model_by_arithmetic_equals_the_gradient_boxes(arch, layer, shape):
    """``receptive_field`` (TopPatchesCallback's boxes, ``auto``) of a model with residual sums, concatenations or
    gates follows one forward op by op, no backward (was: 2 x (h + w + 15) backward images; resnet50's layer3 at
    224 px, 86 images through the net, took minutes on a CPU); the boxes equal the gradient method's."""
    torch.manual_seed(0)
    kw = {"init_weights": True, "aux_logits": False} if arch == "googlenet" else {}
    net = getattr(torchvision.models, arch)(weights=None, **kw).eval()
    boxes, n = _backward_images(net, layer, lambda: receptive_field(net, layer, shape))
    assert n == 0
    assert torch.equal(boxes, receptive_field(net, layer, shape, method="gradient"))
    assert torch.equal(graph_receptive_boxes(net, layer, shape), gradient_receptive_boxes(net, layer, shape))


class _Written(nn.Module):
    """conv, then rows 0-3 of the map written over: by item assignment, or in place through a view; or a residual
    branch through a scripted conv, whose ops the walk does not see."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.c1, self.c2 = kind, nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        if kind == "scripted":
            self.c2 = torch.jit.script(self.c2)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        if self.kind == "scripted":
            return self.c2(y) + y
        if self.kind == "setitem":
            y[:, :, :4] = 0.0
        else:
            y[:, :, :4].zero_()
        return self.c2(y)


@pytest.mark.parametrize("kind", ["pos", "mask", "halves", "setitem", "view", "scripted"])
def test_receptive_field_by_arithmetic_refuses_ops_that_move_or_cut_positions(kind):
    """A positional embedding (added: no path cut) keeps the arithmetic; a positional mask, a per-half conv and a
    write over some rows cut paths the gradient sees: refused (``auto`` then takes the gradient method); so is a
    tensor made where the walk cannot see (a scripted conv's output was taken for a constant: a smaller field)."""
    torch.manual_seed(0)
    net = nn.Sequential(_NotEquivariant(kind) if kind in ("pos", "mask", "halves") else _Written(kind)).eval()
    if kind == "pos":
        assert torch.equal(
            graph_receptive_boxes(net, "0", (3, 32, 40)), gradient_receptive_boxes(net, "0", (3, 32, 40))
        )
    else:
        with pytest.raises(NotAConvStackError, match="not conv/pool/pointwise"):
            graph_receptive_boxes(net, "0", (3, 32, 40))


def test_stack_receptive_field_of_a_model_with_a_scripted_leaf_refuses_and_leaves_no_hooks():
    """A scripted module takes no forward hooks: the arithmetic of a plain stack says it cannot follow the model
    (NotAConvStackError, which ``auto`` answers with another method) and no hook stays on the modules before it
    (was: RuntimeError 'not supported on ScriptModules', with the first conv's hooks left on the model)."""
    import warnings

    from lightning_viz.methods.receptive_field import NotAConvStackError, stack_receptive_field

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        scripted = torch.jit.script(torch.nn.ReLU())
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), scripted, torch.nn.Conv2d(4, 4, 3))
    with pytest.raises(NotAConvStackError, match="takes no forward hooks"):
        stack_receptive_field(model, "2", (3, 16, 16))
    assert [(len(model[i]._forward_hooks), len(model[i]._forward_pre_hooks)) for i in (0, 2)] == [(0, 0), (0, 0)]
