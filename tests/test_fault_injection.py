"""Faults injected into real runs: kill -9 during saves, SIGINT / SIGTERM, a second run in the same
workdir, a full disk, a corrupt latest checkpoint. After each, what was saved before is intact and
the resumed run ends exactly as the uninterrupted one."""

import contextlib
import errno
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import experiment_module
from rnn_jax import checkpoint
from rnn_jax.checkpoint import CheckpointManager, CheckpointSaveError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------
# kill -9 at random points of a save
# ---------------------------------------------------------------------------

# Imports once, before any JAX backend exists, then forks one saver per kill: the saver saves
# state_at(1), state_at(2), ... (keep=2 plus the best) until it is killed, either after a seeded
# random delay or at a named point of its 3rd save. Prints "<name> <signal>" per saver.
ZYGOTE = r'''
import json, os, signal, sys, time
import numpy as np
import optax
from rnn_jax import checkpoint
from rnn_jax.train import TrainState

def state_at(step):
  """The train state an uninterrupted run saves at ``step`` (params and Adam moments)."""
  r = np.random.default_rng(step)
  params = {"w_hh": r.standard_normal((32, 8), np.float32), "b": r.standard_normal((32,), np.float32),
            "embed": r.standard_normal((13, 4), np.float32)}
  moment = lambda: {k: r.standard_normal(v.shape, np.float32) for k, v in params.items()}
  opt = (optax.ScaleByAdamState(count=np.int32(step), mu=moment(), nu=moment()), optax.EmptyState())
  return TrainState(params=params, opt_state=opt, step=np.int32(step), rng=np.array([0, step], np.uint32))

def loss_at(step):
  return float((step * 7919) % 13)

def die(*args, **kwargs):
  os.kill(os.getpid(), signal.SIGKILL)

def save_until_killed(directory, point, ready):
  import jax
  parent = os.getppid()
  manager = checkpoint.CheckpointManager(directory, keep=2, best_metric="loss")
  third = os.path.join(directory, "3")
  if point == "before_manifest":       # orbax has renamed <3>, the manifest is not written
    write = checkpoint._write_checksums
    checkpoint._write_checksums = lambda d: die() if d == third else write(d)
  elif point == "manifest_not_renamed":  # the manifest's temporary file is written, not renamed
    replace = os.replace
    os.replace = lambda a, b: die() if b == os.path.join(third, checkpoint.CHECKSUMS) else replace(a, b)
  elif point == "removing_old_steps":  # half-way through deleting the first old step
    rmtree = checkpoint.shutil.rmtree
    def half_then_die(path, *args, **kwargs):
      if not path.endswith(".removing"):
        return rmtree(path, *args, **kwargs)
      for root, _, names in os.walk(path):
        for name in names[::2]:
          os.remove(os.path.join(root, name))
      die()
    checkpoint.shutil.rmtree = half_then_die
  step = 0
  while os.getppid() == parent:  # never outlive the zygote
    step += 1
    state = jax.tree_util.tree_map(jax.numpy.asarray, state_at(step))
    manager.save(step, state, extra={"step": step}, metrics={"loss": loss_at(step)})
    if step == 1:
      os.write(ready, b"1")

if __name__ == "__main__":
  root, plan = sys.argv[1], json.loads(sys.argv[2])
  for name, delay, point in plan:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
      os.close(read_end)
      try:
        save_until_killed(os.path.join(root, name), point, write_end)
      finally:
        os._exit(3)
    os.close(write_end)
    os.read(read_end, 1)  # the first save is complete (or the saver died)
    os.close(read_end)
    if not point:
      time.sleep(delay)
      os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    print(name, os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status), flush=True)
'''


def zygote_namespace():
  namespace = {"__name__": "zygote"}
  exec(compile(ZYGOTE, "zygote", "exec"), namespace)
  return namespace


