"""A pytest plugin: records every XLA compilation of a test session, then compiles each program again under
several sets of XLA options, in turn, in the same process, and reports the CPU and wall time each set took.

    XLA_FLAGS="--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false" \\
    REPLAY_VARIANTS='{"default": [], "split1": [["xla_cpu_parallel_codegen_split_count", 1]]}' \\
    JAX_ENABLE_COMPILATION_CACHE=false PYTHONPATH=bench \\
    .venv/bin/python -m pytest -p no:xdist -p compile_replay tests/test_tgeo.py tests/test_loss_contract.py

``REPLAY_VARIANTS``: a JSON object, name -> list of ``[XLA debug option, value]`` added to each program's own
compile options (only ``DebugOptions`` fields; booleans as JSON booleans). The variants take turns program by
program (the order rotated), so a machine whose speed drifts slows them alike. ``REPLAY_OUT`` (default
``compile_replay.json``): ``{"programs": N, "wall_cpu": {name: [wall s, CPU s]}}``. Run it with the persistent
compilation cache off, so that every program of the session is really compiled (and recorded). This is how the
suite's ``--xla_cpu_parallel_codegen_split_count=1`` (``tests/conftest.py``) was measured. Set ``XLA_FLAGS`` to
the baseline yourself, as above: otherwise the suite's ``conftest.py`` sets its own flags, the split among them, and
every variant starts from those (``test_loss_contract.py`` alone, 878 programs, as above: 8.9 -> 8.1 CPU s).
"""

import json
import os
import time

_recorded = []


def pytest_configure(config):
  del config
  from jax._src import compiler
  original = compiler.backend_compile_and_load

  def recording(backend, module, executable_devices, options, host_callbacks):
    if not host_callbacks:
      _recorded.append((backend, module.operation.get_asm(binary=True), executable_devices,
                        options.SerializeAsString()))
    return original(backend, module, executable_devices, options, host_callbacks)

  compiler.backend_compile_and_load = recording


def pytest_sessionfinish(session):
  del session
  from jax._src.interpreters import mlir
  from jax._src.lib import xla_client as xc
  from jax._src.lib.mlir import ir
  variants = json.loads(os.environ.get("REPLAY_VARIANTS", '{"default": []}'))
  names = list(variants)
  totals = {name: [0.0, 0.0] for name in names}
  context = mlir.make_ir_context()
  for i, (backend, asm, devices, options) in enumerate(_recorded):
    for name in names[i % len(names):] + names[:i % len(names)]:
      with context:
        module = ir.Module.parse(asm)
      compile_options = xc.CompileOptions.ParseFromString(options)
      compile_options.env_option_overrides = (list(compile_options.env_option_overrides)
                                              + [tuple(kv) for kv in variants[name]])
      wall, cpu = time.perf_counter(), time.process_time()
      backend.compile_and_load(module, executable_devices=devices, compile_options=compile_options)
      totals[name][0] += time.perf_counter() - wall
      totals[name][1] += time.process_time() - cpu
  with open(os.environ.get("REPLAY_OUT", "compile_replay.json"), "w") as f:
    json.dump({"programs": len(_recorded), "wall_cpu": totals}, f, indent=1)
