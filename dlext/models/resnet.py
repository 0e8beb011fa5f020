"""ResNet-18/34/50 from dlext layers, with torchvision's module names and structure.

Every parameter and buffer has torchvision's name and shape (ResNet v1.5: the stride of a
bottleneck sits on its 3x3 convolution), so `model.load_state_dict(torchvision_model.state_dict())`
works unchanged. Convolutions, batch norms, ReLUs and the max-pool are dlext layers (torch.nn's with
native=True); the adaptive average pool and the classifier stay torch's.
"""
from __future__ import annotations

import torch
from torch import nn


def _layers(native: bool):
    if native:
        return nn
    import dlext.nn
    return dlext.nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, L, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = L.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = L.BatchNorm2d(planes)
        self.relu = L.ReLU(inplace=True)
        self.conv2 = L.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = L.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, L, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = L.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = L.BatchNorm2d(planes)
        self.conv2 = L.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = L.BatchNorm2d(planes)
        self.conv3 = L.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = L.BatchNorm2d(planes * self.expansion)
        self.relu = L.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes: int = 1000, native: bool = False):
        super().__init__()
        L = _layers(native)
        self._L = L
        self.inplanes = 64
        self.conv1 = L.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = L.BatchNorm2d(64)
        self.relu = L.ReLU(inplace=True)
        self.maxpool = L.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        del self._L

    def _make_layer(self, block, planes, blocks, stride=1):
        L = self._L
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                L.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                L.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(L, self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(L, self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000, native: bool = False) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, native)


def resnet34(num_classes: int = 1000, native: bool = False) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, native)


def resnet50(num_classes: int = 1000, native: bool = False) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, native)
