"""Export a finished run as a weights-only teacher directory (small enough to commit or ship).

    python -m tgeo_jax.export_teacher --workdir=RUN_DIR --out=TEACHER_DIR

A training run's checkpoints hold the optimizer state beside the weights (SGD momentum doubles them) and keep
``checkpoint.max_to_keep`` steps. A teacher needs only the final ``params`` and ``rest`` (BatchNorm statistics):
the export writes exactly those, at the run's final step, with the run's own metadata (model, class count,
``finished``, config and identity), and copies the run files the student's checks read (``config.json``,
``identity.json``, ``membership.npz``: the provenance check of the teacher's training examples against the
student's validation part) and ``summary.json`` / ``metrics.jsonl``. ``--config.teacher.checkpoint=TEACHER_DIR``
then loads the same variables as the run directory would: the export checks that their sha256
(``teacher.variables_sha256``) is unchanged and prints it.

Idempotent: exporting the same run again into the same directory finds it done.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from tgeo_jax import run_identity
from tgeo_jax.errors import UserError

__all__ = ["COPIED", "export_teacher", "main"]

COPIED = (run_identity.CONFIG_FILE, run_identity.IDENTITY_FILE, run_identity.MEMBERSHIP_FILE, "summary.json",
          "metrics.jsonl")


def _variables_digest(ckpt_dir: str, target: dict, what: str) -> tuple[dict, dict, str]:
  from tgeo_jax import checkpoint, teacher
  variables, meta, records = checkpoint.restore_params(ckpt_dir, target, what=what)
  return variables, meta, teacher.variables_digest(records)


def export_teacher(workdir: str, out: str, *, log=print) -> str:
  """Writes the weights-only teacher directory ``out`` from the finished run in ``workdir``; returns the sha256
  of its variables (equal to the run's)."""
  from tgeo_jax import checkpoint, data, models, teacher

  if os.path.lexists(out) and not os.path.isdir(out):
    raise UserError(f"--out: {out!r} is a file, expected a directory to write the teacher into")
  if os.path.isdir(out) and not os.path.isdir(os.path.join(out, "checkpoints")) and \
      [n for n in os.listdir(out) if n != run_identity.LOCK_FILE]:
    raise UserError(f"--out: {out!r} already holds other files ({', '.join(sorted(os.listdir(out))[:3])}, ...) and no "
                    "exported teacher; choose an empty or new directory (nothing was changed)")
  ckpt_dir = teacher.checkpoint_dir(workdir)
  config = run_identity.read_json_file(os.path.join(workdir, run_identity.CONFIG_FILE))
  if config is None:
    raise UserError(f"--workdir: {workdir!r} holds no {run_identity.CONFIG_FILE} (not a run's work directory)")
  meta = teacher.latest_checkpoint_meta(ckpt_dir, "--workdir")  # checks that a checkpoint exists
  if not meta.get("finished", False):
    raise UserError(f"--workdir: the run in {workdir!r} has not finished (step {meta.get('step')} of "
                    f"{meta.get('total_steps')}); finish it first by running its command again")
  import ml_collections
  try:  # the model's input shape and class count come from the task (for Fashion-MNIST, a second's read)
    spec = data.load(ml_collections.ConfigDict(config["data"]), seed=config.get("seed", 0)).spec
  except (KeyError, TypeError) as e:
    raise UserError(f"--workdir: {run_identity.CONFIG_FILE} of {workdir!r} names no usable data config ({e})") from None
  model = models.create(config["model"]["name"], num_classes=spec.num_classes, input_shape=spec.input_shape,
                        **spec.model_kwargs)
  fn = models.split(model)
  target = {"params": fn.params, "rest": fn.rest}
  variables, meta, digest = _variables_digest(ckpt_dir, target, "--workdir")

  out_ckpt = os.path.join(out, "checkpoints")
  if os.path.isdir(out_ckpt):
    _, _, existing = _variables_digest(out_ckpt, target, "--out")
    if existing != digest:
      raise UserError(f"--out: {out!r} already holds another teacher (variables sha256 {existing[:12]}, this run's "
                      f"{digest[:12]}); choose another directory")
    log(f"{out} already holds this teacher (variables sha256 {digest})")
    return digest
  os.makedirs(out, exist_ok=True)
  for name in COPIED:  # the run files first and the checkpoint last: a directory with a checkpoint is complete
    src = os.path.join(workdir, name)
    if os.path.exists(src):
      shutil.copyfile(src, os.path.join(out, name))
  meta = {k: v for k, v in meta.items() if k != checkpoint.INTEGRITY_KEY}
  ckpt = checkpoint.Checkpointer(out_ckpt, max_to_keep=1)
  try:
    ckpt.save(int(meta["step"]), variables, meta)
  finally:
    ckpt.close()
  _, _, written = _variables_digest(out_ckpt, target, "--out")
  if written != digest:  # cannot happen unless the write was corrupted
    raise UserError(f"--out: the exported variables of {out!r} do not read back equal (sha256 {written[:12]} != "
                    f"{digest[:12]})")
  log(f"exported {config['model']['name']} ({models.num_params(variables['params']):,} parameters, step "
      f"{meta['step']}) from {workdir} into {out}: variables sha256 {digest}")
  return digest


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m tgeo_jax.export_teacher", description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="the finished run's work directory")
  p.add_argument("--out", required=True, help="the teacher directory to write")
  return p


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    export_teacher(args.workdir, args.out)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
