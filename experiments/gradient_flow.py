"""Gradient flow through time, measured: vanishing and exploding gradients and the clipping cure.

  python experiments/gradient_flow.py --workdir=/work/runs/gradient_flow            # everything
  python experiments/gradient_flow.py --parts=exploding --workdir=/tmp/exploding     # the clipping demo only
  python experiments/gradient_flow.py --smoke --workdir=/tmp/gradient_flow_smoke     # seconds

Part "jacobians": for each cell and initialisation (tanh default, tanh orthogonal, IRNN, LSTM, GRU,
and a fixed ESN reservoir), ||dh_T/dh_k|| and ||dL/dh_k|| against the lag T - k on adding-problem
sequences, computed exactly with JAX autodiff through the scan (rnn_jax.diagnostics), at
initialisation and after --train_steps of training on the adding problem; and the singular values
of W_hh before and after.

Part "exploding": a tanh RNN whose W_hh has spectral radius --explode_radius (1.5), trained with
plain SGD at --explode_lr without clipping (the gradient norm explodes and the loss becomes
non-finite), then the identical run with the gradient clipped to global norm --explode_clip
(it stays finite). Every step's ||g|| is recorded with the exploding events (||g|| > clip, or
non-finite).

Writes jacobian_norms.png, loss_gradient_norms.png, spectra.png, exploding.png, results.json,
metrics.jsonl (one line per training run) and a run directory per training run.
"""

import math
import os
import time

import jax
import numpy as np
from absl import app, flags, logging

