"""``log.profile_steps``: a ``jax.profiler`` trace of a range of training steps."""

from __future__ import annotations

import os

import jax

from tgeo_jax import config_checks
from tgeo_jax.errors import UserError

__all__ = ["Profile"]


class Profile:
  """A ``jax.profiler`` trace of the steps ``log.profile_steps`` names, written to ``<workdir>/profile`` (open it
  with TensorBoard's profile plugin or Perfetto). The trace stops after the device has finished the last traced
  step, so it holds that step's device work, not only its dispatch."""

  def __init__(self, profile_steps: str, workdir: str, *, log=print):
    self.log = log  # prints a line (on the host that speaks for the run)
    self.range = config_checks.parse_profile_steps(profile_steps)
    self.directory = os.path.join(workdir, "profile")
    self.active = False

  def check(self, total_steps: int) -> None:
    if self.range is not None and self.range[1] > total_steps:
      raise UserError(f"log.profile_steps: {self.range[0]}:{self.range[1]} reaches past the run's {total_steps} "
                      f"steps (expected B <= {total_steps})")

  def before_step(self, step: int) -> None:
    if self.range is not None and not self.active and self.range[0] <= step < self.range[1]:
      jax.profiler.start_trace(self.directory)
      self.active = True
      self.log(f"Profiling steps {step}:{self.range[1]} into {self.directory}.")

  def after_step(self, step: int, state) -> None:
    if self.active and step >= self.range[1]:
      jax.block_until_ready(state)
      self.stop()

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      self.range = None  # once per process
