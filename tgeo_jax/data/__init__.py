"""Task data: ``task`` (what the examples are: loading, splits, noise, digests) and ``pipeline`` (how batches
reach the step: order, augmentation, workers, validation and evaluation batches). Both are re-exported here.

``data.load(config.data, seed=...)`` gives a ``TaskData``; ``data.Pipeline(task, ...)`` gives its batches (or
``data.DevicePipeline``: the same batches built on the device, several steps per dispatch).
"""

from tgeo_jax.data.device_pipeline import *  # noqa: F403
from tgeo_jax.data.device_pipeline import __all__ as _device_pipeline_all
from tgeo_jax.data.pipeline import *  # noqa: F403
from tgeo_jax.data.pipeline import __all__ as _pipeline_all
from tgeo_jax.data.task import *  # noqa: F403
from tgeo_jax.data.task import __all__ as _task_all

__all__ = [*_task_all, *_pipeline_all, *_device_pipeline_all]
