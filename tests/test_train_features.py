"""The lesson-13 recipes of labkit.train: the data sets they train on (the watermark on exactly
the chosen class, relabelled attacked images, images rebuilt toward the robust representation)
and the command line that writes verifiable weights."""
import subprocess
import sys

import torch

from attack_setup import fixed_images, trained_model
from labkit import models, shortcuts
from labkit.train import FEATURE_RECIPES, feature_dataset


def test_clever_hans_data_tags_exactly_one_class():
    recipe = FEATURE_RECIPES["fmnist-cnn-clever-hans"]
    x, y = fixed_images(64)
    tagged, labels = feature_dataset("fmnist-cnn-clever-hans", (x, y), images=64)
    assert torch.equal(labels, y)
    changed = (tagged != x).flatten(1).any(1)
    own = y == recipe["tag_class"]
    assert own.any() and not changed[~own].any()
    assert torch.equal(tagged[own], shortcuts.watermark(x[own], recipe["corner"], recipe["size"]))


def test_nonrobust_data_is_relabelled_toward_other_classes():
    trained_model("fmnist-cnn")
    x, y = fixed_images(16)
    moved, labels = feature_dataset("fmnist-cnn-nonrobust-features", (x, y), images=16, progress=False)
    assert (labels != y).all() and labels.min() >= 0 and labels.max() <= 9
    eps = FEATURE_RECIPES["fmnist-cnn-nonrobust-features"]["eps"]
    assert (moved - x).flatten(1).norm(dim=1).max() <= eps + 1e-4
    with torch.no_grad():
        assert (models.load("fmnist-cnn", device="cpu")(moved).argmax(1) == labels).float().mean() >= 0.9


def test_robust_data_keeps_labels_and_nears_the_representation():
    robust = trained_model("fmnist-cnn-robust")
    x, y = fixed_images(4)
    rebuilt, labels = feature_dataset("fmnist-cnn-robust-features", (x, y), images=4, progress=False)
    assert torch.equal(labels, y)
    goal = models.features(robust, x)
    others, _ = fixed_images(4, start=100)
    # the start images are other training images: about as far from x as these others, and after
    # the recipe's steps much nearer
    before = (models.features(robust, others) - goal).norm(dim=1).mean()
    assert (models.features(robust, rebuilt) - goal).norm(dim=1).mean() < 0.6 * before


def test_command_line_writes_verifiable_weights(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "labkit.train", "fmnist-cnn-clever-hans", "--epochs", "1", "--limit", "64",
         "--out", str(tmp_path), "--device", "cpu"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    digest, name = (tmp_path / "SHA256SUMS").read_text().split()
    assert name == "fmnist-cnn-clever-hans.pt" and digest == models.sha256_of(tmp_path / name)
    assert "recall of class" in result.stdout and not (tmp_path / "cards").exists()
