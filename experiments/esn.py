"""Echo state networks: Mackey-Glass (tau = 17) 84 steps ahead, and a real series from statsmodels.

  python experiments/esn.py --workdir=/work/runs/esn
  python experiments/esn.py --smoke --workdir=/tmp/esn_smoke

Mackey-Glass (Jaeger & Haas 2004, Science): the series is sampled every time unit and squashed,
u = tanh(x - 1). A reservoir of --reservoir units is driven by u_t and its ridge read-out is fitted
to predict u_{t+1} on --train_length steps (the first --washout discarded). For each of --trials
test windows further along the series, the reservoir reads --warmup observed values and then runs
autonomously (its output fed back as input) for 84 steps;

  NRMSE_84 = sqrt( mean_trials (x_hat(n+84) - x(n+84))^2 / Var(x) ),

on the unsquashed values. Jaeger & Haas report about 10^-4.2 with 1000 units.

Real series (--real_series: sunspots or co2, bundled with statsmodels): one-step-ahead prediction
of the normalised series on the last --real_test_fraction (the reservoir reads x_t and predicts
x_{t+1}), the ridge lambda chosen on the last 20% of the training part, averaged over
--real_seeds reservoirs, against the persistence forecast x_hat(t+1) = x(t) and a
least-squares AR(--real_lags) model.

Writes results.json, metrics.jsonl, esn_mackey_glass.png and esn_<series>.png.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from rnn_jax import esn, runtime, tasks, train
from rnn_jax.sequence import run_cell

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Output directory.")
flags.DEFINE_integer("reservoir", 1000, "Reservoir size N (Mackey-Glass).")
flags.DEFINE_float("spectral_radius", 1.0, "Spectral radius rho of W_hh.")
flags.DEFINE_float("density", 0.01, "Fraction of non-zero W_hh entries (1% as in Jaeger & Haas).")
flags.DEFINE_float("input_scaling", 1.0, "Scale of W_xh.")
flags.DEFINE_float("bias_scaling", 0.2, "Scale of the reservoir bias b.")
flags.DEFINE_float("leak_rate", 1.0, "Leak rate alpha.")
flags.DEFINE_float("ridge", 1e-10, "Ridge lambda of the read-out.")
flags.DEFINE_integer("train_length", 3000, "Teacher-forced training steps.")
flags.DEFINE_integer("washout", 1000, "Initial training steps discarded before the fit.")
flags.DEFINE_integer("warmup", 500, "Observed steps read before each autonomous test run.")
flags.DEFINE_integer("horizon", 84, "Autonomous prediction horizon.")
flags.DEFINE_integer("trials", 100, "Test windows for NRMSE_84.")
flags.DEFINE_integer("trial_stride", 100, "Steps between consecutive test windows.")
flags.DEFINE_bool("x64", True, "Compute in float64 (the 1e-4 regime needs it).")
flags.DEFINE_enum("real_series", "sunspots", ["sunspots", "co2"], "statsmodels series.")
flags.DEFINE_integer("real_reservoir", 100, "Reservoir size for the real series.")
flags.DEFINE_float("real_spectral_radius", 0.9, "Spectral radius for the real series.")
flags.DEFINE_float("real_leak_rate", 0.5, "Leak rate for the real series.")
flags.DEFINE_integer("real_lags", 9, "Lags p of the AR(p) baseline.")
flags.DEFINE_float("real_test_fraction", 0.2, "Final fraction of the real series held out.")
flags.DEFINE_integer("real_seeds", 10, "Reservoirs averaged for the real series.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_bool("smoke", False, "A seconds-long run of the same code path.")

JAEGER_HAAS_LOG10_NRMSE84 = -4.2


def mackey_glass_part(run, key) -> dict:
  """Fit on teacher-forced Mackey-Glass, then NRMSE of autonomous runs at every horizon step."""
  first_test = FLAGS.train_length + FLAGS.warmup
  total = first_test + FLAGS.trials * FLAGS.trial_stride + FLAGS.horizon + 1
  series = tasks.mackey_glass(total)
  squashed = np.tanh(series - 1.0)
  dtype = "float64" if FLAGS.x64 else "float32"
  reservoir = esn.Reservoir(FLAGS.reservoir, spectral_radius=FLAGS.spectral_radius, density=FLAGS.density,
                            input_scaling=FLAGS.input_scaling, bias_scaling=FLAGS.bias_scaling,
                            leak_rate=FLAGS.leak_rate, param_dtype=dtype)
  model = esn.ESN(reservoir, washout=FLAGS.washout, ridge=FLAGS.ridge)
  params = reservoir.init(key, 1)
  inputs = jnp.asarray(squashed[:FLAGS.train_length - 1, None], dtype)
  targets = jnp.asarray(squashed[1:FLAGS.train_length, None], dtype)
  start = time.time()
  w_hy, _, hs = model.fit(params, inputs, targets)
  fit_s = time.time() - start
  train_nrmse = esn.nrmse(model.predict(w_hy, inputs, hs)[FLAGS.washout:], targets[FLAGS.washout:])

  @jax.jit
  def forecast(observed):
    """observed [warmup, 1] -> the next ``horizon`` squashed values, generated autonomously."""
    last, _ = model.states(params, observed)
    return model.generate(params, w_hy, last, observed[-1], FLAGS.horizon)[:, 0]

  starts = first_test + FLAGS.trial_stride * np.arange(FLAGS.trials)
  windows = np.stack([squashed[s - FLAGS.warmup:s] for s in starts])[..., None]
  predicted = np.asarray(jax.lax.map(forecast, jnp.asarray(windows, dtype)))
  predicted = np.arctanh(np.clip(predicted, -1 + 1e-15, 1 - 1e-15)) + 1.0
  truth = np.stack([series[s:s + FLAGS.horizon] for s in starts])
  variance = float(np.var(series))
  nrmse_by_horizon = np.sqrt(np.mean((predicted - truth) ** 2, axis=0) / variance)
  for step in range(0, FLAGS.horizon, max(FLAGS.horizon // 12, 1)):
    run.log(step + 1, "mackey_glass", nrmse=float(nrmse_by_horizon[step]))
  nrmse84 = float(nrmse_by_horizon[-1])
  run.log(FLAGS.horizon, "mackey_glass", nrmse=nrmse84, log10_nrmse=float(np.log10(nrmse84)))

  plt = _plt()
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
  example = 0
  context = series[starts[example] - 100:starts[example]]
  left.plot(np.arange(-100, 0), context, color="black", label="observed")
  left.plot(np.arange(FLAGS.horizon), truth[example], color="black", linestyle=":", label="true continuation")
  left.plot(np.arange(FLAGS.horizon), predicted[example], color="C1", label="ESN, autonomous")
  left.set_xlabel("steps after the last observation")
  left.set_title("Mackey-Glass tau=17: an autonomous continuation")
  left.legend(fontsize=8)
  right.semilogy(np.arange(1, FLAGS.horizon + 1), nrmse_by_horizon, label=f"ours, N={FLAGS.reservoir}")
  right.axhline(10 ** JAEGER_HAAS_LOG10_NRMSE84, color="gray", linestyle="--",
                label="Jaeger & Haas 2004 at 84 (10^-4.2)")
  right.set_xlabel("steps ahead")
  right.set_ylabel(f"NRMSE over {FLAGS.trials} test windows")
  right.set_title(f"NRMSE_84 = 10^{np.log10(nrmse84):.2f}")
  right.legend(fontsize=8)
  train.save_figure(fig, run.path("esn_mackey_glass.png"))
  return {"nrmse84": nrmse84, "log10_nrmse84": float(np.log10(nrmse84)),
          "published_log10_nrmse84": JAEGER_HAAS_LOG10_NRMSE84, "train_nrmse_one_step": train_nrmse,
          "nrmse_by_horizon": nrmse_by_horizon.tolist(), "fit_wall_s": fit_s,
          "reservoir": FLAGS.reservoir, "trials": FLAGS.trials}


def lagged(values: np.ndarray, lags: int) -> tuple[np.ndarray, np.ndarray]:
  """Rows [x(t-p+1) .. x(t)] -> targets x(t+1): ([N-p, p], [N-p]); row i predicts x[i + p]."""
  rows = np.stack([values[i:len(values) - lags + i] for i in range(lags)], axis=1)
  return rows, values[lags:]


def real_series_part(run, key) -> dict:
  """One-step-ahead ESN prediction of a statsmodels series, against persistence and AR(p).

  ESN: input x_t (the normalised series), read-out z_t = [1; x_t; h_t] -> x_{t+1}. The first
  points with t + 1 < N_train train it; the rest are the test set, predicted while the
  reservoir keeps reading the observed series.
  """
  times, values = tasks.real_series(FLAGS.real_series)
  num_test = int(round(FLAGS.real_test_fraction * len(values)))
  num_train = len(values) - num_test
  mean, std = values[:num_train].mean(), values[:num_train].std()
  x = (values - mean) / std
  dtype = "float64" if FLAGS.x64 else "float32"
  inputs = jnp.asarray(x[:-1, None], dtype)       # step t reads x_t and predicts x_{t+1}
  targets = x[1:]
  fit_end = num_train - 1                          # steps t < fit_end have targets in the training part
  washout = min(20, fit_end // 4)

  def esn_predictions(seed_key, ridge, fit_steps):
    """Drive a fresh reservoir over the whole series; fit the read-out on steps [washout, fit_steps)."""
    reservoir = esn.Reservoir(FLAGS.real_reservoir, spectral_radius=FLAGS.real_spectral_radius,
                              input_scaling=0.5, bias_scaling=0.2, leak_rate=FLAGS.real_leak_rate,
                              param_dtype=dtype)
    params = reservoir.init(seed_key, 1)
    _, hs = run_cell(reservoir, params, inputs)
    features = esn.readout_features(inputs, hs)
    w_hy = esn.ridge_readout(features[washout:fit_steps], jnp.asarray(targets[washout:fit_steps, None], dtype),
                             ridge)
    return np.asarray(features @ w_hy.T)[:, 0]

  validation_start = int(0.8 * fit_end)
  ridges = [10.0 ** e for e in range(-8, 2)]
  scores = []
  for ridge in ridges:
    predictions = esn_predictions(jax.random.fold_in(key, 0), ridge, validation_start)
    scores.append(esn.nrmse(predictions[validation_start:fit_end], targets[validation_start:fit_end]))
    run.log(len(scores), f"{FLAGS.real_series}_ridge_search", ridge=ridge, valid_nrmse=scores[-1])
  best_ridge = ridges[int(np.argmin(scores))]
  test_targets = targets[fit_end:]
  per_seed = [esn_predictions(jax.random.fold_in(key, seed), best_ridge, fit_end)[fit_end:]
              for seed in range(FLAGS.real_seeds)]
  esn_scores = [esn.nrmse(pred, test_targets) for pred in per_seed]
  persistence = esn.nrmse(x[num_train - 1:-1], test_targets)
  p = FLAGS.real_lags
  rows, lag_targets = lagged(x, p)
  design = np.concatenate([np.ones((len(rows), 1)), rows], axis=1)
  ar_train = num_train - p                         # rows whose target lies in the training part
  ar_weights = np.linalg.lstsq(design[:ar_train], lag_targets[:ar_train], rcond=None)[0]
  ar_predictions = design[ar_train:] @ ar_weights
  ar = esn.nrmse(ar_predictions, test_targets)
  run.log(FLAGS.real_seeds, FLAGS.real_series, esn_nrmse_mean=float(np.mean(esn_scores)),
          esn_nrmse_std=float(np.std(esn_scores)), persistence_nrmse=persistence, ar_nrmse=ar)

  plt = _plt()
  fig, axis = plt.subplots(figsize=(9, 3.5))
  test_times = times[num_train:]
  axis.plot(times, values, color="black", linewidth=0.8, label=FLAGS.real_series)
  axis.plot(test_times, np.mean(per_seed, axis=0) * std + mean, color="C1",
            label=f"ESN one step ahead (NRMSE {np.mean(esn_scores):.3f})")
  axis.plot(test_times, ar_predictions * std + mean, color="C2", linestyle="--", label=f"AR({p}) (NRMSE {ar:.3f})")
  axis.axvline(test_times[0], color="gray", linestyle=":")
  axis.set_title(f"statsmodels {FLAGS.real_series}: held-out last {num_test} points")
  axis.legend(fontsize=8)
  train.save_figure(fig, run.path(f"esn_{FLAGS.real_series}.png"))
  return {"series": FLAGS.real_series, "points": len(values), "test_points": num_test,
          "esn_nrmse_mean": float(np.mean(esn_scores)), "esn_nrmse_std": float(np.std(esn_scores)),
          "esn_nrmse_per_seed": esn_scores, "ridge": best_ridge, "persistence_nrmse": persistence,
          "ar_nrmse": ar, "lags": p, "reservoir": FLAGS.real_reservoir}


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def main(argv):
  del argv
  runtime.retain_freed_memory()  # before any JAX computation (rnn_jax/runtime.py)
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required (e.g. --workdir=/tmp/esn)")
  if FLAGS.washout >= FLAGS.train_length:
    raise app.UsageError(f"--washout ({FLAGS.washout}) must be shorter than --train_length ({FLAGS.train_length})")
  if FLAGS.x64:
    jax.config.update("jax_enable_x64", True)
  if FLAGS.smoke:
    FLAGS.reservoir, FLAGS.train_length, FLAGS.washout, FLAGS.warmup = 50, 400, 100, 100
    FLAGS.trials, FLAGS.real_seeds, FLAGS.real_reservoir, FLAGS.ridge = 3, 2, 20, 1e-6
  run = train.RunDir(FLAGS.workdir, FLAGS.flag_values_dict())
  key = jax.random.PRNGKey(FLAGS.seed)
  start = time.time()
  results = {"mackey_glass": mackey_glass_part(run, jax.random.fold_in(key, 0)),
             "real_series": real_series_part(run, jax.random.fold_in(key, 1))}
  train.write_results(FLAGS.workdir, results, FLAGS.flag_values_dict(), time.time() - start)
  mg, real = results["mackey_glass"], results["real_series"]
  print(f"Mackey-Glass: NRMSE_84 = {mg['nrmse84']:.3g} (10^{mg['log10_nrmse84']:.2f}; Jaeger & Haas 10^-4.2) "
        f"with {mg['reservoir']} units over {mg['trials']} windows")
  print(f"{real['series']}: one-step NRMSE ESN {real['esn_nrmse_mean']:.3f} +- {real['esn_nrmse_std']:.3f}, "
        f"AR({real['lags']}) {real['ar_nrmse']:.3f}, persistence {real['persistence_nrmse']:.3f}")
  logging.info("esn: wrote %s", FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
