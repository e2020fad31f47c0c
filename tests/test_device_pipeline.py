"""The device-resident pipeline (``data.DevicePipeline``) and the chunked loop (``dispatch.ChunkSteps``): the same
batches as the host pipeline bit for bit, the same training bit for bit on CPU, resume and signals at chunk ends,
one and four devices, and a one-line refusal of a task it cannot hold."""

import json
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import (ROOT, TINY, assert_close_runs, assert_same_run, comparable_records, device_flags, error_lines,
                      final_arrays, run_cli)
from tgeo_jax import data, dispatch, parallel, signals
from tgeo_jax.data import augment, sources, tfds_sources
from tgeo_jax.errors import UserError

RNG = np.random.default_rng(0)


def _fmnist_like(n):
  return sources.ArraySource(RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8), RNG.integers(0, 10, n),
                             sources.normalize_fashion_mnist, pixelwise=True)


def _cifar_like(n):
  return sources.ArraySource(RNG.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), RNG.integers(0, 100, n),
                             tfds_sources.TableNormalize(tfds_sources.CIFAR100_MEAN, tfds_sources.CIFAR100_STD),
                             pixelwise=True)


def _float_inputs(n):
  return sources.ArraySource(RNG.normal(size=(n, 8, 8, 2)).astype(np.float32), RNG.integers(0, 10, n))


def _task(make, aug, n_train=300):
  return data.TaskData("t", make(n_train), make(70), make(50), 10, (1,), augment=aug)


@pytest.mark.parametrize("make,aug", [
    (_fmnist_like, None), (_fmnist_like, augment.flip), (_fmnist_like, augment.crop_flip),
    (_cifar_like, augment.crop_flip_cifar100), (_float_inputs, augment.crop_flip)],
    ids=["uint8", "uint8-flip", "uint8-crop_flip", "uint8x3-crop_flip_cifar100", "float32-crop_flip"])
def test_batches_equal_the_host_pipelines_bit_for_bit(make, aug):
  """Every training batch of epochs 0 and 1 (from step 2 on in epoch 1, as after a resume), with its validation
  batch, gathered + augmented + normalised inside a jitted function, equals the host pipeline's: inputs, labels,
  indices, dtypes. 3 steps per dispatch over 9 steps per epoch, then a padded last chunk from offset 2."""
  task = _task(make, aug)
  mesh = parallel.make_mesh()
  device = data.DevicePipeline(task, batch_size=32, seed=3, mesh=mesh, steps_per_dispatch=3, val_batch_size=16)
  host = data.Pipeline(task, batch_size=32, seed=3, val_batch_size=16)
  make_batch = jax.jit(device.make_batch)
  for epoch, offset in ((0, 0), (1, 2)):
    expected = list(host.epoch(epoch, offset))
    got, firsts = [], []
    for chunk in device.epoch(epoch, offset):
      firsts.append(chunk.first_step)
      assert {k: (v.shape[1:], v.dtype) for k, v in chunk.arrays.items()} == {
          k: (s.shape, s.dtype) for k, s in device.step_shapes().items()}
      arrays = device.chunk_arrays(chunk)
      got += [jax.device_get(make_batch(device.device_data, jax.tree.map(lambda a, i=i: a[i], arrays)))
              for i in range(chunk.steps)]
    assert firsts == list(range(offset, 9, 3)) and len(got) == len(expected) == 9 - offset
    for g, e in zip(got, expected):
      for k in ("inputs", "labels", "index"):
        assert g[k].dtype == e[k].dtype and g[k].shape == e[k].shape, k
        np.testing.assert_array_equal(g[k], e[k], err_msg=k)
      for k in ("inputs", "labels"):
        np.testing.assert_array_equal(g["val"][k], e["val"][k], err_msg=f"val {k}")


