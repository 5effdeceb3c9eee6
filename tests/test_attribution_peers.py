"""labkit.attribution against peer libraries used as oracles: captum (Saliency, InputXGradient,
NoiseTunnel, IntegratedGradients, Occlusion, GuidedBackprop, LayerGradCam, GuidedGradCam) and
pytorch-grad-cam (GradCAM), on the shipped fmnist-cnn and fmnist-cnn-robust (a seeded random
FashionCNN before fmnist-cnn is built) and EfficientNet-Lite0, with per-sample targets.

Tolerance: allclose with rtol 1e-4 and an absolute tolerance of 1e-4 times the largest peer
value (float32; the libraries sum the same terms in different orders)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import labkit
from labkit import attribution
from labkit.attribution import (gradcam, gradient, gradient_x_input, guided_backprop, guided_gradcam,
                                integrated_gradients, occlusion, smoothgrad)
from labkit.models import FashionCNN, load

import grad_cam_stand_ins
from labkit.models import WEIGHTS_DIR


def weights_exist(name):
    return (WEIGHTS_DIR / f"{name}.pt").is_file()

captum_attr = pytest.importorskip("captum.attr", reason="captum is the oracle for these tests")
from captum._utils.common import _register_backward_hook  # noqa: E402  (after the importorskip)

pytestmark = [pytest.mark.peers,
              pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients"),
              pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU")]
RTOL = 1e-4


def close(actual, expected, rtol=RTOL):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert not actual.requires_grad and actual.device == expected.device
    expected = expected.detach()  # captum's InputXGradient keeps the graph
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol,
                               atol=rtol * float(expected.abs().max()) + 1e-12)


@pytest.fixture(scope="module")
def device():
    return labkit.get_device()


@pytest.fixture(scope="module")
def fashion(device):
    """The shipped fmnist-cnn when its weights exist, else a seeded random FashionCNN."""
    if weights_exist("fmnist-cnn"):
        return load("fmnist-cnn", device=device)
    torch.manual_seed(0)
    return FashionCNN().to(device).eval()


@pytest.fixture(scope="module")
def fashion_robust(device):
    if not weights_exist("fmnist-cnn-robust"):
        pytest.skip("shipped weights fmnist-cnn-robust.pt not built yet")
    return load("fmnist-cnn-robust", device=device)


@pytest.fixture(scope="module")
def effnet(device):
    try:
        return load("imagenet-effnet-lite0", device=device)
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(f"EfficientNet-Lite0 is not loadable: {err}")


@pytest.fixture(scope="module")
def fashion_batch(device):
    images, labels = labkit.data.fashion_mnist("test").tensors(list(range(4)))
    return images.to(device), labels.to(device)


@pytest.fixture(scope="module")
def photo_batch(device):
    # 64 x 64 (a multiple of 32, as the network's TF padding assumes) keeps CPU runs short
    images, _ = labkit.data.sample_photos(64, names=("chelsea", "coffee"))
    return images.to(device), torch.tensor([285, 967], device=device)  # Egyptian cat, espresso


@pytest.fixture(params=["fashion", "fashion_robust", "effnet"])
def case(request):
    """(model, images, per-sample targets, Grad-CAM layer name: the model's gradcam_layer, its
    last rectified feature maps)."""
    if request.param.startswith("fashion"):
        images, labels = request.getfixturevalue("fashion_batch")
        return request.getfixturevalue(request.param), images, labels, "relu5"
    images, labels = request.getfixturevalue("photo_batch")
    return request.getfixturevalue("effnet"), images, labels, "head"


class GuidedBackpropReLU6(captum_attr.GuidedBackprop):
    """captum guides ``nn.ReLU`` modules only; labkit also guides ``nn.ReLU6`` (EfficientNet-Lite's
    activation), so the oracle gets captum's own hook on those modules too."""

    def _register_hooks(self, module):
        if isinstance(module, nn.ReLU6):
            self.backward_hooks.extend(_register_backward_hook(module, self._backward_hook, self))
        super()._register_hooks(module)


