"""Parity of the adversarial attacks and receptive fields with torchattacks, ART, foolbox, torchscan and
receptivefield (numbers: benchmarks/README.md, "Parity with torchattacks, ART, foolbox, torchscan and receptivefield").

None of these peers is a dependency; install them apart from the environment (``--no-deps`` keeps torch and numpy
as they are; foolbox also imports eagerpy; torchscan 0.2 reports per-layer values only, 0.1.2 the cumulative ones)::

    pip install --no-deps --target /tmp/peers3 torchattacks adversarial-robustness-toolbox foolbox eagerpy \
        receptivefield
    pip install --no-deps --target /tmp/peers3_ts01 torchscan==0.1.2
    OMP_NUM_THREADS=1 PYTHONPATH=.:/tmp/peers3:/tmp/peers3_ts01 python benchmarks/parity_attacks_rf.py

A missing peer is reported and its section skipped. Attacks: largest absolute difference of the adversarial images
(model input units) and how many of them are bit-identical; receptive fields: size, jump (stride) and offset per
layer, ours against the peer's.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import warnings
from collections import OrderedDict

import numpy as np
import torch
import torchvision
from torch import nn

from lightning_viz.methods.adversarial import fgsm, minimal_flip_budget, pgd, predict
from lightning_viz.methods.receptive_field import NotAConvStackError, gradient_receptive_field, stack_receptive_field
from lightning_viz.methods.synthesis import valid_range

EPS, ALPHA, STEPS = 1 / 32, 1 / 128, 10  # powers of two: the peers' float arithmetic and ours agree bit for bit
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def have(module: str) -> bool:
    if importlib.util.find_spec(module) is None:
        print(f"-- {module} not installed: skipped")
        return False
    return True


class Normalized(nn.Module):
    """``net((p - mean) / std)``: a model that takes pixels in ``[0, 1]`` (the peers' convention)."""

    def __init__(self, net: nn.Module, mean, std) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, p):
        return self.net((p - self.mean) / self.std)