def test_a_task_it_cannot_hold_says_why():
  cases = [
      (data.TaskData("t", sources.SubsetSource(_fmnist_like(40), np.arange(30)), _fmnist_like(10),
                     _fmnist_like(10), 10, (1,)), "the training part is not an in-memory array (SubsetSource)"),
      (_task(_fmnist_like, augment.imagenet_crop_flip), "its augmentation 'imagenet_crop_flip' runs on the host only"),
      (data.TaskData("t", sources.ArraySource(np.zeros((40, 4), np.float32), np.zeros(40), lambda x: x * 2),
                     sources.ArraySource(np.zeros((10, 4), np.float32), np.zeros(10), lambda x: x * 2),
                     _float_inputs(10), 10, (1,)),
       "its inputs are transformed per example (to_model on non-uint8 or non-pixel-wise inputs)"),
      (data.TaskData("t", sources.ArraySource(np.zeros((40, 4, 4), np.uint8), np.zeros(40),
                                              lambda x: np.cumsum(x, axis=1).astype(np.float32), pixelwise=True),
                     sources.ArraySource(np.zeros((10, 4, 4), np.uint8), np.zeros(10), pixelwise=True),
                     _float_inputs(10), 10, (1,)),
       "its to_model is not a per-value, per-channel table"),
      (data.TaskData("t", sources.ArraySource({"a": np.zeros((40, 2), np.float32)}, np.zeros(40)),
                     _float_inputs(10), _float_inputs(10), 10, (1,)),
       "the training part's inputs are a dict of arrays, not one array"),
      (data.TaskData("t", _fmnist_like(40), _cifar_like(10), _fmnist_like(10), 10, (1,)),
       "its validation part is stored unlike its training part"),
      (data.TaskData("t", _fmnist_like(40), sources.ArraySource(np.zeros((10, 28, 28), np.uint8), np.zeros(10),
                                                                lambda x: sources.normalize_fashion_mnist(x) + 1,
                                                                pixelwise=True),
                     _fmnist_like(10), 10, (1,)), "its validation part is normalised unlike its training part"),
      (data.TaskData("t", sources.ArraySource(np.zeros((40, 6), np.float32), np.zeros(40)),
                     sources.ArraySource(np.zeros((10, 6), np.float32), np.zeros(10)), _float_inputs(10), 10, (1,),
                     augment=augment.flip),
       "its augmentation 'flip' needs images [N, H, W, C]; its inputs have 2 dimensions"),
      (_task(_fmnist_like, augment.crop_flip_cifar100),
       "its augmentation 'crop_flip_cifar100' pads with 3 channels; its images have 1"),
  ]
  for task, reason in cases:
    assert data.unsupported_reason(task) == reason
    with pytest.raises(UserError, match=re.escape(f"device_pipeline.mode: the t task cannot be held on the device: "
                                                  f"{reason} (set device_pipeline.mode=off or auto)")):
      data.DevicePipeline(task, batch_size=8, seed=0, mesh=parallel.make_mesh(), steps_per_dispatch=2)
  assert data.unsupported_reason(_task(_fmnist_like, None), process_count=2) == (
      "2 processes (the device-resident pipeline runs in one process)")


def test_the_cli_refuses_a_task_or_setting_it_cannot_use_in_one_line(tmp_path):
  for flags, expected in (
      (["--config.device_pipeline.mode=on", "--config.data.augment=imagenet_crop_flip"],
       "error: device_pipeline.mode: the synthetic task cannot be held on the device: its augmentation "
       "'imagenet_crop_flip' runs on the host only (set device_pipeline.mode=off or auto)"),
      (["--config.data.augment=crop_flip_cifar100"],  # the task's own check, whichever the pipeline
       "error: data.augment: 'crop_flip_cifar100' pads with 3 channels; the synthetic images have 1"),
      (["--config.device_pipeline.mode=yes"],
       "error: device_pipeline.mode: expected 'auto', 'on' or 'off', got 'yes'"),
      (["--config.device_pipeline.mode=on", "--config.device_pipeline.steps_per_dispatch=0"],
       "error: device_pipeline.steps_per_dispatch: expected a positive integer, got 0")):
    result = run_cli(["--config=configs/fashion_mnist.py:ce", *TINY, f"--workdir={tmp_path / 'w'}", *flags],
                     check=False)
    assert result.returncode == 2 and error_lines(result.stderr) == [expected]
    assert not os.path.exists(tmp_path / "w")


UNROLL = ["--config=configs/fashion_mnist.py:tgeo", *TINY, "--config.num_epochs=2", "--config.tgeo.fusion_lr=0.01",
          "--config.tgeo.hypergrad=unroll", "--config.tgeo.unroll_steps=2", "--config.tgeo.meta_interval=2",
          "--config.data.augment=crop_flip", "--config.teacher.cache_logits=off", "--config.log.every_steps=4"]
ON = ["--config.device_pipeline.mode=on", "--config.device_pipeline.steps_per_dispatch=4"]  # the default is auto