def test_gradient_vs_saliency(case):
    model, x, y, _ = case
    close(gradient(model, x, y), captum_attr.Saliency(model).attribute(x, target=y, abs=False))


def test_gradient_x_input_vs_input_x_gradient(case):
    model, x, y, _ = case
    close(gradient_x_input(model, x, y), captum_attr.InputXGradient(model).attribute(x, target=y))


@pytest.mark.parametrize("squared", [False, True])
def test_smoothgrad_vs_noise_tunnel_with_shared_noise(case, squared, monkeypatch):
    model, x, y, _ = case
    n, sigma, seed = 6, 0.15, 7
    actual = smoothgrad(model, x, y, n_samples=n, sigma=sigma, squared=squared, batch_size=5,
                        generator=torch.Generator(x.device).manual_seed(seed))
    # labkit's documented noise: randn(B * n, C, H, W) scaled by sigma * (max - min) per image,
    # row b * n + k, the layout of captum's input.repeat_interleave(n) + torch.normal(0, stdev)
    unit = torch.randn((len(x) * n, *x.shape[1:]), generator=torch.Generator(x.device).manual_seed(seed),
                       device=x.device)
    spread = sigma * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))
    noise = unit * spread.repeat_interleave(n)[:, None, None, None]
    monkeypatch.setattr(torch, "normal", lambda mean, std: noise)
    expected = captum_attr.NoiseTunnel(captum_attr.Saliency(model)).attribute(
        x, nt_type="smoothgrad_sq" if squared else "smoothgrad", nt_samples=n, stdevs=1.0,
        target=y, abs=False)
    close(actual, expected)


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_middle", "riemann_trapezoid"])
@pytest.mark.parametrize("baseline", ["black", "gray image"])
def test_integrated_gradients_vs_captum(case, method, baseline):
    model, x, y, _ = case
    steps = 8
    reference = torch.zeros_like(x) if baseline == "black" else torch.full_like(x[:1], 0.5)
    actual = integrated_gradients(model, x, y, baseline=None if baseline == "black" else reference,
                                  steps=steps, method=method, batch_size=6)
    # the same 6-point chunks (3 steps x 2 images, step-major in both): the rounding of a
    # convolution depends on its batch, and ReLU6 kinks can amplify a last-bit difference
    expected = captum_attr.IntegratedGradients(model).attribute(
        x, baselines=reference.expand_as(x), target=y, n_steps=steps, method=method,
        internal_batch_size=6)
    if method == "riemann_trapezoid":
        # Same points, but captum weights them 1/n (ends 1/2n), summing to (n - 1)/n instead of
        # the trapezoid rule's 1/(n - 1): its attributions are (n - 1)/n times the rule's.
        expected = expected * steps / (steps - 1)
    close(actual, expected)


@pytest.mark.parametrize("window,stride,fill", [(7, 7, 0.0), ((6, 4), (3, 4), 0.5)])
def test_occlusion_vs_captum(case, window, stride, fill):
    model, x, y, _ = case
    if x.shape[-1] > 28:  # same number of windows on the 64 x 64 photos, less CPU time
        window = tuple(2 * w for w in window) if isinstance(window, tuple) else 2 * window
        stride = tuple(2 * s for s in stride) if isinstance(stride, tuple) else 2 * stride
    pair = lambda v: v if isinstance(v, tuple) else (v, v)
    channels = x.shape[1]
    actual = occlusion(model, x, y, window=window, stride=stride, fill=fill, batch_size=64)
    expected = captum_attr.Occlusion(model).attribute(
        x, sliding_window_shapes=(channels, *pair(window)), strides=(channels, *pair(stride)),
        baselines=fill, target=y, perturbations_per_eval=64)
    close(actual, expected)


def test_guided_backprop_vs_captum(case):
    model, x, y, _ = case
    close(guided_backprop(model, x, y), GuidedBackpropReLU6(model).attribute(x, target=y))


