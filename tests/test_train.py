"""labkit.train.fit: a smoke test on a few hundred real images, seeding, the callback,
and the command line that reproduces shipped weights."""
import subprocess
import sys

import pytest
import torch

import labkit
from labkit.models import FashionCNN
from labkit.train import RECIPES, FGSMMixedAdversary, PGDAdversary, fit


@pytest.fixture(scope="module")
def small_train():
    return labkit.data.fashion_mnist("train").tensors(torch.arange(512))


def _trained(data, adversary=None, seed=0, callback=None):
    labkit.seed_everything(seed)
    model = FashionCNN()
    history = fit(model, data, 3, adversary=adversary, batch_size=32, seed=seed,
                  test_data=data, callback=callback, progress=False)
    return model, history


def test_fit_learns_and_records(small_train):
    steps = []
    model, history = _trained(small_train, callback=lambda m, step, loss: steps.append((step, loss)))
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert [s for s, _ in steps] == list(range(48))  # 512 / 32 minibatches x 3 epochs
    assert not model.training


def test_fit_is_seeded(small_train):
    a, _ = _trained(small_train)
    b, _ = _trained(small_train)
    c, _ = _trained(small_train, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


@pytest.mark.parametrize("adversary", [PGDAdversary(eps=0.1, step_size=0.125, steps=1),
                                       FGSMMixedAdversary(eps=0.1),
                                       RECIPES["fmnist-cnn-robust-l2"]["adversary"]])
def test_adversarial_fit_runs(small_train, adversary):
    model, history = _trained(small_train, adversary=adversary)
    assert history[-1]["loss"] < history[0]["loss"]


def test_fit_rejects_bad_epochs(small_train):
    with pytest.raises(ValueError, match="epochs"):
        fit(FashionCNN(), small_train, 0)


def test_command_line_writes_verifiable_weights(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "labkit.train", "fmnist-cnn", "--epochs", "1", "--limit", "128",
         "--out", str(tmp_path), "--device", "cpu"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    weights = tmp_path / "fmnist-cnn.pt"
    digest, name = (tmp_path / "SHA256SUMS").read_text().split()
    assert name == "fmnist-cnn.pt" and digest == labkit.models.sha256_of(weights)
    model = FashionCNN()
    model.load_state_dict(torch.load(weights, weights_only=True))
    assert "sha256" in result.stdout


def test_a_fine_tuning_recipe_starts_from_the_shipped_weights(tmp_path):
    """fmnist-cnn-consistent: init from fmnist-cnn, Dong et al.'s consistent loss, attacks
    evaluated on the first eval_limit test images; a smoke run on 64 images."""
    recipe = RECIPES["fmnist-cnn-consistent"]
    assert recipe["init"] == "fmnist-cnn" and recipe["eval_limit"] <= 10000
    result = subprocess.run(
        [sys.executable, "-m", "labkit.train", "fmnist-cnn-consistent", "--limit", "64",
         "--out", str(tmp_path), "--device", "cpu"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    tuned = torch.load(tmp_path / "fmnist-cnn-consistent.pt", weights_only=True)
    start = labkit.models.load("fmnist-cnn", "cpu").state_dict()
    # one epoch of 64 images moves the weights a little from the shipped ones, not from a fresh init
    changes = [((tuned[k] - start[k]).norm() / start[k].norm()).item() for k in start if start[k].is_floating_point()
               and start[k].norm() > 0]
    assert 0 < max(changes) < 0.5
    assert "clean" in result.stdout and "pgd40" in result.stdout