def test_kill_9_at_random_points_of_a_save_leaves_only_complete_steps_that_restore_exactly(tmp_path):
  """23 savers killed with SIGKILL: 20 after a seeded random delay (inside orbax's write, between
  its rename and the manifest, during the removal of old steps, ...), 3 at named points. After
  each kill the manager lists only complete steps (the rest are orbax tmp directories or steps
  without a manifest), the latest one restores bit for bit equal to the state the uninterrupted
  run saved at that step, and saving goes on from there."""
  plan = [[f"random{seed}", random.Random(seed).uniform(0.0, 0.25), ""] for seed in range(20)]
  plan += [[point, 0.0, point] for point in ("before_manifest", "manifest_not_renamed", "removing_old_steps")]
  done = subprocess.run([sys.executable, "-c", ZYGOTE, str(tmp_path), json.dumps(plan)], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.split() == [word for name, _, _ in plan for word in (name, str(int(signal.SIGKILL)))]
  zygote = zygote_namespace()
  state_at, loss_at = zygote["state_at"], zygote["loss_at"]
  target = jax.tree_util.tree_map(jax.numpy.asarray, state_at(0))
  unfinished = 0
  for name, _, point in plan:
    directory = tmp_path / name
    manager = CheckpointManager(str(directory), keep=2, best_metric="loss")
    steps = manager.all_steps()
    on_disk = sorted(int(n) for n in os.listdir(directory) if n.isdigit())
    status = {step: checkpoint._inspect(str(directory / str(step)))[0] for step in on_disk}
    assert steps and all(status[step] == "complete" for step in steps), (name, status)
    assert all(status[step] == "unfinished" for step in set(on_disk) - set(steps)), (name, status)
    unfinished += len(set(on_disk) - set(steps))
    if point in ("before_manifest", "manifest_not_renamed"):
      assert steps == [1, 2] and status[3] == "unfinished", (name, status)
    if point == "removing_old_steps":  # killed deleting step 2, already renamed away
      assert steps == [1, 3, 4] and os.path.isdir(directory / "2.removing"), (name, status)
    for step in steps:
      checkpoint.verify_checksums(str(directory / str(step)))
    restored, extra = manager.restore(target)
    assert extra == {"step": steps[-1]}, name
    for got, want in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state_at(steps[-1]))):
      assert np.asarray(got).dtype == want.dtype and np.array_equal(np.asarray(got), want), name
    after = max(on_disk) + 1  # training goes on: an unfinished step in the way is replaced
    for step in range(steps[-1] + 1, after + 1):
      manager.save(step, jax.tree_util.tree_map(jax.numpy.asarray, state_at(step)), extra={"step": step},
                   metrics={"loss": loss_at(step)})
    assert manager.latest_step() == after
    leftovers = [n for n in os.listdir(directory) if ".orbax-checkpoint-tmp" in n or n.endswith(".removing")]
    assert not leftovers, (name, leftovers)
  assert unfinished >= 2  # the named points, at least, left a step without its manifest


# ---------------------------------------------------------------------------
# Signals, the workdir lock and a corrupt latest step, on a real experiment
# ---------------------------------------------------------------------------

FLAGS = ["--smoke", "--steps=40", "--eval_every=10", "--progress=false"]  # learns at step 30

# experiments/hello.py with a signal sent to itself at a chosen point: before step AT's batch
# ("train"), or inside the save of step AT, after orbax's write and before the manifest ("save").
# It first writes READY and, if GO is given, waits for that file.
SIGNALLER = r'''
import os, signal, sys, time
from experiments import common, hello
from rnn_jax import checkpoint
mode, at, name, ready, go = sys.argv[1:6]
at, number = int(at), getattr(signal, name)

def pause_then_signal():
  open(ready, "w").close()
  deadline = time.time() + 120
  while go and not os.path.exists(go) and time.time() < deadline:
    time.sleep(0.02)
  os.kill(os.getpid(), number)

if mode == "train":
  next_batch, served = hello.RepeatBatch.__next__, [0]
  def counted(self):
    served[0] += 1
    if served[0] == at:
      pause_then_signal()
    return next_batch(self)
  hello.RepeatBatch.__next__ = counted
else:
  write = checkpoint._write_checksums
  def signalled(step_dir):
    if os.path.basename(step_dir) == str(at):
      pause_then_signal()
    write(step_dir)
  checkpoint._write_checksums = signalled
sys.argv = ["hello.py", *sys.argv[6:]]
common.main(hello.EXPERIMENT)
'''