@pytest.mark.parametrize("relu,upsample", [(True, True), (False, False), (True, False)])
def test_gradcam_vs_layer_gradcam(case, relu, upsample):
    model, x, y, layer = case
    expected = captum_attr.LayerGradCam(model, model.get_submodule(layer)).attribute(
        x, target=y, relu_attributions=relu)
    if upsample:
        expected = captum_attr.LayerAttribution.interpolate(expected, x.shape[-2:],
                                                            interpolate_mode="bilinear")
    close(gradcam(model, x, y, layer=layer, relu=relu, upsample=upsample), expected)


def test_gradcam_default_layer_is_the_models_gradcam_layer(case):
    model, x, y, layer = case
    close(gradcam(model, x, y), gradcam(model, x, y, layer=model.get_submodule(layer)))


def test_guided_gradcam_vs_captum(case):
    model, x, y, layer = case
    peer = captum_attr.GuidedGradCam(model, model.get_submodule(layer))
    peer.guided_backprop = GuidedBackpropReLU6(model)
    close(guided_gradcam(model, x, y, layer=layer), peer.attribute(x, target=y, interpolate_mode="bilinear"))


# --- pytorch-grad-cam -----------------------------------------------------------------------------

@pytest.fixture
def pytorch_grad_cam():
    """pytorch-grad-cam's GradCAM, imported with stand-ins for its missing import-time
    dependencies (see grad_cam_stand_ins.py), for this test only."""
    try:
        with grad_cam_stand_ins.pytorch_grad_cam() as classes:
            yield classes
    except ImportError as err:
        pytest.skip(str(err))


def test_gradcam_vs_pytorch_grad_cam(case, pytorch_grad_cam):
    """pytorch-grad-cam scales every map to [0, 1] (before and after its resize); resizing is
    linear and keeps constants, so its output is labkit's upsampled Grad-CAM min-max scaled."""
    GradCAM, ClassifierOutputTarget = pytorch_grad_cam
    model, x, y, layer = case
    with torch.no_grad():
        predicted = model(x).argmax(1)  # the classes with evidence: a map that is not all zero
    ours = gradcam(model, x, predicted, layer=layer)
    low, high = ours.amin(dim=(1, 2, 3), keepdim=True), ours.amax(dim=(1, 2, 3), keepdim=True)
    assert (high > low).any()  # an all-zero map (no positive evidence at the layer) stays 0 in both
    peer_model = copy.deepcopy(model)  # pytorch-grad-cam accumulates .grad in the parameters
    with GradCAM(peer_model, [peer_model.get_submodule(layer)]) as cam:
        theirs = cam(x, targets=[ClassifierOutputTarget(int(t)) for t in predicted])
    close((ours - low) / (high - low).clamp_min(1e-12), torch.from_numpy(theirs).to(x.device)[:, None],
          rtol=1e-3)


# The peer comparison of every registered method (labkit.attribution.METHODS): a method added to
# the table fails the test below until it gets one here (LRP's are in test_lrp.py, against zennit).
PEER_TESTS = {
    "gradient": "test_gradient_vs_saliency",
    "gradient_x_input": "test_gradient_x_input_vs_input_x_gradient",
    "smoothgrad": "test_smoothgrad_vs_noise_tunnel_with_shared_noise",
    "integrated_gradients": "test_integrated_gradients_vs_captum",
    "occlusion": "test_occlusion_vs_captum",
    "guided_backprop": "test_guided_backprop_vs_captum",
    "gradcam": "test_gradcam_vs_layer_gradcam",
    "guided_gradcam": "test_guided_gradcam_vs_captum",
    "lrp": "test_lrp.py::test_composites_match_zennit_on_fashion_cnn",
}


def test_every_registered_method_has_a_peer_test():
    import pathlib
    assert set(PEER_TESTS) == set(attribution.METHODS)
    for test in PEER_TESTS.values():
        module, _, name = test.rpartition("::")
        source = pathlib.Path(__file__).with_name(module) if module else pathlib.Path(__file__)
        assert f"def {name}(" in source.read_text(), f"{test} does not exist"
