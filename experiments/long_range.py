"""Long-range tasks: the cures for vanishing gradients compared in one table.

  python experiments/long_range.py                                   # every task, 1000 steps per run
  python experiments/long_range.py --preset=adding                   # adding T = 100..750, 2000 steps
  python experiments/long_range.py --tasks=adding --adding_lengths=200 --steps=3000
  python experiments/long_range.py --smoke                           # seconds, the same code path

Tasks (data generated in code, rnn_jax.tasks; "solved" is judged on a validation set): the adding
problem (Hochreiter & Schmidhuber 1997; T in adding_lengths; solved: MSE < 0.01, the memoryless
baseline is 1/6), the copy task (Arjovsky, Shah & Bengio 2016; delay T in copy_delays; solved: all
10 symbols copied on >= 99% of sequences), sequential 8x8 digits (64 steps, scikit-learn's bundled
set; solved: accuracy >= digits_target) and their permuted-pixel variant. Models (rnn_jax.lab):
tanh RNN with the default init, tanh RNN with orthogonal W_hh (Saxe et al. 2014), IRNN (Le, Jaitly
& Hinton 2015), LSTM (forget-gate bias lstm_forget_bias), GRU (Cho et al. 2014) and an ESN (Jaeger
2001). Each gradient model trains through the one recipe (rnn_jax.train.train_and_test) until it
solves the task or spends its ``steps``; the best checkpoint on the validation metric is tested.
The ESN fits its read-out in closed form. Every run starts from the same data; the step budget is
the same for every run of one invocation (a preset per task sets it).

Writes <workdir>/results.json (the table), table.md, curves_<task>_T<T>.png (training loss and
validation metric of every model against the step) and one run directory per task and model,
<workdir>/<task>_T<T>/<model>/ (config.json, metrics.jsonl, results.json, grad_norms.json,
model.json, checkpoints/, curves.png). --resume continues the unfinished runs.
"""

from __future__ import annotations

import dataclasses

import jax
from absl import logging

if __package__:
  from experiments import common
else:  # run as a script: experiments/ is on sys.path
  import common
from rnn_jax import lab, plots, tasks
from rnn_jax.config import field
from rnn_jax.rundir import RunDir, RunOptions


@dataclasses.dataclass(frozen=True)
class Config(lab.LabConfig):
  """long_range: every model on every task, Adam 1e-2 with global-norm clipping at 1, H = 64."""
  tasks: tuple[str, ...] = field(("adding", "copy", "digits", "permuted_digits"), "Tasks to run.",
                                 choices=lab.TASK_NAMES, fixed=True)
  models: tuple[str, ...] = field(lab.MODEL_NAMES, "Models to compare on every task.",
                                  choices=lab.MODEL_NAMES, fixed=True)
  adding_lengths: tuple[int, ...] = field((100, 200, 400, 750), "Sequence lengths T of the adding problem.",
                                          minimum=2, fixed=True)
  copy_delays: tuple[int, ...] = field((100, 200, 500),
                                       "Delays T of the copy task (sequences are T + 20 long).",
                                       minimum=1, fixed=True)
  digits_target: float = field(0.9, "Validation accuracy at which (permuted) digits count as solved.",
                               minimum=0.0, maximum=1.0)
  esn_hidden_size: int = field(400, "Reservoir size N of the ESN.", minimum=1, fixed=True)
  esn_spectral_radius: float = field(0.95, "Spectral radius rho of the ESN's W_hh.", minimum=0.0, fixed=True)
  esn_leak_rate: float = field(1.0, "Leak rate alpha of the ESN.", minimum=0.0, maximum=1.0, fixed=True)
  esn_ridge: float = field(1e-4, "Ridge lambda of the ESN read-out.", minimum=0.0)
  esn_train_sequences: int = field(2000, "Training sequences of the ESN read-out (adding, copy).", minimum=1,
                                   fixed=True)

  def validate(self) -> None:
    super().validate()
    for name in ("tasks", "models"):
      if not getattr(self, name):
        raise ValueError(f"{name} must name at least one entry")
    if self.esn_spectral_radius <= 0 or self.esn_leak_rate <= 0:
      raise ValueError(f"esn_spectral_radius and esn_leak_rate must be > 0, got {self.esn_spectral_radius} "
                       f"and {self.esn_leak_rate}")


