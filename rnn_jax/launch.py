"""Start a multi-process run on this machine: N copies of a script joined by ``jax.distributed``.

  python -m rnn_jax.launch --processes=2 -- experiments/char_lm.py --smoke --workdir=runs/two

Each copy gets ``--coordinator_address=127.0.0.1:<free port> --num_processes=N --process_id=i``
(the run flags of every experiment script, see ``rnn_jax.mesh.initialize_distributed``).
``--cpu_devices_per_process=K`` sets ``JAX_NUM_CPU_DEVICES=K`` in each copy, to try a mesh of
N x K CPU devices on one machine. Process 0's output is shown; the others' is kept in
``<log_dir>/process_<i>.log`` when a log directory is given and otherwise discarded, apart
from the last lines of a process that fails. If any process fails, the others are stopped and
the launcher exits with the failing process's code; ``--timeout_s`` bounds the whole run.

On several machines there is nothing to launch from one place: start the script on every
host with the same ``--coordinator_address`` (host 0's address) and ``--num_processes``, and
each host's own ``--process_id`` (docs/design.md, "One device, many devices, many hosts").
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence


def free_port() -> int:
  """A TCP port on 127.0.0.1 that is free now."""
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def launch(command: Sequence[str], processes: int, *, cpu_devices_per_process: int = 0, timeout_s: float = 600,
           log_dir: Optional[str] = None, port: int = 0) -> int:
  """Run ``command`` (a script and its flags) as ``processes`` joined processes; returns the exit code.

  The exit code is 0 when every process succeeds, else the first failing process's code
  (124 when ``timeout_s`` passed). Every process is gone when this returns.
  """
  if processes < 1:
    raise ValueError(f"processes must be >= 1, got {processes}")
  if not command:
    raise ValueError("no command to launch: give a script and its flags after --")
  port = port or free_port()
  env = dict(os.environ)
  if cpu_devices_per_process:
    env["JAX_NUM_CPU_DEVICES"] = str(cpu_devices_per_process)
  own_logs = log_dir is None
  log_dir = log_dir or tempfile.mkdtemp(prefix="rnn_jax_launch_")
  os.makedirs(log_dir, exist_ok=True)
  script = list(command)
  if script[0].endswith(".py"):
    script = [sys.executable, *script]
  children, logs = [], []
  try:
    for index in range(processes):
      flags = [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
               f"--process_id={index}"]
      if index == 0:
        output = None  # process 0 speaks for the run on this terminal
      else:
        output = open(os.path.join(log_dir, f"process_{index}.log"), "w")
        logs.append(output)
      children.append(subprocess.Popen([*script, *flags], env=env, stdout=output,
                                       stderr=subprocess.STDOUT if output else None))
    deadline = time.monotonic() + timeout_s
    code = 0
    while any(child.poll() is None for child in children):
      failed = [child for child in children if child.poll() not in (None, 0)]
      if failed:
        code = failed[0].returncode
        break
      if time.monotonic() > deadline:
        print(f"launch: timed out after {timeout_s:.0f} s; stopping every process", file=sys.stderr)
        code = 124
        break
      time.sleep(0.1)
    else:
      code = next((child.returncode for child in children if child.returncode), 0)
    if code:
      for index, child in enumerate(children):
        if index and child.returncode not in (None, 0):
          _show_tail(os.path.join(log_dir, f"process_{index}.log"), index)
    return code
  finally:
    for child in children:
      if child.poll() is None:
        child.terminate()
    for child in children:
      try:
        child.wait(timeout=10)
      except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    for handle in logs:
      handle.close()
    if own_logs:
      for name in os.listdir(log_dir):
        os.remove(os.path.join(log_dir, name))
      os.rmdir(log_dir)


def _show_tail(path: str, index: int, lines: int = 15) -> None:
  try:
    with open(path) as handle:
      tail = handle.readlines()[-lines:]
  except OSError:
    return
  print(f"launch: process {index} failed; its last lines:\n" + "".join(tail), file=sys.stderr, end="")


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m rnn_jax.launch", description=__doc__.split("\n\n")[0])
  parser.add_argument("--processes", type=int, default=2, help="Number of processes to start.")
  parser.add_argument("--cpu_devices_per_process", type=int, default=0,
                      help="JAX_NUM_CPU_DEVICES of each process (0: leave it unset).")
  parser.add_argument("--timeout_s", type=float, default=600, help="Stop every process after this long.")
  parser.add_argument("--log_dir", default=None, help="Keep the output of processes 1.. here.")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- script.py and its flags")
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  try:
    return launch(command, args.processes, cpu_devices_per_process=args.cpu_devices_per_process,
                  timeout_s=args.timeout_s, log_dir=args.log_dir)
  except ValueError as error:
    print(f"launch: error: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
