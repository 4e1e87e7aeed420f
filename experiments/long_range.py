"""Long-range tasks: the seeds' cures for vanishing gradients compared in one table.

  python experiments/long_range.py --workdir=/work/runs/long_range          # the full table
  python experiments/long_range.py --tasks=adding --adding_lengths=200 --adding_steps=2000 --workdir=...
  python experiments/long_range.py --smoke --workdir=/tmp/long_range_smoke   # seconds, same code path

Tasks (data generated in code, rnn_jax.tasks): the adding problem (T in --adding_lengths), the copy
task (delay T in --copy_delays), sequential 8x8 digits (64 steps, scikit-learn's bundled set) and
their permuted-pixel variant. Models (rnn_jax.lab): tanh RNN with the default init, tanh RNN with
orthogonal W_hh, IRNN, LSTM, GRU and an ESN. Each gradient model trains with rnn_jax.train until it
solves the task or exhausts its step budget; the ESN fits its read-out in closed form.

Writes <workdir>/results.json (the table and all flags), metrics.jsonl (one line per run),
table.md, curves_<task>.png (eval metric vs step per model), and per run
<workdir>/<task>_T<T>/<model>/{results.json, metrics.jsonl, curves.png}.
"""

import json
import os
import time

import jax
from absl import app, flags, logging

from rnn_jax import lab, runtime, tasks, train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Output directory.")
flags.DEFINE_list("tasks", ["adding", "copy", "digits", "permuted_digits"], f"Tasks among {lab.TASK_NAMES}.")
flags.DEFINE_list("models", list(lab.MODEL_NAMES), f"Models among {lab.MODEL_NAMES}.")
flags.DEFINE_list("adding_lengths", ["100", "200", "400", "750"], "Adding-problem sequence lengths T.")
flags.DEFINE_list("adding_steps", ["2000", "3000", "1500", "600"], "Step budget for each adding length.")
flags.DEFINE_list("copy_delays", ["100", "200", "500"], "Copy-task delays T (sequences are T + 20 long).")
flags.DEFINE_list("copy_steps", ["600", "300", "150"], "Step budget for each copy delay.")
flags.DEFINE_integer("digits_steps", 1000, "Step budget for (permuted) sequential digits.")
flags.DEFINE_float("digits_target", 0.9, "Test accuracy at which digits count as solved.")
flags.DEFINE_integer("hidden", 64, "Hidden size H of every gradient-trained model.")
flags.DEFINE_float("lstm_forget_bias", 1.0, "Initial forget-gate bias b_f of the LSTM.")
flags.DEFINE_integer("batch", 50, "Training batch size B.")
flags.DEFINE_enum("optimizer", "adam", list(train.OPTIMIZERS), "Optimiser.")
flags.DEFINE_float("lr", 1e-2, "Learning rate (the same for every model).")
flags.DEFINE_float("clip", 1.0, "Gradient clipping threshold (<= 0: no clipping).")
flags.DEFINE_enum("clip_mode", "norm", list(train.CLIP_MODES), "Clip the global norm or each value.")
flags.DEFINE_float("l1", 0.0, "L1 penalty on W_hh only.")
flags.DEFINE_float("l2", 0.0, "L2 penalty on W_hh only.")
flags.DEFINE_integer("eval_every", 100, "Steps between evaluations (and solved checks).")
flags.DEFINE_integer("eval_size", 500, "Held-out sequences per evaluation (adding, copy).")
flags.DEFINE_integer("esn_hidden", 400, "ESN reservoir size.")
flags.DEFINE_float("esn_spectral_radius", 0.95, "ESN spectral radius rho.")
flags.DEFINE_float("esn_leak", 1.0, "ESN leak rate alpha.")
flags.DEFINE_float("esn_ridge", 1e-4, "ESN ridge lambda.")
flags.DEFINE_integer("esn_train_size", 2000, "Training sequences for the ESN read-out (adding, copy).")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_bool("smoke", False, "A seconds-long run of the same code path (tiny sizes and budgets).")
flags.DEFINE_bool("progress", True, "Show tqdm progress bars.")


def smoke_overrides() -> None:
  """Tiny sizes and budgets for --smoke (the same code path)."""
  FLAGS.adding_lengths, FLAGS.adding_steps = ["20"], ["20"]
  FLAGS.copy_delays, FLAGS.copy_steps = ["5"], ["20"]
  FLAGS.digits_steps, FLAGS.eval_every, FLAGS.eval_size = 20, 10, 50
  FLAGS.hidden, FLAGS.batch, FLAGS.esn_hidden, FLAGS.esn_train_size = 8, 16, 20, 100


