"""One forward + one backward per chunk shared by gradient and CAM callbacks; cache validity; training untouched."""

import lightning as L
import pytest
import torch
from helpers import LitTiny, TinyCNN, check_untouched, read_events, tiny_loaders, tiny_trainer

from lightning_viz.callbacks.cam import CAMCallback
from lightning_viz.callbacks.gradients import GradientCallback
from lightning_viz.capture import isolated
from lightning_viz.methods import cam as C
from lightning_viz.methods import gradients as G
from lightning_viz.methods.shared_pass import INPUT, PassCache, gradient_pass, pass_cache
from lightning_viz.probe import ProbeSet


class PassCounter:
    """Counts forward calls of a module (a forward hook) and ``torch.autograd.grad`` calls while ``active``."""

    def __init__(self, module, monkeypatch):
        self.forwards = self.backwards = 0
        self.active = False
        module.register_forward_hook(self._hook)
        real_grad = torch.autograd.grad

        depth = [0]

        def counting_grad(*args, **kwargs):
            # a torch function mode (the ReLU rules) routes autograd.grad through this name once more: count once
            if self.active and depth[0] == 0:
                self.backwards += 1
            depth[0] += 1
            try:
                return real_grad(*args, **kwargs)
            finally:
                depth[0] -= 1

        monkeypatch.setattr(torch.autograd, "grad", counting_grad)

    def _hook(self, *_):
        if self.active:
            self.forwards += 1


class Window(L.Callback):
    """Switches the counter on (``start=True``) or off at train epoch end; placed around the viz callbacks."""

    def __init__(self, counter, start, log):
        self.counter, self.start, self.records = counter, start, log

    def on_train_epoch_end(self, trainer, pl_module):
        if self.start:
            self.counter.forwards = self.counter.backwards = 0
        else:
            self.records.append((self.counter.forwards, self.counter.backwards))
        self.counter.active = self.start


@pytest.mark.parametrize("share", [True, False])
def test_two_callbacks_one_forward_and_backward_per_chunk(tmp_path, monkeypatch, share):
    model = LitTiny(TinyCNN(width=3))
    counter = PassCounter(model.net, monkeypatch)
    log = []
    sal = GradientCallback(methods=["saliency", "input_x_gradient"], num_probes=4, chunk_size=2, share_pass=share)
    cam = CAMCallback(
        methods=["gradcam", "gradcampp"],
        layers=["net.conv1", "net.conv2"],
        num_probes=4,
        chunk_size=2,
        share_pass=share,
    )
    tl, vl = tiny_loaders(n=12)
    trainer = tiny_trainer(
        str(tmp_path), [Window(counter, True, log), sal, cam, Window(counter, False, log)], max_epochs=2
    )
    trainer.fit(model, tl, vl)
    chunks = 2  # 4 probes, chunk_size 2
    expected = chunks if share else 2 * chunks
    assert log == [(expected, expected), (expected, expected)]
    acc = read_events(str(tmp_path))
    assert {"viz-gradients/panel/p003", "viz-cam/panel/p003"} <= set(acc.Tags()["images"])
    assert {
        "viz-gradients/saliency/input/stats/std",
        "viz-cam/gradcampp/net.conv1/stats/std",
        "viz-cam/gradcam/net.conv2/stats/std",
    } <= set(acc.Tags()["scalars"])