def test_the_chunked_loop_trains_bit_identically_and_resumes_after_a_signal(tiny_teacher, tmp_path, monkeypatch):
  """TGeo-KD with an unroll window (step kinds record / window_end / plain, validation batches, crop + flip, a live
  teacher), 14 steps per epoch in chunks of up to 4 (cut at the epoch end: a padded chunk): the device pipeline's
  run equals the host pipeline's bit for bit (CPU), records included. A SIGTERM during the second chunk stops at
  its end (step 8) with a checkpoint; the same command resumes and ends bit-identical to the uninterrupted run."""
  args = [*UNROLL, f"--config.teacher.checkpoint={tiny_teacher}"]
  host, device, split = (str(tmp_path / name) for name in ("host", "device", "split"))
  run_cli([*args, "--config.device_pipeline.mode=off", f"--workdir={host}"])
  straight = run_cli([*args, *ON, f"--workdir={device}"])
  assert "done: tgeo" in straight.stdout
  # The same final state bit for bit, the same records (log points at 4, 8, 12, 14 = the epoch end, 16, ...:
  # chunks end where the loop acts), the same summary.
  assert_same_run(host, device)
  assert [r["step"] for r in comparable_records(device) if r["kind"] == "train"] == [4, 8, 12, 14, 16, 20, 24, 28]

  calls = []
  original = dispatch.ChunkSteps.__call__

  def signalled(self, run, chunk):
    calls.append(chunk.first_step)
    if len(calls) == 2:
      os.kill(os.getpid(), signal.SIGTERM)  # arrives while the chunk runs; the loop stops after it
    return original(self, run, chunk)

  monkeypatch.setattr(dispatch.ChunkSteps, "__call__", signalled)
  monkeypatch.setattr(signals, "received", [])
  first = run_cli([*args, *ON, f"--workdir={split}"], check=False)
  assert first.returncode == 128 + signal.SIGTERM, first.stderr
  assert "Received signal 15: saved a checkpoint at step 8; run the same command to resume." in first.stdout
  monkeypatch.setattr(dispatch.ChunkSteps, "__call__", original)
  signals.received.clear()  # the process would have exited here: the next command is a fresh one
  second = run_cli([*args, *ON, f"--workdir={split}"])
  assert "from step 8 of 28" in second.stdout
  assert_same_run(device, split)


def test_one_step_kind_trains_bit_identically_too(tmp_path):
  """CE: every step has the same kind (the chunk's scan has one branch and the skip). Under XLA's default flags the
  device pipeline's run equals the host pipeline's bit for bit, the epoch end's padded chunk included. (It once ran
  that one kind without the conditional: the states then differed in the last bits from the first step on.)"""
  dirs = {mode: str(tmp_path / mode) for mode in ("off", "on")}
  runs = [["train.py", "--config=configs/fashion_mnist.py:ce", *TINY, f"--config.device_pipeline.mode={mode}",
           "--config.device_pipeline.steps_per_dispatch=4", f"--workdir={workdir}"] for mode, workdir in dirs.items()]
  # One process for both runs (one start-up, one evaluation program), under XLA's default flags: not the suite's
  # level 0, under which the two programs compiled alike.
  both = subprocess.run([sys.executable, "-c", f"import sys; from tgeo_jax import cli; "
                         f"sys.exit(max(cli.main(args) for args in {runs!r}))"],
                        cwd=ROOT, env=dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT), capture_output=True, text=True,
                        timeout=300)
  assert both.returncode == 0, both.stderr
  (step_host, host), (step_device, device) = final_arrays(dirs["off"]), final_arrays(dirs["on"])
  assert step_host == step_device == 14 and host.keys() == device.keys()
  for key in host:
    np.testing.assert_array_equal(host[key], device[key], err_msg=key)
  assert comparable_records(dirs["off"]) == comparable_records(dirs["on"])


def test_the_host_pipeline_on_one_and_four_devices_agrees(tiny_teacher, tmp_path):
  """The host pipeline (``device_pipeline.mode=off``) on 1 and 4 devices, KD with crop + flip and a live teacher:
  within 1e-5. (The default, the device pipeline, is what ``tests/test_trainer.py`` and ``tests/test_tgeo.py`` run
  on 1 and 4 devices: the batch gathered on 4 devices from the replicated split, indices sharded.)"""
  common = ["--config=configs/fashion_mnist.py:kd", *TINY, f"--config.teacher.checkpoint={tiny_teacher}",
            "--config.device_pipeline.mode=off", "--config.data.augment=crop_flip", "--config.teacher.cache_logits=off"]
  one, four = str(tmp_path / "one"), str(tmp_path / "four")
  run_cli([*common, f"--workdir={one}"])
  proc = run_cli([*common, f"--workdir={four}"], env={"XLA_FLAGS": device_flags(4)})
  assert "4 device(s), batches built on the host." in proc.stdout
  assert json.load(open(os.path.join(four, "summary.json")))["num_devices"] == 4
  assert_close_runs(one, four)