def net(name: str = "resnet18", n: int = 32) -> nn.Module:
    """``weights=None``, 10 classes, BatchNorm statistics of ``n`` random images (activations O(1)), eval."""
    torch.manual_seed(0)
    m = getattr(torchvision.models, name)(weights=None, num_classes=10).train()
    with torch.no_grad():
        m(torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    return m.eval()


def pixels(n: int = 4, size: int = 32, seed: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def unit_bounds() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)


def show(what: str, ours: torch.Tensor, peer) -> None:
    peer = torch.as_tensor(np.asarray(peer)) if not isinstance(peer, torch.Tensor) else peer
    a = ours.detach().double()
    b = peer.detach().double().view_as(a)
    same = int((a.flatten(1) == b.flatten(1)).all(1).sum())
    frac = float((a != b).double().mean())
    print(f"{what:78s} max diff {float((a - b).abs().max()):.1e}  bit-identical {same}/{len(a)}  differ {frac:.1e}")


def torchattacks_section() -> None:
    import torchattacks

    model, x = net(), pixels()
    y = predict(model, x)
    tgt = (y + 1) % 10
    b = unit_bounds()
    show(
        "torchattacks FGSM vs fgsm, [0,1] inputs", fgsm(model, x, y, EPS, bounds=b), torchattacks.FGSM(model, EPS)(x, y)
    )
    atk = torchattacks.FGSM(model, EPS)
    atk.set_mode_targeted_by_label(quiet=True)
    show("torchattacks FGSM targeted vs fgsm(targeted=True)", fgsm(model, x, tgt, EPS, True, b), atk(x, tgt))
    ta = torchattacks.PGD(model, EPS, ALPHA, STEPS, random_start=False)(x, y)
    ours = pgd(model, x, y, EPS, STEPS, ALPHA, random_start=False, bounds=b)
    show("torchattacks PGD (no random start) vs pgd", ours, ta)
    show(
        "  ... ours at its default step 2.5 eps / steps", pgd(model, x, y, EPS, STEPS, random_start=False, bounds=b), ta
    )
    atk = torchattacks.PGD(model, EPS, ALPHA, STEPS, random_start=False)
    atk.set_mode_targeted_by_label(quiet=True)
    show(
        "torchattacks PGD targeted vs pgd(targeted=True)",
        pgd(model, x, tgt, EPS, STEPS, ALPHA, targeted=True, random_start=False, bounds=b),
        atk(x, tgt),
    )
    for eps, alpha, label in ((EPS, ALPHA, "1/32, 1/128"), (8 / 255, 2 / 255, "8/255, 2/255")):
        torch.manual_seed(7)
        ta = torchattacks.PGD(model, eps, alpha, STEPS, random_start=True)(x, y)
        torch.manual_seed(7)
        noise = torch.empty_like(x).uniform_(-eps, eps)  # its draw, replayed as our ``start`` (in units of eps)
        ours = pgd(model, x, y, eps, STEPS, alpha, start=noise / eps, bounds=b)
        show(f"torchattacks PGD random start vs pgd(start=its noise / eps), eps, alpha {label}", ours, ta)
    for lo, hi in ((0.0, 1.0), (0.05, 0.95)):  # clamped at 0 / 1: the projection's rounding (theirs x + clamp(x' - x))
        xi = x * (hi - lo) + lo
        ta = torchattacks.PGD(model, 8 / 255, 2 / 255, STEPS, random_start=False)(xi, y)
        ours = pgd(model, xi, y, 8 / 255, STEPS, 2 / 255, random_start=False, bounds=b)
        show(f"  eps 8/255, alpha 2/255, no random start, inputs in [{lo}, {hi}]", ours, ta)

    # Normalized inputs: torchattacks takes normalized images, de-normalizes, attacks pixels, normalizes again.
    for label, (mean, std) in (("mean = std = 0.5", HALF), ("ImageNet mean/std", IMAGENET)):
        m_, s_ = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        xn = (x - m_) / s_
        yn = predict(model, xn)
        nb = valid_range(mean, std)
        folded = Normalized(model, mean, std)
        p = xn * s_ + m_  # the pixels torchattacks attacks (its inverse_normalize)
        for name, peer in (
            ("FGSM", torchattacks.FGSM(model, EPS)),
            ("PGD", torchattacks.PGD(model, EPS, ALPHA, STEPS, random_start=False)),
        ):
            peer.set_normalization_used(mean, std)
            theirs = peer(xn, yn)

            def ours_at(e, model=model, x=xn, bounds=nb, name=name, yn=yn):
                if name == "FGSM":
                    return fgsm(model, x, yn, e, bounds=bounds)
                return pgd(model, x, yn, e, STEPS, e * ALPHA / EPS, random_start=False, bounds=bounds)

            if std[0] == std[1] == std[2]:
                show(
                    f"torchattacks {name}, {label}, eps {EPS:g} (pixels), vs ours at eps / std",
                    ours_at(EPS / std[0]),
                    theirs,
                )
            else:
                d = (theirs - xn).abs().amax(dim=(0, 2, 3))
                print(
                    f"  torchattacks {name}, {label}: L-inf per channel in model input units",
                    [round(float(v), 5) for v in d],
                )
                for e_label, e in (("eps / max(std)", EPS / max(std)), ("eps / min(std)", EPS / min(std))):
                    show(
                        f"torchattacks {name}, {label}, eps {EPS:g} (pixels), vs ours at {e_label}", ours_at(e), theirs
                    )
                adv = ours_at(EPS, model=folded, x=p, bounds=b)
                show("  ... vs ours on the model with the normalization folded in, pixel eps", (adv - m_) / s_, theirs)
            if name == "FGSM":
                ours_px = fgsm(model, xn, yn, EPS, bounds=nb, std=std)
            else:
                ours_px = pgd(model, xn, yn, EPS, STEPS, ALPHA, random_start=False, bounds=nb, std=std)
            show(f"  ... vs ours with std= (pixel units: AdversarialCallback's default), {label}", ours_px, theirs)


def art_section() -> None:
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    model, x = net(), pixels()
    y = predict(model, x)
    tgt = (y + 1) % 10
    b = unit_bounds()

    def clf(preprocessing=None):
        return PyTorchClassifier(
            model, nn.CrossEntropyLoss(), (3, 32, 32), 10, clip_values=(0.0, 1.0), preprocessing=preprocessing
        )

    xs, ys = x.numpy(), y.numpy()
    show(
        "ART FastGradientMethod vs fgsm",
        fgsm(model, x, y, EPS, bounds=b),
        FastGradientMethod(clf(), eps=EPS).generate(xs, ys),
    )
    show(
        "ART FastGradientMethod targeted vs fgsm(targeted=True)",
        fgsm(model, x, tgt, EPS, True, b),
        FastGradientMethod(clf(), eps=EPS, targeted=True).generate(xs, tgt.numpy()),
    )
    kw = dict(norm=np.inf, eps=EPS, eps_step=ALPHA, max_iter=STEPS, verbose=False)
    show(
        "ART ProjectedGradientDescent (num_random_init=0) vs pgd",
        pgd(model, x, y, EPS, STEPS, ALPHA, random_start=False, bounds=b),
        ProjectedGradientDescent(clf(), **kw).generate(xs, ys),
    )
    np.random.seed(5)
    theirs = ProjectedGradientDescent(clf(), num_random_init=1, **kw).generate(xs, ys)
    np.random.seed(5)
    noise = torch.from_numpy(np.random.uniform(-EPS, EPS, (4, 3 * 32 * 32)).reshape(x.shape).astype(np.float32))
    show(
        "ART PGD num_random_init=1 vs pgd(start=its noise / eps)",
        pgd(model, x, y, EPS, STEPS, ALPHA, start=noise / EPS, bounds=b),
        theirs,
    )
    mean, std = IMAGENET
    pre = (np.array(mean, dtype=np.float32).reshape(3, 1, 1), np.array(std, dtype=np.float32).reshape(3, 1, 1))
    folded = Normalized(model, mean, std)
    yf = predict(folded, x)
    theirs = FastGradientMethod(clf(pre), eps=EPS).generate(xs, yf.numpy())  # pixels in and out, eps in pixels
    show(
        "ART FGM with preprocessing=ImageNet (pixel eps) vs fgsm on the folded model",
        fgsm(folded, x, yf, EPS, bounds=b),
        theirs,
    )

    # Smallest flipping budget: ART's FGM(minimal=True) scans eps_step, 2 eps_step, ... up to eps.
    for name, n_img, max_eps in (
        ("resnet18", 64, 0.05),
        ("vgg11", 32, 0.05),
        ("resnet18", 64, 0.5),
        ("vgg11", 32, 0.5),
    ):
        m = net(name)
        xm = pixels(n_img, 32, seed=11)
        ym = predict(m, xm)
        it = 6
        step = max_eps / 2**it
        ours = minimal_flip_budget(m, xm, ym, max_eps, iterations=it, bounds=b)
        # Per-image linear scan over the same grid k * step (what ART does), ours computed on our fgsm:
        grid = torch.full((n_img,), float("inf"))
        for k in range(2**it, 0, -1):
            flipped = predict(m, fgsm(m, xm, ym, k * step, bounds=b)) != ym
            grid = torch.where(flipped, torch.tensor(k * step), grid)
        adv = FastGradientMethod(
            PyTorchClassifier(m, nn.CrossEntropyLoss(), (3, 32, 32), 10, clip_values=(0.0, 1.0)),
            eps=max_eps,
            eps_step=step,
            minimal=True,
        ).generate(xm.numpy(), ym.numpy())
        adv = torch.from_numpy(adv)
        art_flip = predict(m, adv) != ym
        art_eps = torch.where(art_flip, (adv - xm).abs().amax(dim=(1, 2, 3)), torch.tensor(float("inf")))
        agree = int(torch.isclose(art_eps, grid, rtol=1e-4, atol=1e-6).sum() + (art_eps.isinf() & grid.isinf()).sum())
        same = int((torch.isclose(ours, grid, rtol=1e-5) | (ours.isinf() & grid.isinf())).sum())
        above = ours > grid * (1 + 1e-5)
        print(
            f"min flip budget, {name}, {n_img} images, max {max_eps}, {it} halvings: ART minimal = linear scan "
            f"{agree}/{n_img}; our minimal_flip_budget = scan {same}/{n_img}, above it {int(above.sum())} "
            f"(by {[round(float(v), 4) for v in (ours - grid)[above]]})"
        )


def foolbox_section() -> None:
    import foolbox as fb

    model, x = net(), pixels()
    y = predict(model, x)
    b = unit_bounds()
    fm = fb.PyTorchModel(model, bounds=(0, 1))
    _, adv, _ = fb.attacks.FGSM()(fm, x, y, epsilons=EPS)
    show("foolbox FGSM vs fgsm", fgsm(model, x, y, EPS, bounds=b), adv)
    _, adv, _ = fb.attacks.LinfPGD(abs_stepsize=ALPHA, steps=STEPS, random_start=False)(fm, x, y, epsilons=EPS)
    show(
        "foolbox LinfPGD (random_start=False) vs pgd",
        pgd(model, x, y, EPS, STEPS, ALPHA, random_start=False, bounds=b),
        adv,
    )
    tgt = (y + 1) % 10
    crit = fb.criteria.TargetedMisclassification(tgt)
    _, adv, _ = fb.attacks.LinfPGD(abs_stepsize=ALPHA, steps=STEPS, random_start=False)(fm, x, crit, epsilons=EPS)
    show(
        "foolbox LinfPGD targeted vs pgd(targeted=True)",
        pgd(model, x, tgt, EPS, STEPS, ALPHA, targeted=True, random_start=False, bounds=b),
        adv,
    )
    mean, std = IMAGENET
    fmn = fb.PyTorchModel(model, bounds=(0, 1), preprocessing=dict(mean=list(mean), std=list(std), axis=-3))
    folded = Normalized(model, mean, std)
    yf = predict(folded, x)
    _, adv, _ = fb.attacks.FGSM()(fmn, x, yf, epsilons=EPS)
    show(
        "foolbox FGSM with preprocessing=ImageNet (pixel eps) vs fgsm on the folded model",
        fgsm(folded, x, yf, EPS, bounds=b),
        adv,
    )


# ----------------------------------------------------------------------------------------------- receptive fields

RF_LAYERS = {  # layer -> input size for the gradient method (the receptive field fits inside at the centre)
    "vgg11": {"features.0": 32, "features.2": 32, "features.5": 32, "features.10": 64, "features.15": 128},
    "alexnet": {"features.0": 64, "features.2": 64, "features.5": 128, "features.7": 160, "features.12": 320},
    "resnet18": {"maxpool": 32, "layer1": 64, "layer2": 128, "layer3": 256},
    "mobilenet_v3_small": {"features.0": 32, "features.1": 32, "features.3": 64},
    "googlenet": {"maxpool2": 64, "inception3a": 96},  # same-size parallel branches
    "squeezenet1_0": {"features.2": 64, "features.3": 64},
}
NO_RECEPTIVEFIELD = ("googlenet",)  # its functional F.relu is not linearized: at a zero input the gradient vanishes


def tv(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval()


def upto(model: nn.Module, name: str, layer: str) -> tuple[nn.Module, str]:
    """The model cut after ``layer`` (same modules; the receptive field is the same, the backward cheaper)."""
    if name in ("resnet18", "googlenet"):
        keep = [k for k, _ in model.named_children() if not k.startswith("aux")]
        keep = keep[: keep.index(layer) + 1]
        return nn.Sequential(OrderedDict((k, getattr(model, k)) for k in keep)), layer
    head, i = layer.split(".")
    return nn.Sequential(getattr(model, head)[: int(i) + 1]), layer.replace(head, "0", 1)


_OURS: dict[tuple[str, str, int], tuple] = {}


def ours_rf(model: nn.Module, name: str, layer: str, size: int):
    """``(R, J, P)`` by layer arithmetic (``None`` where refused: a branch), and from the gradient's support at the
    centre unit and its neighbour below (``"image"`` where every unit sees the whole image: global pooling)."""
    if (name, layer, size) in _OURS:
        return _OURS[name, layer, size]
    try:
        rf = stack_receptive_field(model, layer, (3, 224, 224))
        arith = (rf.size[0], rf.jump[0], rf.offset[0])
    except NotAConvStackError:
        arith = None
    cut, cut_layer = upto(model, name, layer)
    support, boxes = gradient_receptive_field(cut, cut_layer, (3, size, size), trials=2)
    if bool(support.all()):
        _OURS[name, layer, size] = arith, "image"
    else:
        h = boxes.shape[0]
        i = h // 2 - 1 if h % 2 == 0 else h // 2  # receptivefield's centre
        (y0, _, y1, _), (z0, _, _, _) = boxes[i, i].tolist(), boxes[i + 1, i].tolist()
        _OURS[name, layer, size] = arith, (y1 - y0, z0 - y0, i * (z0 - y0) - y0)
    return _OURS[name, layer, size]


def torchscan_section() -> None:
    from torchscan.crawler import crawl_module

    if "rf" not in crawl_module(nn.Conv2d(3, 1, 3), (3, 8, 8))["layers"][0]:
        print("-- torchscan without cumulative receptive fields (0.2 reports per layer only): install 0.1.2; skipped")
        return
    for name, layers in RF_LAYERS.items():
        model = tv(name)
        order: list[str] = []
        last: dict[str, int] = {}
        names = dict(model.named_modules())
        # torchscan 0.1.2 makes a row at a module's first call only (a reused ReLU: one row)
        handles = [
            m.register_forward_pre_hook(lambda m, i, n=n, order=order: None if n in order else order.append(n))
            for n, m in names.items()
        ]
        for layer in layers:  # the row of the last module run inside ``layer``: its cumulative values are the layer's
            handles.append(
                names[layer].register_forward_hook(
                    lambda m, i, o, n=layer, last=last, order=order: last.__setitem__(n, len(order) - 1)
                )
            )
        with torch.no_grad():
            model(torch.zeros(1, 3, 224, 224))
        for h in handles:
            h.remove()
        info = crawl_module(model, (3, 224, 224))["layers"]
        assert len(info) == len(order), (len(info), len(order))
        for layer, size in layers.items():
            row = info[last[layer]]
            theirs = (int(row["rf"]), int(row["s"]), int(row["p"]))
            arith, grad = ours_rf(model, name, layer, size)
            print(
                f"torchscan {name:18s} {layer:11s} (R, J, P) theirs {theirs}  ours: arithmetic {arith}, gradient {grad}"
            )


def receptivefield_section() -> None:
    from receptivefield.pytorch import PytorchReceptiveField

    class Wrap(nn.Module):
        def __init__(self, body: nn.Module, layer: str) -> None:
            super().__init__()
            self.body, self.layer = body, layer
            self.feature_maps: list[torch.Tensor] = []

        def forward(self, x):
            from lightning_viz.capture import capture

            with capture(self.body, [self.layer], grad=True) as cap:
                self.body(x)
                self.feature_maps = [cap[self.layer]]
            return self.feature_maps[0]

    for name, layers in RF_LAYERS.items():
        if name in NO_RECEPTIVEFIELD:
            continue
        base = tv(name)
        for layer, size in layers.items():
            cut, cut_layer = upto(base, name, layer)
            lin = linearized(cut)
            try:
                desc = (
                    PytorchReceptiveField(lambda lin=lin, cut_layer=cut_layer: Wrap(lin, cut_layer))
                    .compute((size, size, 3))[0]
                    .rf
                )
                theirs = (int(desc.size.h), float(desc.stride[1]), float(desc.offset[1]))
            except Exception as exc:  # its estimate may fail where the field fills the image
                theirs = f"failed: {type(exc).__name__}"
            arith, grad = ours_rf(base, name, layer, size)
            mine = None if arith is None else (arith[0], arith[1], arith[0] / 2 - arith[2])
            g = grad if isinstance(grad, str) else (grad[0], grad[1], grad[0] / 2 - grad[2])
            print(
                f"receptivefield {name:18s} {layer:11s} (size, stride, centre of unit 0) theirs {theirs}; "
                f"ours arithmetic {mine}, gradient {g}"
            )


def linearized(model: nn.Module) -> nn.Module:
    """receptivefield's recipe: activations -> identity, max pooling -> average pooling, all weights 1, biases 0
    (its gradient is then positive on the whole receptive field at a zero input)."""
    m = copy.deepcopy(model)
    for parent in m.modules():
        for n, child in parent.named_children():
            if isinstance(child, (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Dropout)):
                setattr(parent, n, nn.Identity())
            elif isinstance(child, nn.MaxPool2d):
                setattr(parent, n, nn.AvgPool2d(child.kernel_size, child.stride, child.padding, child.ceil_mode))
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(1.0 if p.ndim > 1 else 0.0)
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.fill_(1.0)
                mod.running_mean.zero_()
                mod.running_var.fill_(1.0)
    return m.eval()


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    logging.disable(logging.INFO)  # receptivefield logs every estimate
    torch.set_num_threads(1)
    for module, section in (
        ("torchattacks", torchattacks_section),
        ("art", art_section),
        ("foolbox", foolbox_section),
        ("torchscan", torchscan_section),
        ("receptivefield", receptivefield_section),
    ):
        if have(module):
            section()
