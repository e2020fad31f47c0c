"""The path of ``config`` through the package: one tiny in-process run (``cli.run``, the CLI minus flag parsing),
traced with ``sys.setprofile``, from the call into ``cli.run`` to the return of ``summary.json``'s writer.

Following ``config``: only the calls of the package's own functions (main thread) that receive the run's config
or one of its groups (``config.data``, ``config.optimizer``, ...) as an argument are counted:

* functions visited: distinct ``module:function`` names that receive it;
* modules entered: distinct ``tgeo_jax`` modules among them;
* stays: maximal runs of consecutive such calls in one module (a stay ends when the config passes to another
  module);
* returns to a module already left: stays in a module that an earlier stay had already entered;
* climbs: such calls from a module into one above it in the dependency layering (a module's layer is 1 + the
  highest layer of the package modules it imports anywhere or names in a registry string, so a climb is a callback
  running against the arrows, or a cycle);
* the longest functions in the package (lines of ``def`` bodies), and file sizes.

Usage: python bench/config_path.py [--method=kd] [--json=OUT]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "tgeo_jax")


def module_name(path: str) -> str | None:
  path = os.path.abspath(path)
  if not path.startswith(PKG + os.sep) or not path.endswith(".py"):
    return None
  rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
  return rel.removesuffix(".__init__")


def package_modules() -> dict[str, str]:
  out = {}
  for d, _, files in os.walk(PKG):
    for f in files:
      if f.endswith(".py"):
        p = os.path.join(d, f)
        out[module_name(p)] = p
  return out


def layers(modules: dict[str, str]) -> dict[str, int]:
  """1 + the highest layer among the package modules a module depends on (cycles count as 0). A dependency is any
  import of it, at top level or inside a function, or a string naming it (``"tgeo_jax.methods.kd:KD"``: the
  registries' lazy entries), so a call against these arrows is a callback running upwards."""
  import re
  imports = {}
  for name, path in modules.items():
    tree = ast.parse(open(path).read())
    deps = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tgeo_jax"):
        for alias in node.names:
          full = f"{node.module}.{alias.name}"
          deps.add(full if full in modules else node.module)
      elif isinstance(node, ast.Import):
        deps.update(alias.name for alias in node.names if alias.name.startswith("tgeo_jax"))
      elif isinstance(node, ast.Constant) and isinstance(node.value, str):
        match = re.fullmatch(r"(tgeo_jax(?:\.\w+)+)(?::\w+)?", node.value)
        if match:
          deps.add(match.group(1))
    imports[name] = {d for d in deps if d in modules and d != name}
  memo: dict[str, int] = {}

  def layer(m, seen=()):
    if m in memo:
      return memo[m]
    if m in seen:
      return 0
    value = 1 + max((layer(d, (*seen, m)) for d in imports[m]), default=0)
    memo[m] = value
    return value

  return {m: layer(m) for m in modules}


def longest_functions(modules: dict[str, str], top: int = 8):
  rows = []
  for name, path in modules.items():
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        rows.append((node.end_lineno - node.lineno + 1, f"{name}:{node.name}"))
  return sorted(rows, reverse=True)[:top]


def trace_run(method: str):
  sys.path.insert(0, ROOT)
  from configs import fashion_mnist
  from tgeo_jax import cli
  config = fashion_mnist.get_config(method)
  config.data.name, config.data.train_subset = "synthetic", 0
  config.model.name, config.teacher.model = "cnn_tiny", "cnn_tiny"
  config.batch_size, config.val_batch_size, config.eval_batch_size = 32, 32, 64
  config.num_epochs, config.log.progress = 1, False
  workdir = tempfile.mkdtemp(prefix="config_path_")
  if method != "ce":  # a teacher first (untraced)
    teacher_config = fashion_mnist.get_config("teacher")
    teacher_config.data.name, teacher_config.data.train_subset = "synthetic", 0
    teacher_config.model.name, teacher_config.num_epochs, teacher_config.log.progress = "cnn_tiny", 1, False
    teacher_config.batch_size, teacher_config.eval_batch_size = 32, 64
    cli.run(teacher_config, os.path.join(workdir, "teacher"))
    config.teacher.checkpoint = os.path.join(workdir, "teacher")
  events = []  # ("call" | "return", module, function, receives the config)
  code_modules: dict = {}
  groups = {id(config)} | {id(v) for v in config.values() if hasattr(v, "keys")}

  def profiler(frame, event, arg):
    if event not in ("call", "return"):
      return
    code = frame.f_code
    mod = code_modules.get(code.co_filename, "?")
    if mod == "?":
      mod = code_modules[code.co_filename] = module_name(code.co_filename)
    if mod is not None:
      args = [frame.f_locals.get(n) for n in code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]]
      events.append((event, mod, code.co_name, any(id(a) in groups for a in args)))

  sys.setprofile(profiler)
  try:
    status = cli.run(config, os.path.join(workdir, "run"))
  finally:
    sys.setprofile(None)
  assert status == 0, status
  return events


def measure(events, layer, *, following_config: bool):
  """The counts of the module docstring over ``events`` (all calls, or those that receive the config)."""
  kept = [(e, m, f) for e, m, f, has_config in _pair_returns(events) if has_config or not following_config]
  functions = {f"{m}:{f}" for e, m, f in kept if e == "call" and not f.startswith("<")}
  modules = {m for e, m, _ in kept if e == "call"}
  stays, seen, returns, climbs = 0, set(), 0, 0
  current = None
  stack = []
  for event, mod, _ in kept:
    if event == "return":
      if stack:
        stack.pop()
      continue
    if stack and layer.get(mod, 0) > layer.get(stack[-1], 0):
      climbs += 1
    stack.append(mod)
    if mod != current:
      stays += 1
      if mod in seen:
        returns += 1
      seen.add(mod)
      current = mod
  return {"functions_visited": len(functions), "modules_entered": len(modules), "stays": stays,
          "returns_to_a_module_already_left": returns, "climbs": climbs}


def _pair_returns(events):
  """Marks each return like its call (whether that call received the config), so the call stack stays paired."""
  stack, out = [], []
  for event, mod, fn, has_config in events:
    if event == "call":
      stack.append(has_config)
      out.append((event, mod, fn, has_config))
    else:
      out.append((event, mod, fn, stack.pop() if stack else False))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--method", default="kd")
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  modules = package_modules()
  layer = layers(modules)
  events = trace_run(args.method)
  result = measure(events, layer, following_config=True)
  result["longest_functions"] = longest_functions(modules)
  lines = lambda p: sum(1 for _ in open(p))  # noqa: E731
  result["trainer_py_lines"] = lines(os.path.join(PKG, "trainer.py"))
  result["data_lines"] = {os.path.basename(p): lines(p) for m, p in sorted(modules.items())
                          if m.startswith("tgeo_jax.data")}
  result["readme_lines"] = lines(os.path.join(ROOT, "README.md"))
  result["method"] = args.method
  print(json.dumps(result, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
