"""The KD benchmark model zoo (RepDistiller / mdistiller shapes); importing this module registers it.

CIFAR (32x32, counts for 100 classes): ``resnet8 .. resnet110``, ``resnet8x4``, ``resnet32x4``, ``wrn_16_1``,
``wrn_16_2``, ``wrn_40_1``, ``wrn_40_2``, ``mobilenetv2`` (width 0.5), ``shufflev1``, ``shufflev2``,
``resnet50_cifar`` (RepDistiller's ``resnetv2.ResNet50``), ``vgg8``, ``vgg11``, ``vgg13``, ``vgg16``, ``vgg19``
(RepDistiller's ``vgg*_bn``).
ImageNet (224x224, counts for 1000 classes): ``resnet18``, ``resnet34``, ``resnet50``, ``mobilenetv2_imagenet``.
"""

from tgeo_jax.models import cifar_resnet  # noqa: F401
from tgeo_jax.models import imagenet_resnet  # noqa: F401
from tgeo_jax.models import mobilenetv2  # noqa: F401
from tgeo_jax.models import shufflenet  # noqa: F401
from tgeo_jax.models import vgg  # noqa: F401
from tgeo_jax.models import wrn  # noqa: F401

__all__ = []