def test_union_of_registered_layers_and_rules(monkeypatch):
    lit = LitTiny(TinyCNN(width=3))
    counter = PassCounter(lit.net, monkeypatch)
    probe = ProbeSet(
        torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(0)), labels=torch.tensor([0, 1, 2, 0, 1])
    )
    grads = GradientCallback(methods=["saliency", "guided_backprop", "deconvnet"], chunk_size=3)
    cam1 = CAMCallback(methods=["gradcam", "guided_gradcam"], layers=["net.conv1"], chunk_size=3)
    cam2 = CAMCallback(methods=["layercam"], layers=["net.conv2"], chunk_size=3)
    for cb in (grads, cam1, cam2):
        cb.check(lit)  # registers needs: conv1 + conv2 under the plain rule, plus guided and deconv passes
    counter.active = True

    def run():
        with isolated(lit):
            return grads.compute_maps(lit, probe), cam1.compute_maps(lit, probe), cam2.compute_maps(lit, probe)

    m_grads, m_cam1, m_cam2 = check_untouched(lit, run)
    assert counter.forwards == 3 * 2  # plain, guided, deconv passes x 2 chunks -- cam2's conv2 came with cam1's pass
    assert counter.backwards == 3 * 2
    x, labels = probe.images, probe.labels
    with isolated(lit):
        torch.testing.assert_close(m_grads["saliency/input"], G.saliency(lit, x, "label", labels))
        torch.testing.assert_close(m_grads["deconvnet/input"], G.deconvnet(lit, x, "label", labels).abs().amax(1))
        torch.testing.assert_close(
            m_cam1["gradcam/net.conv1"], C.class_activation_map(lit, x, "net.conv1", "gradcam", "label", labels)
        )
        torch.testing.assert_close(
            m_cam2["layercam/net.conv2"], C.class_activation_map(lit, x, "net.conv2", "layercam", "label", labels)
        )
        torch.testing.assert_close(
            m_cam1["guided_gradcam/net.conv1"],
            C.guided_class_activation_map(lit, x, "net.conv1", "guided_gradcam", "label", labels).abs().amax(1),
        )

    # a parameter update (version bump) invalidates the cache: the next call recomputes and sees the new weights
    counter.forwards = 0
    with isolated(lit):
        cam2.compute_maps(lit, probe)
    assert counter.forwards == 0  # still cached
    with torch.no_grad():
        lit.net.conv2.weight.mul_(-1.0)
    with isolated(lit):
        again = cam2.compute_maps(lit, probe)
    assert counter.forwards == 2
    assert not torch.allclose(again["layercam/net.conv2"], m_cam2["layercam/net.conv2"])
    # another probe set or another target is another entry
    with isolated(lit):
        cache = pass_cache(lit)
        n = len(cache.entries)
        cache.get(lit, x, "other-probes", "predicted", labels, ["net.conv2"])
    assert len(cache.entries) == n + 1


def test_gradient_pass_under_inference_mode_and_chunking():
    model = TinyCNN(width=3)
    x, labels = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    with torch.inference_mode():
        with isolated(model):
            full = gradient_pass(model, x, "label", labels, ["conv1", "conv2"])
            part = gradient_pass(model, x, "label", labels, ["conv1", "conv2"], chunk_size=2)
    for a, b in (
        [(full.input_grad, part.input_grad), (full.logits, part.logits)]
        + [(full.grads[n], part.grads[n]) for n in ("conv1", "conv2")]
        + [(full.activations[n], part.activations[n]) for n in ("conv1", "conv2")]
    ):
        torch.testing.assert_close(a, b)
    assert full.input_grad.abs().sum() > 0 and torch.equal(full.classes, labels)
    with pytest.raises(KeyError, match="'conv9' was not recorded"):
        full.layer("conv9")


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_methods_called_under_a_callers_no_grad_or_inference_mode_give_the_same_maps(context):
    """Called outside isolated, under the caller's torch.no_grad() / inference_mode(), with inference-mode images and
    labels: the same gradients and CAMs as with autograd on (was: all-zero saliency, errors for CAMs and IG)."""
    model = TinyCNN(width=3).eval()
    x, labels = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2])

    def maps(x, labels):
        return (
            G.saliency(model, x, "label", labels),
            G.integrated_gradients(model, x, "label", labels, steps=2),
            C.class_activation_map(model, x, "conv2", "gradcam", "label", labels),
        )

    expected = maps(x, labels)
    assert expected[0].abs().sum() > 0
    ctx = torch.no_grad if context == "no_grad" else torch.inference_mode
    with ctx():
        got = maps(x.clone(), labels.clone())
        assert not torch.is_grad_enabled()
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_training_untouched_by_callbacks(tmp_path):
    """Same seed, same data: training with every gradient/CAM callback ends in exactly the same weights."""

    def train(callbacks, sub):
        torch.manual_seed(0)
        model = LitTiny(TinyCNN(width=3))
        tl, vl = tiny_loaders(n=16)
        tiny_trainer(str(tmp_path / sub), callbacks, max_epochs=2).fit(model, tl, vl)
        return model

    plain = train([], "plain")
    viz = train(
        [
            GradientCallback(
                methods=["smoothgrad_saliency", "guided_backprop", "integrated_gradients"],
                num_probes=2,
                smoothgrad_samples=2,
                ig_steps=2,
            ),
            CAMCallback(methods=["cam", "gradcampp", "guided_gradcampp"], num_probes=2),
        ],
        "viz",
    )
    for (n, p), (_, q) in zip(plain.state_dict().items(), viz.state_dict().items()):
        assert torch.equal(p, q), n