def hello(*argv) -> tuple[int, str]:
  """experiments/hello.py in this process: (exit code, stderr)."""
  from experiments import common
  err = io.StringIO()
  with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
    code = common.run(experiment_module("hello").EXPERIMENT, list(argv))
  return code, err.getvalue()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The uninterrupted run."""
  workdir = str(tmp_path_factory.mktemp("straight") / "run")
  code, err = hello(*FLAGS, f"--workdir={workdir}")
  assert code == 0, err[-3000:]
  return workdir


def outcome(workdir):
  """results.json and metrics.jsonl without wall times and resume markers."""
  results = json.load(open(os.path.join(workdir, "results.json")))
  results = {k: v for k, v in results.items() if k not in ("wall_time_s", "device", "resumed_from_step",
                                                            "final_train")}
  records = [{k: v for k, v in json.loads(line).items() if k != "time_s"}
             for line in open(os.path.join(workdir, "metrics.jsonl")) if '"resume"' not in line]
  return results, records


def start_signaller(workdir, mode, at, name, ready, go=""):
  command = [sys.executable, "-c", SIGNALLER, mode, str(at), name, ready, go, *FLAGS, f"--workdir={workdir}"]
  return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def snapshot(workdir):
  """{relative path: bytes} of every file under ``workdir``."""
  files = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as handle:
        files[os.path.relpath(path, workdir)] = handle.read()
  return files


def wait_for(path, process, timeout=120):
  deadline = time.time() + timeout
  while not os.path.exists(path):
    assert process.poll() is None, process.stderr.read()[-3000:]
    assert time.time() < deadline, f"{path} never appeared"
    time.sleep(0.05)


def finish(process, timeout=120):
  try:
    _, err = process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    process.communicate()
    raise
  return process.returncode, err


def test_sigterm_during_training_with_a_second_run_refused_then_resume_matches(straight, tmp_path):
  """A real run, stopped at step 5 by SIGTERM: while it is alive, a second process training into
  the same workdir is refused at once with the lock message and changes nothing; the run exits
  143 with one line and a checkpoint at step 5 (none was due there), and --resume ends with the
  uninterrupted run's results and metrics (step 5 is a log step, so every logged mean covers the
  same steps as in the uninterrupted run)."""
  workdir = str(tmp_path / "run")
  ready, go = str(tmp_path / "ready"), str(tmp_path / "go")
  process = start_signaller(workdir, "train", 5, "SIGTERM", ready, go)
  try:
    wait_for(ready, process)
    before = snapshot(workdir)
    code, err = hello(*FLAGS, f"--workdir={workdir}", "--overwrite")
    refusal = f"hello: error: {workdir} is in use by another process (pid {process.pid}); wait for it to end"
    assert code == 2 and refusal in err, err
    assert snapshot(workdir) == before  # the lock (A's pid), config.json, ... untouched
    open(go, "w").close()
    code, err = finish(process)
  finally:
    if process.poll() is None:
      process.kill()
      process.communicate()
  assert code == 128 + signal.SIGTERM, err[-3000:]
  assert f"hello: stopped by SIGTERM at step 5: checkpoint saved in {workdir}; continue with: python " \
         f"experiments/hello.py --workdir={workdir} --resume" == err.strip().splitlines()[-1]
  assert CheckpointManager(os.path.join(workdir, "checkpoints")).all_steps() == [5]
  code, err = hello(f"--workdir={workdir}", "--resume")
  assert code == 0, err[-3000:]
  assert json.load(open(os.path.join(workdir, "results.json")))["resumed_from_step"] == 5
  assert outcome(workdir) == outcome(straight)


def test_sigint_during_a_save_then_resume_or_fall_back_past_a_corrupt_step(straight, tmp_path, caplog):
  """SIGINT arrives inside the save of step 20, between orbax's write and the manifest: the save
  completes, the run exits 130, and --resume ends as the uninterrupted run. A copy whose step 20
  is then truncated is refused (one line naming step 20 and offering step 10), and with
  --checkpoint_fallback resumes from step 10, keeps the bad step aside, and still ends the same."""
  workdir = str(tmp_path / "run")
  process = start_signaller(workdir, "save", 20, "SIGINT", str(tmp_path / "ready"))
  code, err = finish(process)
  assert code == 128 + signal.SIGINT, err[-3000:]
  assert err.strip().splitlines()[-1].startswith("hello: stopped by SIGINT at step 20: checkpoint saved")
  checkpoints = os.path.join(workdir, "checkpoints")
  assert CheckpointManager(checkpoints).all_steps() == [10, 20]
  checkpoint.verify_checksums(os.path.join(checkpoints, "20"))
  damaged = str(tmp_path / "damaged")
  shutil.copytree(workdir, damaged)
  code, err = hello(f"--workdir={workdir}", "--resume")
  assert code == 0, err[-3000:]
  assert outcome(workdir) == outcome(straight)

  step_dir = os.path.join(damaged, "checkpoints", "20")
  files = [os.path.join(r, n) for r, _, names in os.walk(os.path.join(step_dir, "state")) for n in names]
  largest = max(files, key=os.path.getsize)
  size = os.path.getsize(largest)
  os.truncate(largest, size // 2)
  code, err = hello(f"--workdir={damaged}", "--resume")
  relative = os.path.relpath(largest, step_dir)
  assert code == 2 and err.strip() == (
      f"hello: error: checkpoint {step_dir} is corrupt: {relative} has {size // 2} of its {size} bytes "
      f"(truncated); step 10 is the newest earlier step that verifies: pass --resume --checkpoint_fallback "
      f"to continue from it, or delete {step_dir}"), err
  with caplog.at_level("WARNING"):
    code, err = hello(f"--workdir={damaged}", "--resume", "--checkpoint_fallback")
  assert code == 0, err[-3000:]
  assert re.search(r"checkpoint step 20 is corrupt \(.* \(truncated\)\); falling back to step 10, the newest "
                   r"step that verifies \(checkpoint_fallback\); the bad step is kept as \S+/20\.corrupt-",
                   caplog.text)
  aside = [n for n in os.listdir(os.path.join(damaged, "checkpoints")) if n.startswith("20.corrupt-")]
  assert len(aside) == 1, os.listdir(os.path.join(damaged, "checkpoints"))
  assert json.load(open(os.path.join(damaged, "results.json")))["resumed_from_step"] == 10
  assert outcome(damaged) == outcome(straight)


# ---------------------------------------------------------------------------
# A full disk, a read-only or forbidden directory
# ---------------------------------------------------------------------------

def failing_json_write(number, when=lambda directory: True):
  """orbax's JSON item write (extra, metrics), failing with OSError(number) after writing a few bytes."""
  real = ocp.JsonCheckpointHandler._save_fn

  async def write(self, item, directory):
    if not when(str(directory)):
      return await real(self, item, directory)
    path = directory / self._filename
    with open(path, "w") as handle:
      handle.write('{"da')
    raise OSError(number, os.strerror(number), str(path))

  return write


