"""Gradient flow through time, measured: vanishing and exploding gradients and the clipping cure.

  python experiments/gradient_flow.py                          # both parts
  python experiments/gradient_flow.py --preset=exploding       # the clipping demonstration only
  python experiments/gradient_flow.py --smoke                  # seconds, the same code path

Back-propagation through time multiplies one Jacobian per step (Pascanu, Mikolov & Bengio 2013):

  dh_T/dh_k = prod_{t=k+1..T} dh_t/dh_{t-1},   dh_t/dh_{t-1} = diag(f'(a_t)) W_hh   (Elman),

so ||dh_T/dh_k|| shrinks or grows geometrically with the lag T - k.

Part "jacobians": for each model (tanh default init, tanh orthogonal, IRNN, LSTM, GRU, see
rnn_jax.lab) and a fixed ESN reservoir, ||dh_T/dh_k|| and ||dL/dh_k|| against the lag T - k on
adding-problem sequences of length seq_len, computed exactly with JAX autodiff through the scan
(rnn_jax.diagnostics, in float64 so that norms far below float32's range stay exact), at
initialisation and after training on the adding problem (``steps`` steps of Adam through the one
recipe, or until solved); and the singular values of each gate block of W_hh before and after.

Part "exploding": a tanh RNN whose W_hh has spectral radius exploding_spectral_radius (1.5),
trained with plain SGD at exploding_learning_rate without clipping (||g|| explodes and the loss
becomes non-finite), then the identical run with the gradient clipped to global norm
exploding_clip (it stays finite). Every step's ||g|| (before clipping) is recorded with the
exploding events (||g|| > exploding_clip, or non-finite).

Writes jacobian_norms.png, loss_gradient_norms.png, spectra.png, training_curves.png,
exploding.png and results.json under --workdir, and one run directory per training run
(train_<model>/, exploding_no_clipping/, exploding_clipped/) with config.json, metrics.jsonl,
results.json, grad_norms.json, model.json, checkpoints/ and curves.png.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

if __package__:
  from experiments import common
else:  # run as a script: experiments/ is on sys.path
  import common
from rnn_jax import cells, diagnostics, esn, lab, plots, tasks
from rnn_jax.config import field
from rnn_jax.rundir import RunDir, RunOptions

PARTS = ("jacobians", "exploding")
GATE_NAMES = {1: ["h"], 3: ["r", "z", "n"], 4: ["i", "f", "g", "o"]}   # W_hh blocks: Elman, GRU, LSTM


@dataclasses.dataclass(frozen=True)
class Config(lab.LabConfig):
  """gradient_flow: H = 64, adding problem T = 100, Adam 1e-2 with global-norm clipping at 1."""
  parts: tuple[str, ...] = field(PARTS, "Parts to run: jacobians, exploding.", choices=PARTS, fixed=True)
  models: tuple[str, ...] = field(tuple(m for m in lab.MODEL_NAMES if m != "esn"),
                                  "Gradient-trained models of the jacobians part.",
                                  choices=tuple(m for m in lab.MODEL_NAMES if m != "esn"), fixed=True)
  seq_len: int = field(100, "Sequence length T of the adding problem (training and diagnostics).", minimum=2,
                       fixed=True)
  probe_sequences: int = field(8, "Sequences averaged (geometric mean) in the norm-vs-lag curves.", minimum=1)
  esn_spectral_radius: float = field(0.95, "Spectral radius of the reference ESN reservoir.", minimum=0.0)
  exploding_spectral_radius: float = field(1.5, "Spectral radius of W_hh in the exploding part.", minimum=0.0,
                                           fixed=True)
  exploding_learning_rate: float = field(0.1, "Plain-SGD learning rate of both exploding-part runs.",
                                         minimum=0.0)
  exploding_clip: float = field(1.0, "Global-norm clip of the clipped exploding-part run, and the ||g|| "
                                "counted as an exploding event.", minimum=0.0)
  eval_every: int = 200

  def validate(self) -> None:
    super().validate()
    if not self.parts:
      raise ValueError("parts must name at least one of jacobians, exploding")
    if "jacobians" in self.parts and not self.models:
      raise ValueError("models must name at least one model for the jacobians part")
    if "exploding" in self.parts:
      if not self.exploding_clip > 0:
        raise ValueError(f"exploding_clip must be > 0: the exploding part compares no clipping with "
                         f"clipping at this threshold, got {self.exploding_clip}")
      if not self.exploding_learning_rate > 0 or not self.exploding_spectral_radius > 0:
        raise ValueError(f"exploding_learning_rate and exploding_spectral_radius must be > 0, got "
                         f"{self.exploding_learning_rate} and {self.exploding_spectral_radius}")
    if "jacobians" in self.parts and not self.esn_spectral_radius > 0:
      raise ValueError(f"esn_spectral_radius must be > 0, got {self.esn_spectral_radius}")


PRESETS = {
    "jacobians": dict(parts=("jacobians",)),
    "exploding": dict(parts=("exploding",), steps=200, eval_every=50, log_every=10),
}
SMOKE = dict(models=("tanh", "lstm"), hidden_size=8, seq_len=20, probe_sequences=2, batch_size=8, steps=10,
             eval_every=5, log_every=5, eval_sequences=50)


def curve_summary(norms) -> dict:
  """Selected lags of a norm-vs-lag curve and its mean log10 change per step of lag (fitted over
  the finite, positive norms at lags >= 1)."""
  norms = np.asarray(norms, np.float64)
  lags = [lag for lag in (1, 10, 50, len(norms) - 1) if lag < len(norms)]
  finite = np.isfinite(norms) & (norms > 0)
  slope = None
  if finite.sum() > 2:
    x = np.arange(len(norms))[finite]
    slope = float(np.polyfit(x[1:], np.log10(norms[finite][1:]), 1)[0])
  return {"at_lag": {str(lag): float(norms[lag]) for lag in lags}, "log10_per_lag": slope}


def to_float64(tree):
  """Every array leaf of ``tree`` as float64 (inside ``jax.enable_x64``)."""
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), tree)


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_by_lag(curves: dict, path: str, title: str, ylabel: str) -> str:
  """One panel per phase (at initialisation, after training), one line per model, log y vs lag."""
  plt = _pyplot()
  phases = [p for p in ("init", "trained") if any(p in c for c in curves.values())]
  fig, axes = plt.subplots(1, len(phases), figsize=(6 * len(phases), 4.2), squeeze=False, sharey=True)
  underflow = False
  for axis, phase in zip(axes[0], phases):
    for index, (model, by_phase) in enumerate(curves.items()):
      norms = by_phase.get(phase, by_phase.get("fixed"))
      if norms is None:   # diverged in training: say so in the legend
        axis.plot([], [], color=plots.RUN_COLORS[index % len(plots.RUN_COLORS)], label=f"{model}: diverged")
        continue
      norms = np.asarray(norms, np.float64)
      underflow |= bool(np.any(norms <= 0))
      axis.semilogy(np.arange(len(norms)), np.where(norms > 0, norms, np.nan), label=model,
                    color=plots.RUN_COLORS[index % len(plots.RUN_COLORS)],
                    linestyle=":" if "fixed" in by_phase else "-")
    axis.set_xlabel("lag T - k (steps)")
    axis.set_title("at initialisation" if phase == "init" else "after training (or when solved)", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
  axes[0][0].set_ylabel(ylabel)
  note = " (norms that underflow to 0 are not drawn)" if underflow else ""
  fig.suptitle(title + note, fontsize=11)
  return plots.save_figure(fig, path)


def plot_spectra(spectra: dict, path: str, title: str) -> str:
  """Singular values of each gate block of W_hh, at init (dashed) and after training (solid)."""
  plt = _pyplot()
  count = len(spectra)
  rows = math.ceil(count / plots.MAX_COLUMNS)
  columns = math.ceil(count / rows)           # at most four per row, the rows as even as they can be
  fig, axes = plt.subplots(rows, columns, figsize=(3.8 * columns, 3.2 * rows + 0.4), squeeze=False)
  flat = [axis for row in axes for axis in row]
  for axis in flat[count:]:
    axis.set_visible(False)
  for axis, (model, by_phase) in zip(flat, spectra.items()):
    values = []
    for phase, style in (("init", "--"), ("trained", "-")):
      blocks = by_phase.get(phase)
      if blocks is None:
        continue
      blocks = np.asarray(blocks)
      names = GATE_NAMES.get(len(blocks), [str(g) for g in range(len(blocks))])
      for gate, singular in enumerate(blocks):
        values.extend(singular.tolist())
        axis.plot(np.arange(1, len(singular) + 1), singular, style, color=f"C{gate}",
                  label=f"W_h{names[gate]}, {'init' if phase == 'init' else 'trained'}")
    if plots.use_log_scale([v for v in values if v > 0]) and all(v > 0 for v in values):
      axis.set_yscale("log")
    axis.set_title(model if "trained" in by_phase else f"{model} (diverged: init only)", fontsize=10)
    axis.set_xlabel("index i (descending)")
    axis.set_ylabel("singular value sigma_i")
    axis.grid(alpha=0.3)
    entries = len(axis.get_legend_handles_labels()[1])
    axis.legend(fontsize=6, ncol=2 if entries > 4 else 1)
  fig.suptitle(title, fontsize=11)
  return plots.save_figure(fig, path)


def jacobians_part(run: RunDir, config: Config, key, progress: bool) -> dict:
  """Norm-vs-lag curves and W_hh spectra at init and after training, for every model."""
  spec = lab.make_task("adding", config.seq_len)
  key_probe, key_data, key_models = jax.random.split(key, 3)
  probe = tasks.adding_problem(key_probe, config.probe_sequences, config.seq_len)
  data = lab.task_data(spec, key_data, batch_size=config.batch_size, eval_sequences=config.eval_sequences)
  jacobian_curves, loss_curves, spectra, summary, runs = {}, {}, {}, {}, {}

  def measure(cell, params):
    """(||dh_T/dh_k||, ||dL/dh_k||) by lag, in float64: in float32 the squares inside a norm
    underflow once the entries fall below ~1e-19, long before the norms stop being meaningful."""
    with jax.enable_x64(True):
      params, xs, targets = to_float64((params, probe.xs, probe.targets))
      jac = diagnostics.jacobian_norms_by_lag(cell, params["rnn"], xs)
      loss = diagnostics.loss_gradient_norms_by_lag(cell, params["rnn"], xs,
                                                    lab.loss_of_hidden(spec, params["head"], targets))
      return np.asarray(jac), np.asarray(loss)

  for index, model in enumerate(config.models):
    cell = lab.make_model_cell(model, config.hidden_size, config.lstm_forget_bias)
    model_key = jax.random.fold_in(key_models, index)
    params = lab.TaskModel(cell, spec).init(model_key)
    jac_init, loss_init = measure(cell, params)
    child = run.child(f"train_{model}", label=f"gradient_flow adding T={config.seq_len} {model}")
    outcome = lab.train_model(cell, data, config, child, model_key, params=params, progress=progress)
    lab.plot_training(child, f"gradient_flow adding T={config.seq_len}: {model}, H={config.hidden_size}, "
                      f"{config.optimizer} lr {config.learning_rate:g}, clip {config.clip:g}", spec)
    runs[model] = child.workdir
    phases = {"init": (jac_init, loss_init)}
    spectra[model] = {"init": diagnostics.recurrent_spectrum(params["rnn"]["w_hh"]).singular_values}
    radius = {"init": diagnostics.recurrent_spectrum(params["rnn"]["w_hh"]).spectral_radius.tolist()}
    if outcome["params"] is not None:
      trained = outcome["params"]
      phases["trained"] = measure(cell, trained)
      spectrum = diagnostics.recurrent_spectrum(trained["rnn"]["w_hh"])
      spectra[model]["trained"] = spectrum.singular_values
      radius["trained"] = spectrum.spectral_radius.tolist()
    jacobian_curves[model] = {phase: values[0] for phase, values in phases.items()}
    loss_curves[model] = {phase: values[1] for phase, values in phases.items()}
    summary[model] = {
        "valid_mse": outcome["valid_mse"], "test_mse": outcome["test_mse"], "solved": outcome["solved"],
        "train_steps": outcome["steps"], "diverged": outcome["diverged"],
        "exploding_events": outcome["gradient"]["exploding_events"], "spectral_radius": radius,
        "jacobian_norm": {phase: curve_summary(c) for phase, c in jacobian_curves[model].items()},
        "loss_gradient_norm": {phase: curve_summary(c) for phase, c in loss_curves[model].items()},
    }
    trained_norm = jacobian_curves[model].get("trained")
    logging.info("gradient_flow %s: ||dh_T/dh_k|| at lag %d: %.3g at init, %s after %d steps (test mse %s)",
                 model, config.seq_len - 1, jac_init[-1],
                 "n/a" if trained_norm is None else f"{trained_norm[-1]:.3g}", outcome["steps"],
                 "n/a" if outcome["test_mse"] is None else f"{outcome['test_mse']:.4g}")
  reservoir = esn.Reservoir(config.hidden_size, spectral_radius=config.esn_spectral_radius)
  reservoir_params = reservoir.init(jax.random.fold_in(key_models, 99), 2)
  with jax.enable_x64(True):
    reservoir_params, probe_xs = to_float64((reservoir_params, probe.xs))
    jac_esn = np.asarray(diagnostics.jacobian_norms_by_lag(reservoir, reservoir_params, probe_xs))
  jacobian_curves[f"ESN reservoir, rho {config.esn_spectral_radius:g} (fixed)"] = {"fixed": jac_esn}
  summary["esn_reservoir"] = {"spectral_radius": config.esn_spectral_radius,
                              "jacobian_norm": curve_summary(jac_esn)}
  setting = (f"H={config.hidden_size}, adding T={config.seq_len}, geometric mean over "
             f"{config.probe_sequences} sequences")
  plot_by_lag(jacobian_curves, run.path("jacobian_norms.png"), f"gradient_flow: ||dh_T/dh_k||_2, {setting}",
              "||dh_T / dh_k||_2 (spectral norm)")
  plot_by_lag(loss_curves, run.path("loss_gradient_norms.png"),
              f"gradient_flow: ||dL/dh_k||, H={config.hidden_size}, adding T={config.seq_len}, "
              f"{config.probe_sequences} sequences", "||dL / dh_k||_2")
  plot_spectra(spectra, run.path("spectra.png"),
               f"gradient_flow: singular values of W_hh blocks, H={config.hidden_size}, at init (dashed) and "
               f"after training on adding T={config.seq_len} (solid)")
  diverged = [f"{m} diverged at step {s['train_steps']}" for m, s in summary.items() if s.get("diverged")]
  plots.plot_comparison(runs, ["mse"], f"gradient_flow: adding T={config.seq_len}, H={config.hidden_size}, "
                        f"{config.optimizer} lr {config.learning_rate:g}, clip {config.clip:g}"
                        + "".join(f"; {d}" for d in diverged),
                        run.path("training_curves.png"), labels=lab.METRIC_LABELS,
                        reference={"mse": {"baseline": (spec.baseline, f"no memory {spec.baseline:.3g}"),
                                           "solved": (spec.target, f"solved < {spec.target:g}")}},
                        final={m: "diverged" if s["diverged"] else f"test {s['test_mse']:.3g}"
                               for m, s in summary.items() if m in runs})
  return summary


def exploding_part(run: RunDir, config: Config, key, progress: bool) -> dict:
  """The same exploding tanh RNN trained with plain SGD without and with gradient clipping."""
  spec = lab.make_task("adding", config.seq_len)
  key_data, key_model = jax.random.split(key)
  data = lab.task_data(spec, key_data, batch_size=config.batch_size, eval_sequences=config.eval_sequences)
  cell = cells.Elman(config.hidden_size, activation="tanh", spectral_radius=config.exploding_spectral_radius)
  results, norms = {}, {}
  for name, clip in (("no_clipping", 0.0), ("clipped", config.exploding_clip)):
    child_config = dataclasses.replace(config, optimizer="sgd", learning_rate=config.exploding_learning_rate,
                                       clip=clip, clip_mode="norm", schedule="constant")
    child = run.child(f"exploding_{name}", child_config, label=f"gradient_flow exploding {name}")
    outcome = lab.train_model(cell, data, child_config, child, key_model, progress=progress,
                              exploding_threshold=config.exploding_clip)
    lab.plot_training(child, f"gradient_flow exploding, {name.replace('_', ' ')}: tanh RNN "
                      f"H={config.hidden_size}, rho(W_hh) = {config.exploding_spectral_radius:g}, SGD lr "
                      f"{config.exploding_learning_rate:g}" + (f", clip {clip:g}" if clip else ""), spec)
    norms[name] = outcome["grad_norms"]
    gradient = outcome["gradient"]
    results[name] = {"clip": clip, "steps_run": outcome["steps"], "diverged": outcome["diverged"],
                     "test_mse": outcome["test_mse"], **gradient}
  plt = _pyplot()
  fig, axis = plt.subplots(figsize=(7, 4.2))
  for index, (name, values) in enumerate(norms.items()):
    values = np.asarray(values, np.float64)
    steps = np.arange(1, len(values) + 1)
    finite = np.isfinite(values)
    color = plots.RUN_COLORS[index]
    label = "no clipping" if name == "no_clipping" else f"clipped at ||g|| = {config.exploding_clip:g}"
    axis.semilogy(steps[finite], values[finite], color=color, label=label,
                  marker="o" if finite.sum() < 25 else None, markersize=3)
    if (~finite).any():
      first = int(steps[~finite][0])
      axis.axvline(first, color=color, linestyle=":", label=f"{label}: non-finite at step {first}")
  axis.axhline(config.exploding_clip, color="black", linestyle="--", linewidth=1.0,
               label=f"clip threshold {config.exploding_clip:g}")
  axis.set_xlabel("training step")
  axis.set_ylabel("||g||_2 before clipping")
  axis.grid(alpha=0.3)
  axis.legend(fontsize=8)
  axis.set_title(f"gradient_flow exploding: tanh RNN H={config.hidden_size}, rho(W_hh) = "
                 f"{config.exploding_spectral_radius:g}, SGD lr {config.exploding_learning_rate:g}, adding "
                 f"T={config.seq_len}", fontsize=10)
  plots.save_figure(fig, run.path("exploding.png"))
  for name, r in results.items():
    state = f"non-finite at step {r['first_non_finite_step']}" if r["diverged"] else "finite"
    max_norm = "n/a" if r["max_grad_norm"] is None else f"{r['max_grad_norm']:.3g}"
    print(f"gradient_flow exploding {name}: {state} after {r['steps_run']} steps; exploding events "
          f"{r['exploding_events']}; max finite ||g|| {max_norm}")
  return results


def train_and_evaluate(config: Config, workdir: str, options=None) -> dict:
  """Run the requested parts into ``workdir``; returns results.json's content."""
  options = options or RunOptions()
  run = RunDir(workdir, "gradient_flow", config, options, label="gradient_flow")
  key = jax.random.PRNGKey(config.seed)
  results = {}
  if "jacobians" in config.parts:
    results["jacobians"] = jacobians_part(run, config, jax.random.fold_in(key, 0), options.progress)
  if "exploding" in config.parts:
    results["exploding"] = exploding_part(run, config, jax.random.fold_in(key, 1), options.progress)
  return run.finish(results)


EXPERIMENT = common.Experiment("gradient_flow", Config, train_and_evaluate, PRESETS, SMOKE, __doc__)

if __name__ == "__main__":
  common.main(EXPERIMENT)
