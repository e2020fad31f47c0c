"""Score a finished run's model or an imported teacher on the test and validation parts, without training.

    python -m tgeo_jax.evaluate --config=configs/cifar100.py:teacher:resnet32x4 --workdir=TEACHER_DIR
        [--config.data.dir=DIR] [--config.FIELD=VALUE ...]

``--config`` gives the task (the data, its split and preprocessing: the same config the students of this teacher
use, so the parts are theirs); ``--workdir`` the model: the work directory of a finished run or of
``python -m tgeo_jax.import_teacher``, whose checkpoint names its model. The model's own classifier is scored
(eval mode), one line per metric on stdout, e.g.::

    test accuracy 0.7953 (10000 examples)
    test loss 0.8271
    validation accuracy 0.9987 (5000 examples)
    validation loss 0.0049

A teacher whose training data includes the validation part (every imported teacher: the publisher trained on the
whole training split) scores an optimistic validation accuracy; a line says so. Nothing is written. Exit status 2
with one line for bad input (no checkpoint, another class count, an unfinished run).
"""

from __future__ import annotations

import sys

from tgeo_jax.errors import UserError

__all__ = ["evaluate_run", "main"]


def evaluate_run(config, workdir: str, *, log=print) -> dict:
  """``{"test": {"accuracy", "loss", "count"}, "validation": {...}}`` of the model in ``workdir`` on ``config``'s
  task; prints one line per metric through ``log``."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from tgeo_jax import data, losses, methods, models
  from tgeo_jax import teacher as teacher_lib
  methods.validate_config(config)
  ckpt_dir = teacher_lib.checkpoint_dir(workdir)
  meta = teacher_lib.latest_checkpoint_meta(ckpt_dir, "--workdir")
  saved = meta.get("config", {})
  model_name = saved.get("model", {}).get("name")
  method = saved.get("method")
  if method in ("simkd", "atsc"):
    raise UserError(f"--workdir: {workdir!r} is a {method} student, which predicts through its teacher's "
                    "classifier; its test accuracy is in its summary.json (python -m tgeo_jax.compare)")
  if not model_name:
    raise UserError(f"--workdir: {workdir!r}: its checkpoint names no model (not a tgeo_jax run)")
  task = data.load(config.data, seed=config.seed)
  model = teacher_lib.load_teacher_from(model_name, workdir, task.spec, field="--workdir",
                                        dtype=models.compute_dtype(config))

  @jax.jit
  def sums(variables, inputs, labels, mask):
    logits, _ = models.apply(model.graphdef, variables["params"], variables["rest"], inputs, train=False)
    return (jnp.sum(losses.accuracy(logits, labels) * mask),
            jnp.sum(jnp.where(mask > 0, losses.cross_entropy(logits, labels), 0.0)), jnp.sum(mask))

  results = {}
  for name, part in (("test", task.test), ("validation", task.val)):
    if len(part) == 0:
      continue
    batch_size = min(config.eval_batch_size, len(part))
    correct = loss = count = 0.0
    for batch in data.eval_batches(part, batch_size=batch_size):
      c, s, n = jax.device_get(sums(model.variables, batch["inputs"], batch["labels"], batch["mask"]))
      correct, loss, count = correct + float(c), loss + float(s), count + float(n)
    results[name] = {"accuracy": correct / count, "loss": loss / count, "count": int(np.round(count))}
    log(f"{name} accuracy {correct / count:.4f} ({int(count)} examples)")
    log(f"{name} loss {loss / count:.4f}")
  imported = ((model.identity or {}).get("data") or {}).get("imported_from")
  if imported and "validation" in results:
    log("note: an imported teacher was trained on the publisher's whole training split, which holds the validation "
        "part: its validation accuracy is optimistic; the test accuracy is clean")
  return results


def main(argv: list[str] | None = None) -> int:
  from tgeo_jax import cli
  argv = list(sys.argv if argv is None else argv)
  if any(a in ("-h", "--help") for a in argv[1:]):
    print(__doc__)
    return 0
  try:
    config, workdir = cli.parse(argv)
    evaluate_run(config, workdir)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