PRESETS = {
    "adding": dict(tasks=("adding",), adding_lengths=(100, 200, 400, 750), steps=2000),
    "copy": dict(tasks=("copy",), copy_delays=(100, 200, 500), steps=300),
    "digits": dict(tasks=("digits", "permuted_digits"), steps=1000),
}
SMOKE = dict(adding_lengths=(20,), copy_delays=(5,), steps=20, eval_every=10, log_every=5, eval_sequences=50,
             hidden_size=8, batch_size=16, esn_hidden_size=20, esn_train_sequences=100)


def task_list(config: Config) -> list[tuple[str, int]]:
  """(task, T) for every requested task and length."""
  runs = []
  for name in config.tasks:
    if name == "adding":
      runs += [(name, length) for length in config.adding_lengths]
    elif name == "copy":
      runs += [(name, delay) for delay in config.copy_delays]
    else:
      runs.append((name, 64))
  return runs


def solved_cell(row: dict) -> str:
  if row["model"] == "esn":
    return "solved (closed form)" if row["solved"] else "not solved (closed form)"
  if row["solved"]:
    return f"solved at step {row['steps_to_solve']}"
  return f"not solved in {row['budget_steps']}" + (" (diverged)" if row["diverged"] else "")


def markdown_table(rows: list[dict]) -> str:
  """The long-range table as markdown (accuracies as fractions)."""
  fmt = lambda v: "n/a" if v is None else f"{v:.4g}"
  lines = ["| task | T | model | result | metric | valid | test | baseline | exploding events | wall s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['task']} | {r['T']} | {r['model']} | {solved_cell(r)} | {r['metric']} "
                 f"| {fmt(r['valid'])} | {fmt(r['test'])} | {fmt(r['baseline'])} | "
                 f"{'-' if r['exploding_events'] is None else r['exploding_events']} | {r['wall_s']:.0f} |")
  return "\n".join(lines) + "\n"


def run_one(task_run: RunDir, config: Config, data: lab.TaskData, model: str, key, progress: bool) -> dict:
  """Train (or fit) one model on one task in ``task_run.child(model)``; returns its table row."""
  spec = data.task
  run = task_run.child(model, label=f"long_range {spec.name} T={spec.length} {model}")
  row = {"task": spec.name, "T": spec.length, "model": model, "metric": spec.metric,
         "baseline": spec.baseline, "target": spec.target, "budget_steps": config.steps}
  if model == "esn":
    esn_config = lab.ESNConfig(hidden_size=config.esn_hidden_size, spectral_radius=config.esn_spectral_radius,
                               leak_rate=config.esn_leak_rate, ridge=config.esn_ridge)
    outcome = lab.esn_on_task(spec, data.esn_train, data.valid, esn_config, key, test_batch=data.test)
    row.update(solved=outcome["solved"], diverged=False, steps=0, steps_to_solve=None,
               valid=outcome[spec.metric], test=outcome[f"test_{spec.metric}"], exploding_events=None,
               wall_s=outcome["fit_wall_s"],
               note=f"closed-form ridge read-out, {config.esn_hidden_size} units")
    run.finish(row)
    return row
  cell = lab.make_model_cell(model, config.hidden_size, config.lstm_forget_bias)
  outcome = lab.train_model(cell, data, config, run, key, progress=progress)
  row.update(solved=outcome["solved"], diverged=outcome["diverged"], steps=outcome["steps"],
             steps_to_solve=outcome["steps_to_solve"], valid=outcome[f"valid_{spec.metric}"],
             test=outcome[f"test_{spec.metric}"], exploding_events=outcome["gradient"]["exploding_events"],
             wall_s=outcome["train_wall_s"], note="diverged (non-finite loss)" if outcome["diverged"] else "",
             gradient=outcome["gradient"])
  lab.plot_training(run, f"long_range {spec.name} T={spec.length}: {model}, H={config.hidden_size}, "
                    f"{config.optimizer} lr {config.learning_rate:g}, clip {config.clip:g}", spec)
  return row


