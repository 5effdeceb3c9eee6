"""labkit.models: loading with sha256, the [0, 1] input contract, features, randomization,
and the shipped models' accuracy measured on the real test set."""
import shutil

import pytest
import torch
from torch import nn

import labkit
from labkit import attacks, models
from labkit.models import FashionCNN


def test_available_names_every_model():
    names = models.available()
    assert set(names) == {"fmnist-cnn", "fmnist-cnn-robust", "fmnist-cnn-consistent", "imagenet-effnet-lite0",
                          "fmnist-mlp-ibp", "fmnist-cnn-ibp", "fmnist-cnn-nonrobust-features",
                          "fmnist-cnn-robust-features", "fmnist-cnn-clever-hans"}
    assert all(isinstance(line, str) and line for line in names.values())


def test_unknown_name():
    with pytest.raises(ValueError, match="available"):
        models.load("resnet-9000")


@pytest.mark.parametrize("name, shape", [("fmnist-cnn", (2, 1, 28, 28)),
                                         ("fmnist-cnn-robust", (2, 1, 28, 28)),
                                         ("fmnist-mlp-ibp", (2, 1, 28, 28)),
                                         ("fmnist-cnn-ibp", (2, 1, 28, 28)),
                                         ("fmnist-cnn-nonrobust-features", (2, 1, 28, 28)),
                                         ("fmnist-cnn-robust-features", (2, 1, 28, 28)),
                                         ("fmnist-cnn-clever-hans", (2, 1, 28, 28)),
                                         ("imagenet-effnet-lite0", (2, 3, 64, 64))])
def test_load_every_name(name, shape):
    if not (models.REGISTRY[name].weights()).is_file():
        pytest.skip(f"{name} weights not built yet")
    model = models.load(name, device="cpu")
    assert not model.training and all(not m.training for m in model.modules())
    assert all(p.device.type == "cpu" for p in model.parameters())
    out = model(torch.rand(shape))
    assert out.shape == (2, 10 if name.startswith("fmnist") else 1000)
    assert models.model_card(name).startswith("# Model card")


def test_fashion_cnn_normalizes_inside():
    torch.manual_seed(0)
    model = FashionCNN().eval()
    x = torch.rand(3, 1, 28, 28)
    by_hand = (x - 0.2860) / 0.3530
    for name, layer in list(model.named_children())[1:]:
        by_hand = layer(by_hand)
    assert torch.allclose(model(x), by_hand, atol=1e-6)
    assert 150_000 < sum(p.numel() for p in model.parameters()) < 210_000


def test_sha_mismatch_is_refused(tmp_path, monkeypatch):
    info = models.REGISTRY["fmnist-cnn"]
    if not info.weights().is_file():
        pytest.skip("fmnist-cnn weights not built yet")
    damaged = tmp_path / "fmnist-cnn.pt"
    shutil.copy(info.weights(), damaged)
    raw = bytearray(damaged.read_bytes())
    raw[-100] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    monkeypatch.setitem(models.REGISTRY, "fmnist-cnn",
                        models.ModelInfo(info.name, info.description, info.build, lambda: damaged, info.sha256))
    with pytest.raises(ValueError, match="sha256"):
        models.load("fmnist-cnn", device="cpu")


def test_missing_sha_entry_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="sha256"):
        models._shipped_sha("fmnist-cnn.pt")()


def test_load_default_device_follows_get_device(monkeypatch):
    if not models.REGISTRY["fmnist-cnn"].weights().is_file():
        pytest.skip("fmnist-cnn weights not built yet")
    monkeypatch.setenv("LABKIT_DEVICE", "cpu")
    assert next(models.load("fmnist-cnn").parameters()).device.type == "cpu"


@pytest.mark.gpu
def test_load_on_cuda():
    model = models.load("fmnist-cnn", device="cuda")
    assert next(model.parameters()).is_cuda
    assert model(torch.rand(2, 1, 28, 28, device="cuda")).is_cuda


def test_features_is_the_classifier_input(random_cnn):
    x = torch.rand(4, 1, 28, 28)
    phi = models.features(random_cnn, x)
    assert phi.shape == (4, 128) and not phi.requires_grad
    assert torch.allclose(random_cnn.classifier(phi), random_cnn(x), atol=1e-5)
    with pytest.raises(ValueError):
        models.features(random_cnn, torch.rand(1, 28, 28))
    with pytest.raises(ValueError, match="no nn.Linear"):
        models.features(nn.Sequential(nn.Flatten()), x)


def _same_weights(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def _changed_layers(original, copy):
    return {name for name, module in copy.named_modules()
            if any(not torch.equal(p, q) for p, q in
                   zip(module.parameters(recurse=False), original.get_submodule(name).parameters(recurse=False)))}


def test_randomize_cascade_and_independent(random_cnn):
    before = [p.clone() for p in random_cnn.parameters()]
    cascade = models.randomize(random_cnn, "cascade")
    independent = models.randomize(random_cnn, "independent")
    assert all(torch.equal(p, q) for p, q in zip(before, random_cnn.parameters()))
    names = [name for name, _ in cascade]
    assert names == ["classifier", "conv5", "conv4", "conv3", "conv2", "conv1"]
    for k, (name, copy) in enumerate(cascade):
        assert _changed_layers(random_cnn, copy) == set(names[:k + 1])
    for name, copy in independent:
        assert _changed_layers(random_cnn, copy) == {name}
    again = models.randomize(random_cnn, "cascade")
    assert _same_weights(again[-1][1], cascade[-1][1])  # seeded
    with pytest.raises(ValueError, match="cascade"):
        models.randomize(random_cnn, "all")


# --- the shipped models, measured on the real test set -----------------------------------

def test_standard_model_accuracy(fmnist_cnn, fashion_test):
    assert attacks.accuracy(fmnist_cnn, fashion_test, progress=False) >= 0.92


def test_robust_model_clean_and_robust_accuracy(fmnist_cnn_robust, fashion_test):
    assert attacks.accuracy(fmnist_cnn_robust, fashion_test, progress=False) >= 0.80
    labkit.seed_everything(0)
    # PGD-20 on the first 1000 test images: the model card reports PGD-40 on all 10,000
    robust = attacks.accuracy(fmnist_cnn_robust, fashion_test, attacks.pgd, limit=1000, eps=0.1,
                              step_size=0.01, steps=20, random_start=True, progress=False)
    assert robust >= 0.65


def _background_gradient_share(model, x, y):
    """Mean share of the input gradient's energy (g squared) that falls on background pixels."""
    grad = labkit.attribution.gradient(model, x, y)
    energy, background = grad.pow(2), (x < 0.05).float()
    return ((energy * background).sum((1, 2, 3)) / energy.sum((1, 2, 3))).mean().item()


def test_robust_gradients_look_more_like_the_input(fmnist_cnn, fmnist_cnn_robust, fashion_test):
    """The robust-gradients lesson rests on this: a standard model's gradient is spread over the
    background about as much as the background covers the image (noise), the robust model's sits
    on the garment (measured 0.58 vs 0.04 on these 200 images, background = 53 % of pixels)."""
    x, y = fashion_test.tensors(torch.arange(200))
    standard = _background_gradient_share(fmnist_cnn, x, y)
    robust = _background_gradient_share(fmnist_cnn_robust, x, y)
    assert robust < 0.15 and standard > 3 * robust, (standard, robust)
