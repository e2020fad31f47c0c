"""RepDistiller's CIFAR models in PyTorch, transcribed only as far as the tests of tgeo_jax.import_teacher need them:
the same module names (so the same ``state_dict`` keys, in the same order) and the same eval-mode forward as
HobbitLong/RepDistiller ``models/{resnet,resnetv2,wrn,vgg,mobilenetv2,ShuffleNetv1,ShuffleNetv2}.py``. Left out:
the weight initialisations, the ``is_feat`` / ``preact`` feature outputs and the helper methods. The references'
fixed-size average pools (``AvgPool2d(8)``, ``avg_pool2d(out, 4)``, ...) cover the whole last map at 32x32, so
they are written as global average pooling here.

``build(name, num_classes)`` builds every CIFAR model of the zoo under its zoo name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv(c_in, c_out, k, stride=1, groups=1, bias=False):
  return nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=bias)


def _gap(x):
  return F.adaptive_avg_pool2d(x, 1).flatten(1)


def _shuffle(x, g):
  n, c, h, w = x.size()
  return x.view(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class BasicBlock(nn.Module):  # resnet.py
  def __init__(self, c_in, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1, self.bn1 = _conv(c_in, planes, 3, stride), nn.BatchNorm2d(planes)
    self.conv2, self.bn2 = _conv(planes, planes, 3), nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):  # resnet.py: resnet8 .. resnet110, resnet8x4, resnet32x4
  def __init__(self, depth, filters, num_classes):
    super().__init__()
    self.conv1, self.bn1 = _conv(3, filters[0], 3), nn.BatchNorm2d(filters[0])
    c_in = filters[0]
    for i, (planes, stride) in enumerate(zip(filters[1:], (1, 2, 2))):
      blocks = []
      for j in range((depth - 2) // 6):
        s = stride if j == 0 else 1
        down = (nn.Sequential(nn.Conv2d(c_in, planes, 1, s, bias=False), nn.BatchNorm2d(planes))
                if s != 1 or c_in != planes else None)
        blocks.append(BasicBlock(c_in, planes, s, down))
        c_in = planes
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.fc = nn.Linear(c_in, num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    return self.fc(_gap(self.layer3(self.layer2(self.layer1(x)))))


class Bottleneck(nn.Module):  # resnetv2.py
  def __init__(self, c_in, planes, stride):
    super().__init__()
    self.conv1, self.bn1 = _conv(c_in, planes, 1), nn.BatchNorm2d(planes)
    self.conv2, self.bn2 = _conv(planes, planes, 3, stride), nn.BatchNorm2d(planes)
    self.conv3, self.bn3 = _conv(planes, 4 * planes, 1), nn.BatchNorm2d(4 * planes)
    self.shortcut = nn.Sequential()
    if stride != 1 or c_in != 4 * planes:
      self.shortcut = nn.Sequential(nn.Conv2d(c_in, 4 * planes, 1, stride, bias=False), nn.BatchNorm2d(4 * planes))

  def forward(self, x):
    out = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
    return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class ResNetV2(nn.Module):  # resnetv2.py: ResNet50
  def __init__(self, num_blocks, num_classes):
    super().__init__()
    self.conv1, self.bn1 = _conv(3, 64, 3), nn.BatchNorm2d(64)
    c_in = 64
    for i, (planes, stride, n) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2), num_blocks)):
      blocks = []
      for j in range(n):
        blocks.append(Bottleneck(c_in, planes, stride if j == 0 else 1))
        c_in = 4 * planes
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.linear = nn.Linear(c_in, num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    return self.linear(_gap(self.layer4(self.layer3(self.layer2(self.layer1(x))))))


class WideBlock(nn.Module):  # wrn.py BasicBlock
  def __init__(self, c_in, c_out, stride):
    super().__init__()
    self.bn1, self.conv1 = nn.BatchNorm2d(c_in), _conv(c_in, c_out, 3, stride)
    self.bn2, self.conv2 = nn.BatchNorm2d(c_out), _conv(c_out, c_out, 3)
    self.convShortcut = None if c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

  def forward(self, x):
    a = F.relu(self.bn1(x))
    out = self.conv2(F.relu(self.bn2(self.conv1(a))))
    return out + (x if self.convShortcut is None else self.convShortcut(a))


class NetworkBlock(nn.Module):  # wrn.py
  def __init__(self, n, c_in, c_out, stride):
    super().__init__()
    self.layer = nn.Sequential(*[WideBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1)
                                 for i in range(n)])

  def forward(self, x):
    return self.layer(x)


class WideResNet(nn.Module):  # wrn.py
  def __init__(self, depth, widen, num_classes):
    super().__init__()
    widths, n = (16, 16 * widen, 32 * widen, 64 * widen), (depth - 4) // 6
    self.conv1 = _conv(3, 16, 3)
    self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
    self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
    self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
    self.bn1 = nn.BatchNorm2d(widths[3])
    self.fc = nn.Linear(widths[3], num_classes)

  def forward(self, x):
    out = self.block3(self.block2(self.block1(self.conv1(x))))
    return self.fc(_gap(F.relu(self.bn1(out))))


class VGG(nn.Module):  # vgg.py with batch_norm=True
  def __init__(self, cfg, num_classes):
    super().__init__()
    c_in = 3
    for b, widths in enumerate(cfg):
      layers = []
      for v in widths:
        layers += [_conv(c_in, v, 3, bias=True), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
        c_in = v
      setattr(self, f"block{b}", nn.Sequential(*layers[:-1]))
    self.classifier = nn.Linear(512, num_classes)

  def forward(self, x):
    h = x.shape[2]
    for b in range(5):
      x = F.relu(getattr(self, f"block{b}")(x))
      if b < 3 or (b == 3 and h == 64):
        x = F.max_pool2d(x, 2, 2)
    return self.classifier(_gap(x))


def _conv_bn_relu(c_in, c_out, k, stride=1):
  return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):  # mobilenetv2.py
  def __init__(self, c_in, c_out, stride, t):
    super().__init__()
    hidden = c_in * t
    self.use_res_connect = stride == 1 and c_in == c_out
    self.conv = nn.Sequential(
        nn.Conv2d(c_in, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
        nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, c_out, 1, 1, 0, bias=False), nn.BatchNorm2d(c_out))

  def forward(self, x):
    return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):  # mobilenetv2.py: mobile_half = MobileNetV2(T=6, width_mult=0.5)
  def __init__(self, t, width_mult, num_classes):
    super().__init__()
    setting = ((1, 16, 1, 1), (t, 24, 2, 1), (t, 32, 3, 2), (t, 64, 4, 2), (t, 96, 3, 1), (t, 160, 3, 2),
               (t, 320, 1, 1))
    c_in = int(32 * width_mult)
    self.conv1 = _conv_bn_relu(3, c_in, 3, 2)
    self.blocks = nn.ModuleList()
    for ti, c, n, s in setting:
      layers = []
      for i in range(n):
        layers.append(InvertedResidual(c_in, int(c * width_mult), s if i == 0 else 1, ti))
        c_in = int(c * width_mult)
      self.blocks.append(nn.Sequential(*layers))
    self.conv2 = _conv_bn_relu(c_in, 1280, 1)
    self.classifier = nn.Sequential(nn.Linear(1280, num_classes))

  def forward(self, x):
    x = self.conv1(x)
    for block in self.blocks:
      x = block(x)
    return self.classifier(_gap(self.conv2(x)))


class ShuffleBottleneck(nn.Module):  # ShuffleNetv1.py Bottleneck
  def __init__(self, c_in, c_out, stride, groups):
    super().__init__()
    self.stride, mid = stride, c_out // 4
    self.g = 1 if c_in == 24 else groups
    self.conv1, self.bn1 = _conv(c_in, mid, 1, groups=self.g), nn.BatchNorm2d(mid)
    self.conv2, self.bn2 = _conv(mid, mid, 3, stride, groups=mid), nn.BatchNorm2d(mid)
    self.conv3, self.bn3 = _conv(mid, c_out, 1, groups=groups), nn.BatchNorm2d(c_out)

  def forward(self, x):
    out = _shuffle(F.relu(self.bn1(self.conv1(x))), self.g)
    out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
    if self.stride == 2:
      return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
    return F.relu(out + x)


class ShuffleV1(nn.Module):  # ShuffleNetv1.py ShuffleV1: out_planes (240, 480, 960), blocks (4, 8, 4), groups 3
  def __init__(self, num_classes):
    super().__init__()
    self.conv1, self.bn1 = _conv(3, 24, 1), nn.BatchNorm2d(24)
    c_in = 24
    for i, (c_out, n) in enumerate(zip((240, 480, 960), (4, 8, 4))):
      units = []
      for j in range(n):
        units.append(ShuffleBottleneck(c_in, c_out - (c_in if j == 0 else 0), 2 if j == 0 else 1, 3))
        c_in = c_out
      setattr(self, f"layer{i + 1}", nn.Sequential(*units))
    self.linear = nn.Linear(960, num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    return self.linear(_gap(self.layer3(self.layer2(self.layer1(x)))))


class ShuffleV2Basic(nn.Module):  # ShuffleNetv2.py BasicBlock
  def __init__(self, channels):
    super().__init__()
    c = channels // 2
    self.conv1, self.bn1 = _conv(c, c, 1), nn.BatchNorm2d(c)
    self.conv2, self.bn2 = _conv(c, c, 3, groups=c), nn.BatchNorm2d(c)
    self.conv3, self.bn3 = _conv(c, c, 1), nn.BatchNorm2d(c)

  def forward(self, x):
    c = x.size(1) // 2
    x1, x2 = x[:, :c], x[:, c:]
    out = F.relu(self.bn3(self.conv3(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x2))))))))
    return _shuffle(torch.cat([x1, out], 1), 2)


class ShuffleV2Down(nn.Module):  # ShuffleNetv2.py DownBlock
  def __init__(self, c_in, c_out):
    super().__init__()
    mid = c_out // 2
    self.conv1, self.bn1 = _conv(c_in, c_in, 3, 2, groups=c_in), nn.BatchNorm2d(c_in)
    self.conv2, self.bn2 = _conv(c_in, mid, 1), nn.BatchNorm2d(mid)
    self.conv3, self.bn3 = _conv(c_in, mid, 1), nn.BatchNorm2d(mid)
    self.conv4, self.bn4 = _conv(mid, mid, 3, 2, groups=mid), nn.BatchNorm2d(mid)
    self.conv5, self.bn5 = _conv(mid, mid, 1), nn.BatchNorm2d(mid)

  def forward(self, x):
    left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
    right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
    return _shuffle(torch.cat([left, F.relu(self.bn5(self.conv5(right)))], 1), 2)


class ShuffleV2(nn.Module):  # ShuffleNetv2.py ShuffleV2: net_size 1
  def __init__(self, num_classes):
    super().__init__()
    self.conv1, self.bn1 = _conv(3, 24, 1), nn.BatchNorm2d(24)
    c_in = 24
    for i, (c_out, n) in enumerate(zip((116, 232, 464), (3, 7, 3))):
      setattr(self, f"layer{i + 1}", nn.Sequential(ShuffleV2Down(c_in, c_out), *[ShuffleV2Basic(c_out)
                                                                                  for _ in range(n)]))
      c_in = c_out
    self.conv2, self.bn2 = _conv(464, 1024, 1), nn.BatchNorm2d(1024)
    self.linear = nn.Linear(1024, num_classes)

  def forward(self, x):
    x = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
    return self.linear(_gap(F.relu(self.bn2(self.conv2(x)))))


# RepDistiller's vgg.py cfg: 'S' (vgg8), 'A' (vgg11), 'B' (vgg13), 'D' (vgg16), 'E' (vgg19).
VGG_CFG = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}

BUILDERS = {
    **{f"resnet{d}": (lambda k, d=d: ResNet(d, (16, 16, 32, 64), k)) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": lambda k: ResNet(8, (32, 64, 128, 256), k),
    "resnet32x4": lambda k: ResNet(32, (32, 64, 128, 256), k),
    "resnet50_cifar": lambda k: ResNetV2((3, 4, 6, 3), k),
    **{f"wrn_{d}_{w}": (lambda k, d=d, w=w: WideResNet(d, w, k)) for d in (16, 40) for w in (1, 2)},
    **{name: (lambda k, cfg=cfg: VGG(cfg, k)) for name, cfg in VGG_CFG.items()},
    "mobilenetv2": lambda k: MobileNetV2(6, 0.5, k),
    "shufflev1": ShuffleV1,
    "shufflev2": ShuffleV2,
}


def build(name: str, num_classes: int) -> nn.Module:
  """RepDistiller's model ``name`` (a zoo name, see ``BUILDERS``) with ``num_classes`` outputs."""
  return BUILDERS[name](num_classes)
