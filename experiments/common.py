"""What every experiment script shares: config flags, run flags, run setup and error handling.

An experiment module declares ``Config`` (a frozen dataclass, see ``rnn_jax.config``),
``PRESETS``, ``SMOKE`` and ``train_and_evaluate(config, workdir, options)``, and ends with::

  EXPERIMENT = common.Experiment("char_lm", Config, train_and_evaluate, PRESETS, SMOKE, __doc__)
  if __name__ == "__main__":
    common.main(EXPERIMENT)

Flags. Every config field is a flag of the same name (``--hidden_size=128``), typed from the
field, with its help text; tuples are comma-separated lists. The run flags are the same in
every script: ``--workdir`` (default ``runs/<experiment>[_<preset>][_smoke]``), ``--preset``,
``--smoke``, ``--resume`` (with ``--checkpoint_fallback`` to continue from the newest checkpoint
that verifies when the latest is corrupt), ``--overwrite``, ``--progress`` and ``--tensorboard``; for a run over
several processes, ``--distributed`` (auto-detected TPU slice, Slurm or Open MPI) or
``--coordinator_address``, ``--num_processes`` and ``--process_id`` (``rnn_jax.mesh``).

Precedence: field defaults < ``--preset`` < ``--smoke`` < flags given on the command line.
``--resume`` reads the run's own config from the workdir; flags given with it may change
only fields that are not fixed (architecture and data are), e.g. ``--steps`` to train longer.

Errors. A bad flag value, an unknown name, an existing run, a missing file: one line on
stderr naming the problem and exit code 2. SIGINT / SIGTERM: a checkpoint is saved at the
current step and one line says how to resume. Anything else is a bug and keeps its traceback
(``RNN_JAX_TRACEBACK=1`` shows tracebacks for user errors too).

The binder is written here over absl rather than taken from ``ml_collections.config_flags``;
docs/design.md says why (help for every field, list parsing, frozen dataclasses).
"""

from __future__ import annotations

import dataclasses
import logging as python_logging
import os
import shlex
import sys
from typing import Any, Callable, Mapping, Optional

from absl import app, flags, logging

from rnn_jax import config as config_lib
from rnn_jax import rundir
from rnn_jax.checkpoint import CheckpointError
from rnn_jax.mesh import ProcessGroupError
from rnn_jax.rundir import RunExistsError, RunOptions
from rnn_jax.train import Interrupted

RUN_FLAGS = ("workdir", "preset", "smoke", "resume", "overwrite", "progress", "tensorboard",
             "checkpoint_fallback", "distributed", "coordinator_address", "num_processes", "process_id")
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
               NotADirectoryError, CheckpointError, ImportError, UnicodeDecodeError, FloatingPointError,
               ProcessGroupError)


@dataclasses.dataclass(frozen=True)
class Experiment:
  """An experiment script's declaration.

  name: the experiment (run directories, results.json); config_class: its frozen Config;
  train_and_evaluate(config, workdir, options) -> results; presets: {name: {field: value}};
  smoke: the field values of a seconds-long run of the same code path; doc: the module
  docstring (the script's --help). define_flags(flag_values): extra flags of an inference
  mode; infer(flag_values, workdir) -> bool: run that mode if its flags ask for it.
  """
  name: str
  config_class: type
  train_and_evaluate: Callable[..., Any]
  presets: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  smoke: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  doc: str = ""
  define_flags: Optional[Callable[[flags.FlagValues], None]] = None
  infer: Optional[Callable[[flags.FlagValues, str], bool]] = None


# ---------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------

def _list_parser(inner: type, name: str):
  def parse(values):
    out = []
    for value in values:
      try:
        out.append(inner(value) if inner is not bool else value.lower() in ("1", "true", "yes"))
      except ValueError:
        raise flags.ValidationError(f"--{name}: {value!r} is not a {inner.__name__}") from None
    return tuple(out)
  return parse


def define_config_flags(config_class, flag_values: flags.FlagValues, module_name: str) -> None:
  """One absl flag per config field: same name, type from the annotation, help from the field."""
  defaults = config_class()
  for name, annotation in config_lib.field_types(config_class).items():
    info = config_lib.field_info(config_class, name)
    default = getattr(defaults, name)
    help_text = info["help"] or name
    if info["fixed"]:
      help_text += " (kept on --resume)"
    kwargs = dict(flag_values=flag_values, module_name=module_name)
    inner = config_lib.element_type(annotation)
    if inner is not None:
      flags.DEFINE_list(name, [str(v) for v in default], help_text + " Comma-separated.", **kwargs)
    elif annotation is bool:
      flags.DEFINE_bool(name, default, help_text, **kwargs)
    elif annotation is int:
      flags.DEFINE_integer(name, default, help_text, **kwargs)
    elif annotation is float:
      flags.DEFINE_float(name, default, help_text, **kwargs)
    elif info["choices"] is not None:
      flags.DEFINE_enum(name, default, list(info["choices"]), help_text, **kwargs)
    else:
      flags.DEFINE_string(name, default, help_text, **kwargs)