def test_cache_never_serves_one_models_pass_to_another():
    """Two models with equal version counters (same architecture, same number of in-place updates) -- e.g.
    the tracker's randomized copy next to an untrained model under trainer.validate -- are different states."""
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    a = TinyCNN(width=3).eval()
    torch.manual_seed(1)
    b = TinyCNN(width=3).eval()
    cache = pass_cache(a)  # one cache asked about both models, as a share_pass=False callback's own cache is
    with isolated(a):
        ra = cache.get(a, x, "probes", 0, None, [INPUT, "conv2"])
    with isolated(b):
        rb = cache.get(b, x, "probes", 0, None, [INPUT, "conv2"])
        ref = gradient_pass(b, x, 0, None, ["conv2"])
    assert rb is not ra
    torch.testing.assert_close(rb.input_grad, ref.input_grad)
    torch.testing.assert_close(rb.activations["conv2"], ref.activations["conv2"])


def test_cache_sees_weights_written_through_data():
    """Weights swapped through ``p.data`` (as Lightning's WeightAveraging does around its validation) bump no
    version counter: the cache must compute a new pass, not serve the one of the weights before the swap."""
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = TinyCNN(width=3).eval()
    cache = PassCache()
    with isolated(model):
        before = cache.get(model, x, "probes", 0, None, [INPUT])
        for p in model.parameters():
            p.data.mul_(0.5)
        after = cache.get(model, x, "probes", 0, None, [INPUT])
        ref = gradient_pass(model, x, 0, None, [])
    assert after is not before
    torch.testing.assert_close(after.input_grad, ref.input_grad)


class DataSGD(torch.optim.Optimizer):
    """Plain SGD written the old way, through ``p.data`` -- which bumps no autograd version counter."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data.add_(p.grad, alpha=-group["lr"])


class LitDataSGD(LitTiny):
    def configure_optimizers(self):
        return DataSGD(self.parameters(), lr=0.5)


class RecordingSaliency(GradientCallback):
    """Records, per run, the logged saliency and a fresh one computed on the model as it is."""

    def __init__(self, **kw):
        super().__init__(methods=["saliency"], **kw)
        self.records = []

    def compute_maps(self, pl_module, probe):
        maps = super().compute_maps(pl_module, probe)
        fresh = G.saliency(pl_module, probe.to(pl_module.device), self.target, probe.labels)
        self.records.append((maps["saliency/input"], fresh))
        return maps


# 3 batches per epoch; val_check_interval=2 validates after batch 2 only: the runs happen mid-epoch, once per epoch
@pytest.mark.parametrize(
    "run_on,runs,kw", [("train_epoch_end", 3, {}), ("validation_epoch_end", 3, {"val_check_interval": 2})]
)
def test_no_stale_pass_after_a_data_writing_optimizer_and_nothing_kept_after_fit(tmp_path, run_on, runs, kw):
    """A model without BatchNorm trained by an optimizer that writes ``p.data`` (no version bump): every run's
    maps are those of the model at that point, and no cached pass outlives the run (nor the training epochs)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    )
    model = LitDataSGD(net)
    cb = RecordingSaliency(num_probes=3, run_on=run_on)
    tl, vl = tiny_loaders(n=24)
    adapter = cb.adapted(model)  # held here: the one the callback uses in the fit (it lets go of it at the end)
    tiny_trainer(str(tmp_path), [cb], max_epochs=3, **kw).fit(model, tl, vl)
    assert len(cb.records) == runs
    assert not torch.allclose(cb.records[0][1], cb.records[2][1], rtol=1e-3, atol=0)  # the model did change
    for logged, fresh in cb.records:
        torch.testing.assert_close(logged, fresh)
    assert pass_cache(model).entries == {} and pass_cache(adapter).entries == {}  # the cache the callback used