def test_a_full_disk_during_a_save_stops_the_run_with_one_line(tmp_path, monkeypatch):
  """No space left while saving step 20 (inside orbax's write): exit 2, one line naming the
  checkpoint directory and what to do, no trace of step 20, step 10 intact."""
  workdir = str(tmp_path / "run")
  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn",
                      failing_json_write(errno.ENOSPC, when=lambda d: f"{os.sep}20." in d))
  code, err = hello(*FLAGS, f"--workdir={workdir}")
  monkeypatch.undo()
  checkpoints = os.path.join(workdir, "checkpoints")
  assert code == 2 and err.strip() == (
      f"hello: error: checkpoint step 20 not saved: the disk is full at {checkpoints} (no space left on "
      f"device); free space there or choose another workdir; the earlier checkpoints are kept (latest: step "
      f"10)"), err
  assert sorted(os.listdir(checkpoints)) == ["10"]
  checkpoint.verify_checksums(os.path.join(checkpoints, "10"))


def test_failed_writes_name_the_directory_and_keep_the_earlier_steps_bit_exact(tmp_path, monkeypatch):
  """ENOSPC at the manifest (after orbax's part), EROFS and EACCES inside orbax's write, and a
  TensorStore-style error whose text carries the OS error: each raises one CheckpointSaveError
  line, chained to the OS error, leaves nothing of the failed step, and the earlier steps restore
  bit for bit."""
  state_at = zygote_namespace()["state_at"]
  as_jax = lambda step: jax.tree_util.tree_map(jax.numpy.asarray, state_at(step))
  directory = tmp_path / "ckpt"
  manager = CheckpointManager(str(directory), keep=3)
  for step in (1, 2):
    manager.save(step, as_jax(step), extra={"step": step})
  kept = "the earlier checkpoints are kept (latest: step 2)"

  def manifest_full(step_dir):
    path = os.path.join(step_dir, checkpoint.CHECKSUMS + ".tmp1")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

  async def tensorstore_full(self, directory, *args, **kwargs):
    raise ValueError(f'UNKNOWN: Error writing local file "{directory}/d/0a1b": No space left on device '
                     '[OS error 28] [tensorstore_spec=\'{"driver":"zarr"}\']')

  json_write = (ocp.JsonCheckpointHandler, "_save_fn")
  cases = [
      ("manifest", (checkpoint, "_write_checksums", manifest_full), errno.ENOSPC,
       f"the disk is full at {directory} (no space left on device); free space there or choose another "
       f"workdir"),
      ("read-only", (*json_write, failing_json_write(errno.EROFS)), errno.EROFS,
       f"the file system at {directory} is read-only; choose a writable workdir"),
      ("forbidden", (*json_write, failing_json_write(errno.EACCES)), errno.EACCES,
       f"permission denied at {directory}; make it writable or choose another workdir"),
      ("tensorstore", (ocp.StandardCheckpointHandler, "async_save", tensorstore_full), errno.ENOSPC,
       f"the disk is full at {directory} (no space left on device)"),
  ]
  for name, patch, number, advice in cases:
    monkeypatch.setattr(*patch)
    with pytest.raises(CheckpointSaveError) as caught:
      manager.save(3, as_jax(3), extra={"step": 3})
    monkeypatch.undo()
    message = str(caught.value)
    assert message.startswith(f"checkpoint step 3 not saved: {advice}"), (name, message)
    assert message.endswith(kept), (name, message)
    assert "\n" not in message and caught.value.errno == number and caught.value.__cause__ is not None, name
    assert sorted(os.listdir(directory)) == ["1", "2"], (name, os.listdir(directory))
  reopened = CheckpointManager(str(directory), keep=3)
  assert reopened.all_steps() == [1, 2]
  for step in (1, 2):
    restored, extra = reopened.restore(as_jax(0), step=step)
    assert extra == {"step": step}
    for got, want in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state_at(step))):
      assert np.array_equal(np.asarray(got), want)
  manager.save(3, as_jax(3), extra={"step": 3})  # the same manager saves again once the fault is gone
  assert reopened.all_steps() == [1, 2, 3]
