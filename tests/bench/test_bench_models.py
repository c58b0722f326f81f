from __future__ import annotations

import pytest
import torch

from arturo_bench.models import build_model


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(
    "name,classes,channels,size,expected",
    [
        ("cnn_f", 10, 1, 28, 390_410),  # docs/published.md: 0.39M
        ("cnn_c", 10, 3, 32, 653_386),
        ("cnn_c", 100, 3, 32, 676_516),
        ("resnet18", 10, 1, 28, 11_175_370),  # torchvision resnet18, 1-ch stem, 10 classes
        ("resnet34", 10, 3, 32, 21_289_802),  # torchvision resnet34, 10 classes
        ("resnet34", 100, 3, 32, 21_335_972),
    ],
)
def test_shapes_and_parameter_counts(
    name: str, classes: int, channels: int, size: int, expected: int
) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=classes, in_channels=channels)
    assert n_params(model) == expected
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, channels, size, size))
    assert out.shape == (2, classes)


def test_same_seed_same_weights() -> None:
    a = (torch.manual_seed(3), build_model("cnn_f", num_classes=10, in_channels=1))[1]
    b = (torch.manual_seed(3), build_model("cnn_f", num_classes=10, in_channels=1))[1]
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_unknown_model() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg", num_classes=10, in_channels=1)
