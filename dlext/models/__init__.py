"""Models built from dlext layers: LeNet-5 and ResNet-18/34/50 (torchvision's module names)."""
from dlext.models.lenet import LeNet5, lenet5
from dlext.models.resnet import ResNet, resnet18, resnet34, resnet50

__all__ = ["LeNet5", "lenet5", "ResNet", "resnet18", "resnet34", "resnet50"]