from rnn_jax import cells, diagnostics, esn, lab, runtime, tasks, train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Output directory.")
flags.DEFINE_list("parts", ["jacobians", "exploding"], "Which parts to run: jacobians, exploding.")
flags.DEFINE_list("models", [m for m in lab.MODEL_NAMES if m != "esn"], "Gradient-trained models.")
flags.DEFINE_integer("hidden", 64, "Hidden size H.")
flags.DEFINE_integer("length", 100, "Sequence length T of the adding problem (training and diagnostics).")
flags.DEFINE_integer("probe_size", 8, "Sequences averaged in the Jacobian-norm curves.")
flags.DEFINE_integer("train_steps", 1000, "Training steps before the 'after training' curves.")
flags.DEFINE_float("lstm_forget_bias", 1.0, "Initial forget-gate bias b_f of the LSTM.")
flags.DEFINE_integer("batch", 50, "Training batch size.")
flags.DEFINE_float("lr", 1e-2, "Adam learning rate of the 'after training' runs.")
flags.DEFINE_float("clip", 1.0, "Global-norm clipping of the 'after training' runs.")
flags.DEFINE_float("esn_spectral_radius", 0.95, "Spectral radius of the reference ESN reservoir.")
flags.DEFINE_float("explode_radius", 1.5, "Spectral radius of W_hh in the exploding demo.")
flags.DEFINE_float("explode_lr", 0.1, "SGD learning rate of the exploding demo.")
flags.DEFINE_float("explode_clip", 1.0, "Global-norm clip threshold of the clipped demo run.")
flags.DEFINE_integer("explode_steps", 200, "Steps of each exploding-demo run.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_bool("smoke", False, "A seconds-long run of the same code path.")
flags.DEFINE_bool("progress", True, "Show tqdm progress bars.")


GATE_NAMES = {1: ["h"], 3: ["r", "z", "n"], 4: ["i", "f", "g", "o"]}   # W_hh blocks: Elman, GRU, LSTM


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def curve_summary(norms) -> dict:
  """Selected lags of a norm-vs-lag curve and its mean log10 change per step of lag."""
  norms = np.asarray(norms, np.float64)
  lags = [lag for lag in (1, 10, 50, len(norms) - 1) if lag < len(norms)]
  finite = np.isfinite(norms) & (norms > 0)
  slope = None
  if finite.sum() > 2:
    x = np.arange(len(norms))[finite]
    slope = float(np.polyfit(x[1:], np.log10(norms[finite][1:]), 1)[0])
  return {"at_lag": {str(lag): float(norms[lag]) for lag in lags}, "log10_per_lag": slope}


def plot_by_lag(curves: dict, path: str, ylabel: str) -> None:
  """One panel per phase ("init", "trained"), one line per model, log y vs lag."""
  plt = _plt()
  phases = [p for p in ("init", "trained") if any(p in c for c in curves.values())]
  fig, axes = plt.subplots(1, len(phases), figsize=(6 * len(phases), 4), squeeze=False, sharey=True)
  for axis, phase in zip(axes[0], phases):
    for model, by_phase in curves.items():
      norms = by_phase.get(phase, by_phase.get("fixed"))
      if norms is not None:
        axis.semilogy(np.arange(len(norms)), np.maximum(np.asarray(norms), 1e-30), label=model)
    axis.set_xlabel("lag T - k (norms that underflow to 0 are drawn at 1e-30)")
    axis.set_title("at initialisation" if phase == "init" else "after training (or when solved)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
  axes[0][0].set_ylabel(ylabel)
  train.save_figure(fig, path)


def plot_spectra(spectra: dict, path: str) -> None:
  """Singular values of each gate block of W_hh, at init (dashed) and after training (solid)."""
  plt = _plt()
  fig, axes = plt.subplots(1, len(spectra), figsize=(3.2 * len(spectra), 3), squeeze=False)
  for axis, (model, by_phase) in zip(axes[0], spectra.items()):
    for phase, style in (("init", "--"), ("trained", "-")):
      values = by_phase.get(phase)
      if values is None:
        continue
      values = np.asarray(values)
      names = GATE_NAMES.get(len(values), [str(g) for g in range(len(values))])
      for gate, singular in enumerate(values):
        axis.plot(singular, style, color=f"C{gate}", label=f"W_h{names[gate]}" if phase == "trained" else None)
    axis.set_title(f"{model} (dashed: init)")
    axis.set_xlabel("index")
    axis.set_ylabel("singular value")
    axis.legend(fontsize=6)
  train.save_figure(fig, path)


def jacobians_part(top: train.RunDir, key) -> dict:
  """Norm-vs-lag curves and W_hh spectra at init and after training, for every model."""
  spec = lab.make_task("adding", FLAGS.length)
  key_probe, key_stream, key_eval, key_models = jax.random.split(key, 4)
  probe = tasks.adding_problem(key_probe, FLAGS.probe_size, FLAGS.length)
  eval_batch = tasks.adding_problem(key_eval, 500, FLAGS.length)
  stream = tasks.GeneratedStream(lambda k: tasks.adding_problem(k, FLAGS.batch, FLAGS.length), key_stream)
  jacobian_curves, loss_curves, spectra, summary = {}, {}, {}, {}

  def measure(cell, params):
    jac = diagnostics.jacobian_norms_by_lag(cell, params["rnn"], probe.xs)
    loss = diagnostics.loss_gradient_norms_by_lag(
        cell, params["rnn"], probe.xs, lab.loss_of_hidden(spec, params["head"], probe.targets))
    return np.asarray(jac), np.asarray(loss)

  for index, model in enumerate(FLAGS.models):
    cell = lab.make_model_cell(model, FLAGS.hidden, FLAGS.lstm_forget_bias)
    model_key = jax.random.fold_in(key_models, index)
    params = lab.init_model(cell, spec, model_key)
    jac_init, loss_init = measure(cell, params)
    config = lab.TrainConfig(learning_rate=FLAGS.lr, clip=FLAGS.clip, steps=FLAGS.train_steps,
                             eval_every=max(FLAGS.train_steps // 5, 1), log_every=max(FLAGS.train_steps // 20, 1))
    stream.seek({"index": 0})
    run = train.RunDir(os.path.join(FLAGS.workdir, "train", model), {"model": model, **FLAGS.flag_values_dict()})
    outcome = lab.train_model(cell, spec, stream, eval_batch, config, run, model_key, progress=FLAGS.progress)
    run.finish({k: v for k, v in outcome.items() if k not in ("params", "grad_norms")})
    phases = {"init": (jac_init, loss_init)}
    spectra[model] = {"init": diagnostics.recurrent_spectrum(params["rnn"]["w_hh"]).singular_values}
    if outcome["params"] is not None:
      phases["trained"] = measure(cell, outcome["params"])
      spectra[model]["trained"] = diagnostics.recurrent_spectrum(outcome["params"]["rnn"]["w_hh"]).singular_values
    jacobian_curves[model] = {phase: values[0] for phase, values in phases.items()}
    loss_curves[model] = {phase: values[1] for phase, values in phases.items()}
    summary[model] = {
        "final_mse": outcome["final_mse"], "train_steps": outcome["steps"], "diverged": outcome["diverged"],
        "exploding_events": outcome["gradient"]["exploding_events"],
        "spectral_radius": {phase: diagnostics.recurrent_spectrum(
            (params if phase == "init" else outcome["params"])["rnn"]["w_hh"]).spectral_radius.tolist()
            for phase in spectra[model]},
        "jacobian_norm": {phase: curve_summary(c) for phase, c in jacobian_curves[model].items()},
        "loss_gradient_norm": {phase: curve_summary(c) for phase, c in loss_curves[model].items()},
    }
    top.log(index, "jacobians", model=model, final_mse=outcome["final_mse"],
            jacobian_lag_T_init=float(jac_init[-1]),
            jacobian_lag_T_trained=float(jacobian_curves[model].get("trained", [math.nan])[-1]))
  reservoir = esn.Reservoir(FLAGS.hidden, spectral_radius=FLAGS.esn_spectral_radius)
  reservoir_params = reservoir.init(jax.random.fold_in(key_models, 99), 2)
  jac_esn = np.asarray(diagnostics.jacobian_norms_by_lag(reservoir, reservoir_params, probe.xs))
  jacobian_curves["esn reservoir (fixed)"] = {"fixed": jac_esn}
  summary["esn_reservoir"] = {"spectral_radius": FLAGS.esn_spectral_radius,
                              "jacobian_norm": curve_summary(jac_esn)}
  plot_by_lag(jacobian_curves, top.path("jacobian_norms.png"), "||dh_T / dh_k||_2 (geometric mean)")
  plot_by_lag(loss_curves, top.path("loss_gradient_norms.png"), "||dL / dh_k||")
  plot_spectra(spectra, top.path("spectra.png"))
  return summary


def exploding_part(top: train.RunDir, key) -> dict:
  """The same exploding tanh RNN trained without and with gradient clipping."""
  spec = lab.make_task("adding", FLAGS.length)
  key_stream, key_eval, key_model = jax.random.split(key, 3)
  eval_batch = tasks.adding_problem(key_eval, 500, FLAGS.length)
  stream = tasks.GeneratedStream(lambda k: tasks.adding_problem(k, FLAGS.batch, FLAGS.length), key_stream)
  cell = cells.Elman(FLAGS.hidden, activation="tanh", spectral_radius=FLAGS.explode_radius)
  results, norms = {}, {}
  for name, clip in (("no_clipping", None), ("clipped", FLAGS.explode_clip)):
    config = lab.TrainConfig(optimizer="sgd", learning_rate=FLAGS.explode_lr, clip=clip,
                             steps=FLAGS.explode_steps, eval_every=max(FLAGS.explode_steps // 4, 1),
                             log_every=1, exploding_threshold=FLAGS.explode_clip)
    stream.seek({"index": 0})
    run = train.RunDir(os.path.join(FLAGS.workdir, "exploding", name), {"run": name, **FLAGS.flag_values_dict()})
    outcome = lab.train_model(cell, spec, stream, eval_batch, config, run, key_model, progress=FLAGS.progress)
    run.finish({k: v for k, v in outcome.items() if k not in ("params", "grad_norms")}, plot=False)
    norms[name] = outcome["grad_norms"]
    gradient = outcome["gradient"]
    results[name] = {"clip": clip, "steps_run": outcome["steps"], "diverged": outcome["diverged"],
                     "final_mse": outcome["final_mse"], **gradient}
    top.log(len(results), "exploding", run=name, diverged=int(outcome["diverged"]), steps=outcome["steps"],
            exploding_events=gradient["exploding_events"], non_finite_events=gradient["non_finite_events"])
  plt = _plt()
  fig, axis = plt.subplots(figsize=(6.5, 4))
  for name, values in norms.items():
    values = np.asarray(values, np.float64)
    steps = np.arange(1, len(values) + 1)
    finite = np.isfinite(values)
    axis.semilogy(steps[finite], values[finite], label=f"{name}")
    if (~finite).any():
      first = steps[~finite][0]
      axis.axvline(first, color="red", linestyle=":", label=f"{name}: non-finite at step {first}")
  axis.axhline(FLAGS.explode_clip, color="gray", linewidth=0.8, label=f"clip threshold {FLAGS.explode_clip}")
  axis.set_xlabel("training step")
  axis.set_ylabel("||g||_2 before clipping")
  axis.set_title(f"tanh RNN, rho(W_hh)={FLAGS.explode_radius}, SGD lr {FLAGS.explode_lr}, T={FLAGS.length}")
  axis.legend(fontsize=7)
  train.save_figure(fig, top.path("exploding.png"))
  return results


def main(argv):
  del argv
  runtime.retain_freed_memory()  # before any JAX computation (rnn_jax/runtime.py)
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required (e.g. --workdir=/tmp/gradient_flow)")
  unknown = set(FLAGS.parts) - {"jacobians", "exploding"}
  if unknown:
    raise app.UsageError(f"--parts: unknown {sorted(unknown)}; expected jacobians and/or exploding")
  if FLAGS.smoke:
    FLAGS.hidden, FLAGS.length, FLAGS.probe_size, FLAGS.batch = 8, 20, 2, 8
    FLAGS.train_steps, FLAGS.explode_steps = 10, 40
  top = train.RunDir(FLAGS.workdir, FLAGS.flag_values_dict())
  start = time.time()
  key = jax.random.PRNGKey(FLAGS.seed)
  results = {}
  if "jacobians" in FLAGS.parts:
    results["jacobians"] = jacobians_part(top, jax.random.fold_in(key, 0))
  if "exploding" in FLAGS.parts:
    results["exploding"] = exploding_part(top, jax.random.fold_in(key, 1))
    for name, r in results["exploding"].items():
      print(f"exploding demo [{name}]: {'NON-FINITE at step ' + str(r['first_non_finite_step']) if r['diverged'] else 'finite'}"
            f" after {r['steps_run']} steps; exploding events {r['exploding_events']}; "
            f"max finite ||g|| {r['max_grad_norm']}")
  train.write_results(FLAGS.workdir, results, FLAGS.flag_values_dict(), time.time() - start)
  logging.info("gradient_flow: wrote %s", FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