def task_list() -> list[tuple[str, int, int]]:
  """(task, T, step budget) for every requested task and length."""
  runs = []
  for name in FLAGS.tasks:
    if name not in lab.TASK_NAMES:
      raise app.UsageError(f"--tasks: unknown task {name!r}; expected some of {lab.TASK_NAMES}")
    if name in ("adding", "copy"):
      lengths = FLAGS.adding_lengths if name == "adding" else FLAGS.copy_delays
      budgets = FLAGS.adding_steps if name == "adding" else FLAGS.copy_steps
      if len(lengths) != len(budgets):
        raise app.UsageError(f"--{name}: {len(lengths)} lengths but {len(budgets)} step budgets; "
                             f"give one budget per length")
      runs += [(name, int(length), int(steps)) for length, steps in zip(lengths, budgets)]
    else:
      runs.append((name, 64, FLAGS.digits_steps))
  for model in FLAGS.models:
    if model not in lab.MODEL_NAMES:
      raise app.UsageError(f"--models: unknown model {model!r}; expected some of {lab.MODEL_NAMES}")
  return runs


def task_data(spec: lab.TaskSpec, key):
  """(training stream, ESN training batch, eval batch) for a task."""
  key_stream, key_esn, key_eval, key_split, key_perm = jax.random.split(key, 5)
  if spec.name in ("adding", "copy"):
    generate = tasks.adding_problem if spec.name == "adding" else tasks.copy_task
    stream = tasks.GeneratedStream(lambda k: generate(k, FLAGS.batch, spec.length), key_stream)
    return (stream, generate(key_esn, FLAGS.esn_train_size, spec.length),
            generate(key_eval, FLAGS.eval_size, spec.length))
  split = tasks.digits(key_split, permuted=spec.name == "permuted_digits", permutation_key=key_perm)
  stream = tasks.ArrayStream(split.train_xs, split.train_labels, FLAGS.batch, key_stream)
  return (stream, tasks.Batch(split.train_xs, split.train_labels),
          tasks.Batch(split.test_xs, split.test_labels))


def run_one(spec: lab.TaskSpec, model: str, budget: int, data, key, workdir: str) -> dict:
  """Train (or fit) one model on one task; returns its table row."""
  stream, esn_batch, eval_batch = data
  run = train.RunDir(workdir, config={"task": spec.name, "T": spec.length, "model": model,
                                      "budget_steps": budget, **FLAGS.flag_values_dict()})
  row = {"task": spec.name, "T": spec.length, "model": model, "metric": spec.metric,
         "baseline": spec.baseline, "target": spec.target, "budget_steps": budget}
  if model == "esn":
    config = lab.ESNConfig(hidden_size=FLAGS.esn_hidden, spectral_radius=FLAGS.esn_spectral_radius,
                           leak_rate=FLAGS.esn_leak, ridge=FLAGS.esn_ridge)
    outcome = lab.esn_on_task(spec, esn_batch, eval_batch, config, key)
    row.update(solved=outcome["solved"], steps=0, steps_to_solve=0 if outcome["solved"] else None,
               final=outcome[spec.metric], best=outcome[spec.metric], exploding_events=None,
               wall_s=outcome["fit_wall_s"], note=f"closed-form ridge read-out, {FLAGS.esn_hidden} units")
  else:
    stream.seek({"index": 0})
    config = lab.TrainConfig(optimizer=FLAGS.optimizer, learning_rate=FLAGS.lr,
                             clip=FLAGS.clip if FLAGS.clip > 0 else None, clip_mode=FLAGS.clip_mode,
                             l1=FLAGS.l1, l2=FLAGS.l2, steps=budget, eval_every=FLAGS.eval_every,
                             log_every=min(50, FLAGS.eval_every))
    cell = lab.make_model_cell(model, FLAGS.hidden, FLAGS.lstm_forget_bias)
    outcome = lab.train_model(cell, spec, stream, eval_batch, config, run, key, progress=FLAGS.progress)
    row.update(solved=outcome["solved"], steps=outcome["steps"], steps_to_solve=outcome["steps_to_solve"],
               final=outcome[f"final_{spec.metric}"], best=outcome[f"best_{spec.metric}"],
               exploding_events=outcome["gradient"]["exploding_events"], wall_s=outcome["train_wall_s"],
               note="diverged (non-finite loss)" if outcome["diverged"] else "",
               final_eval=outcome["final_eval"], gradient=outcome["gradient"])
  run.finish(row)
  return row


