"""IBP training (labkit.train.IBPAdversary and the fmnist-*-ibp recipes): the loss's schedule
ends, the worst-case part bounds the clean loss from above, training with it certifies more than
standard training, and the command line reproduces verifiable weights."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import labkit
from labkit import certify
from labkit.models import FashionMLP, SmallCNN
from labkit.train import IBPAdversary, fit


@pytest.fixture(scope="module")
def small_train():
    return labkit.data.fashion_mnist("train").tensors(torch.arange(512))


@pytest.mark.parametrize("build", [FashionMLP, SmallCNN])
def test_ibp_loss_schedule_and_bound(build, small_train):
    torch.manual_seed(0)
    model = build().eval()
    x, y = small_train[0][:64], small_train[1][:64]
    clean = F.cross_entropy(model(x), y)
    # eps_scale = 0: no box and kappa = 1, plain cross-entropy
    torch.testing.assert_close(IBPAdversary(eps=0.1).loss(model, x, y, eps_scale=0.0), clean)
    # kappa = 0: only the worst case, whose logits dominate z - z_y, so the loss can only be larger
    worst = IBPAdversary(eps=0.05, kappa=0.0).loss(model, x, y)
    assert worst > clean
    # and it grows with eps
    assert IBPAdversary(eps=0.1, kappa=0.0).loss(model, x, y) > worst


def test_ibp_training_certifies_more_than_standard_training(small_train):
    certified = {}
    for name, adversary in (("standard", None), ("ibp", IBPAdversary(eps=0.05))):
        labkit.seed_everything(0)
        model = FashionMLP()
        fit(model, small_train, 4, adversary=adversary, batch_size=32, eps_warmup_epochs=2 if adversary else 0,
            progress=False)
        certified[name] = certify.certified_accuracy(model, small_train, 0.05)
    assert certified["ibp"] > certified["standard"] + 0.2


def test_command_line_writes_verifiable_ibp_weights(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "labkit.train", "fmnist-mlp-ibp", "--epochs", "1", "--limit", "128",
         "--out", str(tmp_path), "--device", "cpu"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    weights = tmp_path / "fmnist-mlp-ibp.pt"
    digest, name = (tmp_path / "SHA256SUMS").read_text().split()
    assert name == "fmnist-mlp-ibp.pt" and digest == labkit.models.sha256_of(weights)
    FashionMLP().load_state_dict(torch.load(weights, weights_only=True))
    assert "certified 0.1" in result.stdout and "sha256" in result.stdout