def test_a_used_cache_pickles_without_its_entries():
    """ddp_spawn pickles callbacks (and a share_pass=False callback's own cache): the needs travel, passes do not."""
    import pickle

    from lightning_viz.methods.shared_pass import PassCache

    model = TinyCNN(width=3).eval()
    cache = PassCache()
    cache.register(0, None, ["conv2"])
    with isolated(model):
        cache.get(model, torch.randn(2, 3, 8, 8), "probes", 0)
    assert len(cache.entries) == 1
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.entries == {} and copy.version is None and copy.needs == cache.needs


def test_short_lived_callable_targets_never_share_a_pass():
    """A fresh callable per call (freed right after) may get the address of the previous one: its key must not
    collide."""
    from lightning_viz.methods.shared_pass import PassCache

    model = TinyCNN(width=3).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cache = PassCache()
    with isolated(model):
        scores = [cache.get(model, x, "probes", lambda z, c=c: z[:, c]).scores for c in range(3)]
        logits = model(x)
    for c in range(3):
        torch.testing.assert_close(scores[c], logits[:, c])


def test_layer_only_pass_leaves_the_input_out_of_the_graph():
    """A CAM-only pass never differentiates w.r.t. the input: autograd is asked only for the layer outputs, the
    input never requires grad, and the layer gradients equal those of a pass that also takes dS/dx."""
    torch.manual_seed(0)
    model = TinyCNN(width=3).eval()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []
    handle = model.conv1.register_forward_pre_hook(lambda _m, args: seen.append((len(args[0]), args[0].requires_grad)))
    try:
        with isolated(model):
            lean = gradient_pass(model, x, 0, None, ["conv2"], input_grad=False)
            full = gradient_pass(model, x, 0, None, ["conv2"])
    finally:
        handle.remove()
    # the two passes (one chunk each), after the one-image no-grad forward that measures the memory budget
    assert seen == [(1, False), (3, False), (3, True)]
    assert lean.input_grad is None and full.input_grad.abs().sum() > 0
    torch.testing.assert_close(lean.grads["conv2"], full.grads["conv2"], rtol=0, atol=0)
    torch.testing.assert_close(
        cam_ref := C.cam_from_pass(lean, "conv2", "gradcam", (8, 8)),
        C.cam_from_pass(full, "conv2", "gradcam", (8, 8)),
        rtol=0,
        atol=0,
    )
    assert cam_ref.abs().sum() > 0
    with pytest.raises(ValueError, match="needs at least one layer"):
        gradient_pass(model, x, 0, None, [], input_grad=False)


def test_cache_takes_the_input_gradient_only_when_a_consumer_asks():
    torch.manual_seed(0)
    model = TinyCNN(width=3).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with isolated(model):
        ref = gradient_pass(model, x, 0, None, ["conv2"])
        cams_only = PassCache()
        cams_only.register(0, None, ["conv2"])
        assert cams_only.get(model, x, "p", 0, None, ["conv2"]).input_grad is None
        # an unregistered consumer asking for dS/dx later gets a (recomputed) pass that has it
        late = cams_only.get(model, x, "p", 0, None, [INPUT])
        torch.testing.assert_close(late.input_grad, ref.input_grad)
        assert "conv2" in late.activations and cams_only.forwards == 2
        both = PassCache()
        both.register(0, None, ["conv2"])
        both.register(0, None, [INPUT])
        first = both.get(model, x, "p", 0, None, ["conv2"])
        torch.testing.assert_close(first.input_grad, ref.input_grad)
        assert both.get(model, x, "p", 0, None, []) is first and both.forwards == 1