def solved_cell(row: dict) -> str:
  if row["model"] == "esn":
    return "solved (closed form)" if row["solved"] else "not solved (closed form)"
  if row["solved"]:
    return f"solved at step {row['steps_to_solve']}"
  return f"not solved in {row['budget_steps']}" + (" (diverged)" if row["note"] else "")


def markdown_table(rows: list[dict]) -> str:
  """The long-range table as markdown."""
  lines = ["| task | T | model | result | final metric | best | baseline | exploding events | wall s |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    fmt = lambda v: "n/a" if v is None else f"{v:.4g}"
    lines.append(f"| {r['task']} | {r['T']} | {r['model']} | {solved_cell(r)} | {r['metric']} {fmt(r['final'])} "
                 f"| {fmt(r['best'])} | {fmt(r['baseline'])} | "
                 f"{'-' if r['exploding_events'] is None else r['exploding_events']} | {r['wall_s']:.0f} |")
  return "\n".join(lines) + "\n"


def plot_task_curves(workdir: str, task_dir: str, spec: lab.TaskSpec, models: list[str]) -> str:
  """Eval metric vs step for every gradient model of one task (ESN as a horizontal line)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axis = plt.subplots(figsize=(6, 4))
  for model in models:
    path = os.path.join(workdir, task_dir, model)
    if model == "esn":
      with open(os.path.join(path, "results.json")) as f:
        axis.axhline(json.load(f)["final"], linestyle=":", color="gray", label="esn (closed form)")
      continue
    points = [(r["step"], r[spec.metric]) for r in train.read_metrics(path)
              if r.get("split") == "valid" and isinstance(r.get(spec.metric), (int, float))]
    if points:
      axis.plot(*zip(*points), marker=".", label=model)
  axis.axhline(spec.baseline, color="black", linewidth=0.8, label="baseline")
  axis.axhline(spec.target, color="green", linewidth=0.8, linestyle="--", label="solved")
  if spec.metric == "mse":
    axis.set_yscale("log")
  axis.set_xlabel("training step")
  axis.set_ylabel(f"held-out {spec.metric}")
  axis.set_title(f"{spec.name}, T={spec.length}")
  axis.legend(fontsize=7)
  return train.save_figure(fig, os.path.join(workdir, f"curves_{task_dir}.png"))


def main(argv):
  del argv
  runtime.retain_freed_memory()  # before any JAX computation (rnn_jax/runtime.py)
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required (e.g. --workdir=/tmp/long_range)")
  if FLAGS.smoke:
    smoke_overrides()
  runs = task_list()
  top = train.RunDir(FLAGS.workdir, config=FLAGS.flag_values_dict())
  start = time.time()
  key = jax.random.PRNGKey(FLAGS.seed)
  rows = []
  for task_index, (name, length, budget) in enumerate(runs):
    spec = lab.make_task(name, length, FLAGS.digits_target)
    task_key = jax.random.fold_in(key, task_index)
    data = task_data(spec, task_key)
    task_dir = f"{name}_T{length}"
    for model_index, model in enumerate(FLAGS.models):
      logging.info("=== %s T=%d: %s (budget %d steps)", name, length, model, budget)
      model_key = jax.random.fold_in(jax.random.fold_in(task_key, 1000), model_index)
      row = run_one(spec, model, budget, data, model_key, os.path.join(FLAGS.workdir, task_dir, model))
      rows.append(row)
      top.log(len(rows), "run", task=name, T=length, model=model, solved=int(row["solved"]),
              steps=row["steps"], final=row["final"], wall_s=row["wall_s"])
      top.write_text("table.md", markdown_table(rows))
      print(markdown_table([row]).splitlines()[-1], flush=True)
    plot_task_curves(FLAGS.workdir, task_dir, spec, FLAGS.models)
  wall = time.time() - start
  train.write_results(FLAGS.workdir, {"table": rows, "table_markdown": markdown_table(rows)},
                      FLAGS.flag_values_dict(), wall)
  print(markdown_table(rows))
  print(f"long_range: {len(rows)} runs in {wall:.0f} s; table in {os.path.join(FLAGS.workdir, 'table.md')}")


if __name__ == "__main__":
  app.run(main)