def define_run_flags(experiment: Experiment, flag_values: flags.FlagValues, module_name: str) -> None:
  """The run flags every script has, with the same names and meanings."""
  kwargs = dict(flag_values=flag_values, module_name=module_name)
  flags.DEFINE_string("workdir", None, f"Run directory (default: runs/{experiment.name}, plus "
                      f"_<preset> and _smoke when given).", **kwargs)
  flags.DEFINE_enum("preset", None, sorted(experiment.presets) or ["none"],
                    "A named configuration; explicit flags still override it.", **kwargs)
  flags.DEFINE_bool("smoke", False, "A seconds-long run of the same code path (explicit flags override).",
                    **kwargs)
  flags.DEFINE_bool("resume", False, "Continue the run in --workdir with its saved config.", **kwargs)
  flags.DEFINE_bool("overwrite", False, "Delete the run in --workdir and start again.", **kwargs)
  flags.DEFINE_bool("progress", True, "Show a progress bar with the loss and tokens/s.", **kwargs)
  flags.DEFINE_bool("tensorboard", False, "Also write TensorBoard event files (needs tensorboardX).",
                    **kwargs)
  flags.DEFINE_bool("checkpoint_fallback", False, "With --resume: if the latest checkpoint is corrupt, "
                    "continue from the newest step that verifies (the bad step is moved aside, not deleted).",
                    **kwargs)
  flags.DEFINE_bool("distributed", False, "Join a multi-process run that JAX detects itself (a Cloud TPU "
                    "slice, a Slurm allocation, an Open MPI launch).", **kwargs)
  flags.DEFINE_string("coordinator_address", "", "host:port of process 0 in a multi-process run named "
                      "explicitly (with --num_processes and --process_id).", **kwargs)
  flags.DEFINE_integer("num_processes", 0, "Number of processes of a multi-process run (0: one process).",
                       **kwargs)
  flags.DEFINE_integer("process_id", -1, "This process's index in [0, --num_processes) (-1: one process).",
                       **kwargs)


def define_input_flag(flag_values: flags.FlagValues, name: str, action: str, unit: str = "text") -> None:
  """An inference flag that reads its inputs the same way in every script: ``--<name>=TEXT``,
  ``@FILE`` (one per line) or ``-`` (standard input, one per line); see ``rnn_jax.predict``."""
  flags.DEFINE_string(name, None, f"{action} with the run in --workdir instead of training: the {unit} "
                      f"itself, @FILE (one {unit} per line) or - (standard input, one per line).",
                      flag_values=flag_values)


def define_all_flags(experiment: Experiment, flag_values: flags.FlagValues) -> None:
  module_name = sys.argv[0] if flag_values is flags.FLAGS else experiment.name
  define_config_flags(experiment.config_class, flag_values, module_name)
  define_run_flags(experiment, flag_values, module_name)
  if experiment.define_flags is not None:
    experiment.define_flags(flag_values)


def explicit_values(experiment: Experiment, flag_values: flags.FlagValues) -> dict:
  """{field: value} of the config flags given on the command line, typed as the config's fields."""
  values = {}
  for name, annotation in config_lib.field_types(experiment.config_class).items():
    flag = flag_values[name]
    if not flag.present:
      continue
    inner = config_lib.element_type(annotation)
    values[name] = _list_parser(inner, name)(flag.value) if inner is not None else flag.value
  return values


def default_workdir(experiment: Experiment, preset: Optional[str], smoke: bool) -> str:
  """runs/<experiment>[_<preset>][_smoke], relative to the current directory."""
  name = experiment.name + (f"_{preset}" if preset else "") + ("_smoke" if smoke else "")
  return os.path.join("runs", name)


@dataclasses.dataclass(frozen=True)
class Parsed:
  """The outcome of parsing a command line: the config, the workdir and the run options."""
  config: Any
  workdir: str
  options: RunOptions
  flag_values: flags.FlagValues
  notes: tuple = ()


def resolve(experiment: Experiment, flag_values: flags.FlagValues) -> Parsed:
  """The config, workdir and options the parsed flags describe (see the module docstring)."""
  explicit = explicit_values(experiment, flag_values)
  preset = flag_values.preset if flag_values.preset != "none" else None
  if preset and preset not in experiment.presets:
    raise ValueError(f"--preset={preset}: {experiment.name} has no presets")
  workdir = flag_values.workdir or default_workdir(experiment, preset, flag_values.smoke)
  config_path = os.path.join(workdir, "config.json")
  notes: tuple = ()
  if flag_values.resume and os.path.exists(config_path):
    saved = rundir.read_json(config_path)
    if flag_values["preset"].present or flag_values["smoke"].present:
      raise ValueError("--resume continues the saved config; --preset and --smoke cannot change it")
    config, changes = config_lib.resumed(experiment.config_class, saved.get("config", {}), explicit)
    notes = tuple(changes)
    preset, smoke = saved.get("preset"), bool(saved.get("smoke"))
  else:
    config = config_lib.resolve(experiment.config_class, presets=experiment.presets, preset=preset,
                                smoke=flag_values.smoke, smoke_values=experiment.smoke, explicit=explicit)
    smoke = flag_values.smoke
  options = RunOptions(resume=flag_values.resume, overwrite=flag_values.overwrite,
                       progress=flag_values.progress, tensorboard=flag_values.tensorboard,
                       preset=preset, smoke=smoke, checkpoint_fallback=flag_values.checkpoint_fallback)
  return Parsed(config=config, workdir=workdir, options=options, flag_values=flag_values, notes=notes)


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------