def plot_task(run: RunDir, task_run: RunDir, config: Config, spec: lab.TaskSpec, rows: list[dict]) -> str:
  """Training loss and validation metric of every gradient model on one task; baseline, solved
  threshold and the ESN's validation score as labelled black lines. The copy task adds the
  validation cross-entropy against the memoryless 10 log 8 / (T + 20), which separates models
  long before any copies all 10 symbols."""
  trained = [r for r in rows if r["model"] != "esn"]
  reference = {"baseline": (spec.baseline, f"no memory {spec.baseline:.3g}"),
               "solved": (spec.target, f"solved {'<' if spec.mode == 'min' else '>='} {spec.target:g}")}
  for r in rows:
    if r["model"] == "esn" and r["valid"] is not None:
      reference["esn"] = (r["valid"], f"ESN, closed form {r['valid']:.3g}")
  short = {"mse": "mse", "answer_accuracy": "exact copies", "accuracy": "accuracy"}[spec.metric]
  final = {r["model"]: "diverged" if r["diverged"] else f"test {short} {r['test']:.3g}" for r in trained}
  diverged = "".join(f"; {r['model']} diverged at step {r['steps']}" for r in trained if r["diverged"])
  metrics, references = [spec.metric], {spec.metric: reference}
  if spec.name == "copy":
    memoryless = tasks.copy_baseline_cross_entropy(spec.length)
    metrics.append("cross_entropy")
    references["cross_entropy"] = {"memoryless": (memoryless, f"no memory {memoryless:.3g}")}
  return plots.plot_comparison(
      {r["model"]: task_run.path(r["model"]) for r in trained}, metrics,
      f"long_range {spec.name} T={spec.length}: H={config.hidden_size}, {config.optimizer} lr "
      f"{config.learning_rate:g}, clip {config.clip:g}, batch {config.batch_size}, {config.steps} steps"
      + diverged,
      run.path(f"curves_{spec.name}_T{spec.length}.png"), labels=lab.METRIC_LABELS,
      reference=references, final=final)


def train_and_evaluate(config: Config, workdir: str, options=None) -> dict:
  """Every model on every task into ``workdir``; returns results.json's content (the table)."""
  options = options or RunOptions()
  run = RunDir(workdir, "long_range", config, options, label="long_range")
  key = jax.random.PRNGKey(config.seed)
  rows = []
  for task_index, (name, length) in enumerate(task_list(config)):
    spec = lab.make_task(name, length, config.digits_target)
    task_key = jax.random.fold_in(key, task_index)
    data = lab.task_data(spec, task_key, batch_size=config.batch_size, eval_sequences=config.eval_sequences,
                         esn_train_sequences=config.esn_train_sequences)
    task_run = run.child(f"{name}_T{length}", label=f"long_range {name} T={length}")
    task_run.check_data(f"{name} T={length} valid, test and ESN training sets", data.valid, data.test,
                        data.esn_train)
    task_rows = []
    for model_index, model in enumerate(config.models):
      logging.info("long_range %s T=%d: %s (budget %d steps)", name, length, model, config.steps)
      model_key = jax.random.fold_in(jax.random.fold_in(task_key, 1000), model_index)
      row = run_one(task_run, config, data, model, model_key, options.progress)
      task_rows.append(row)
      rows.append(row)
      run.write_text("table.md", markdown_table(rows))
      print(f"long_range {name} T={length} {model}: {solved_cell(row)}; {spec.metric} valid "
            f"{row['valid'] if row['valid'] is None else format(row['valid'], '.4g')}, test "
            f"{row['test'] if row['test'] is None else format(row['test'], '.4g')}", flush=True)
    if any(r["model"] != "esn" for r in task_rows):
      plot_task(run, task_run, config, spec, task_rows)
    task_run.finish({"table": task_rows})
  table = markdown_table(rows)
  print(table)
  results = run.finish({"table": rows, "table_markdown": table})
  print(f"long_range: {len(rows)} runs in {results['wall_time_s']:.0f} s; table in {run.path('table.md')}")
  return results


EXPERIMENT = common.Experiment("long_range", Config, train_and_evaluate, PRESETS, SMOKE, __doc__)

if __name__ == "__main__":
  common.main(EXPERIMENT)