def _one_line(error: BaseException) -> str:
  if isinstance(error, RunExistsError):
    text = str(error).replace("continue it with resume=True", "pass --resume to continue it").replace(
        "replace it with overwrite=True", "--overwrite to replace it")
  elif isinstance(error, CheckpointError):
    text = str(error).replace("resume with checkpoint_fallback=True", "pass --resume --checkpoint_fallback")
  else:
    text = str(error) or type(error).__name__
  return " ".join(part.strip() for part in text.splitlines() if part.strip())


def quiet_jax_logs() -> None:
  """Hide JAX's INFO lines about backends it could not start (no TPU on this machine, ...)."""
  for name in ("jax._src.xla_bridge", "jax._src.compiler", "jax._src.dispatch"):
    python_logging.getLogger(name).setLevel(python_logging.WARNING)


def _resume_command(experiment: Experiment, workdir: str) -> str:
  script = os.path.join("experiments", f"{experiment.name}.py")
  return f"python {script} --workdir={shlex.quote(workdir)} --resume"


def join_processes(flag_values: flags.FlagValues) -> None:
  """``jax.distributed.initialize`` when the run flags ask for several processes; in every
  process but 0, only warnings and errors are logged."""
  from rnn_jax import mesh
  if mesh.initialize_distributed(flag_values.coordinator_address, flag_values.num_processes,
                                 flag_values.process_id, auto=flag_values.distributed):
    import jax
    if jax.process_index() != 0:  # process 0 speaks for the run
      logging.set_verbosity(logging.WARNING)
      sys.stdout = open(os.devnull, "w")
    logging.info("process %d of %d, %d local devices, %d in all", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


def execute(experiment: Experiment, parsed: Parsed) -> int:
  """Run the inference mode or ``train_and_evaluate``; returns the exit code (0, 2, or 128 + signal)."""
  quiet_jax_logs()
  try:
    join_processes(parsed.flag_values)
    if experiment.infer is not None and experiment.infer(parsed.flag_values, parsed.workdir):
      return 0
    for note in parsed.notes:
      logging.info("%s: --resume changes %s", experiment.name, note)
    experiment.train_and_evaluate(parsed.config, parsed.workdir, parsed.options)
    return 0
  except Interrupted as interrupt:
    print(f"{experiment.name}: stopped by {interrupt}; continue with: "
          f"{_resume_command(experiment, parsed.workdir)}", file=sys.stderr)
    return 128 + interrupt.signal_number
  except USER_ERRORS as error:
    if os.environ.get("RNN_JAX_TRACEBACK"):
      raise
    print(f"{experiment.name}: error: {_one_line(error)}", file=sys.stderr)
    return 2


def parse(experiment: Experiment, argv: list[str], flag_values: flags.FlagValues) -> Parsed:
  """Define every flag on ``flag_values``, parse ``argv`` (argv[0] is the program) and resolve."""
  define_all_flags(experiment, flag_values)
  rest = flag_values(argv)
  if len(rest) > 1:
    raise ValueError(f"unexpected arguments {rest[1:]}; every setting is a --flag")
  return resolve(experiment, flag_values)


def run(experiment: Experiment, argv: list[str]) -> int:
  """Parse ``argv`` with a fresh set of flags and run the experiment in this process.

  The same path as the script's ``main``, returning the exit code instead of exiting; tests
  call it directly.
  """
  flag_values = flags.FlagValues()
  try:
    parsed = parse(experiment, [f"{experiment.name}.py", *argv], flag_values)
  except (flags.Error, *USER_ERRORS) as error:
    print(f"{experiment.name}: error: {_one_line(error)}", file=sys.stderr)
    return 2
  return execute(experiment, parsed)


def main(experiment: Experiment) -> None:
  """The script entry point: absl parses the command line (with --help and --helpfull)."""
  state = {}

  def parser(argv):
    try:
      state["parsed"] = parse(experiment, argv, flags.FLAGS)
    except (flags.Error, *USER_ERRORS) as error:
      print(f"{experiment.name}: error: {_one_line(error)}", file=sys.stderr)
      sys.exit(2)
    return argv[:1]

  def run_parsed(argv):
    from rnn_jax import runtime
    runtime.retain_freed_memory()  # before the first JAX computation (rnn_jax/runtime.py)
    sys.exit(execute(experiment, state["parsed"]))

  app.run(run_parsed, flags_parser=parser)
