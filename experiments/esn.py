"""Echo state networks: Mackey-Glass (tau = 17) 84 steps ahead, and a real series from statsmodels.

  python experiments/esn.py                               # N = 1000, 100 test windows, sunspots
  python experiments/esn.py --real_series=co2             # Mauna Loa CO2 instead of sunspots
  python experiments/esn.py --smoke                       # seconds, the same code path

No gradient: the reservoir is fixed and only the read-out is fitted, in closed form
(rnn_jax.esn; Jaeger 2001).

Mackey-Glass (Jaeger & Haas 2004, Science): the series is sampled every time unit and squashed,
u = tanh(x - 1). A reservoir of hidden_size units is driven by u_t and its ridge read-out is
fitted to predict u_{t+1} on train_length steps (the first washout discarded). For each of
``trials`` test windows further along the series, the reservoir reads ``warmup`` observed values
and then runs autonomously (its output fed back as input) for ``horizon`` = 84 steps;

  NRMSE_84 = sqrt( mean_trials (x_hat(n+84) - x(n+84))^2 / Var(x) ),

on the unsquashed values. Jaeger & Haas report NRMSE_84 ~ 10^-4.2 with 1000 units.

Real series (real_series: sunspots or co2, bundled with statsmodels): one-step-ahead prediction
of the normalised series on the last real_test_fraction (the reservoir reads x_t and predicts
x_{t+1}), the ridge lambda chosen on the last 20% of the training part, averaged over
real_reservoirs reservoirs, against the persistence forecast x_hat(t+1) = x(t) and a
least-squares AR(real_lags) model.

Writes config.json, metrics.jsonl, results.json, esn_mackey_glass.png and esn_<series>.png
under --workdir.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

if __package__:
  from experiments import common
else:  # run as a script: experiments/ is on sys.path
  import common
from rnn_jax import esn, plots, tasks
from rnn_jax.config import field
from rnn_jax.rundir import RunDir, RunOptions
from rnn_jax.sequence import run_cell

JAEGER_HAAS_LOG10_NRMSE84 = -4.2
JAEGER_HAAS = "Jaeger & Haas 2004, N=1000: 10^-4.2"


@dataclasses.dataclass(frozen=True)
class Config:
  """esn: a 1000-unit reservoir with 1% connectivity on Mackey-Glass, float64."""
  hidden_size: int = field(1000, "Reservoir size N (Mackey-Glass).", minimum=1)
  spectral_radius: float = field(1.0, "Spectral radius rho of W_hh (Mackey-Glass).", minimum=0.0)
  density: float = field(0.01, "Fraction of non-zero W_hh entries (1% as in Jaeger & Haas).", minimum=0.0,
                         maximum=1.0)
  input_scaling: float = field(1.0, "Scale of W_xh (Mackey-Glass).", minimum=0.0)
  bias_scaling: float = field(0.2, "Scale of the reservoir bias b (Mackey-Glass).", minimum=0.0)
  leak_rate: float = field(1.0, "Leak rate alpha (Mackey-Glass).", minimum=0.0, maximum=1.0)
  ridge: float = field(1e-10, "Ridge lambda of the Mackey-Glass read-out.", minimum=0.0)
  train_length: int = field(3000, "Teacher-forced training steps (Mackey-Glass).", minimum=2)
  washout: int = field(1000, "Initial training steps discarded before the fit.", minimum=0)
  warmup: int = field(500, "Observed steps read before each autonomous test run.", minimum=1)
  horizon: int = field(84, "Autonomous prediction horizon in steps.", minimum=1)
  trials: int = field(100, "Test windows averaged in NRMSE_84.", minimum=1)
  trial_stride: int = field(100, "Steps between consecutive test windows.", minimum=1)
  float64: bool = field(True, "Compute in float64 (the 1e-4 regime needs it).")
  real_series: str = field("sunspots", "statsmodels series for one-step-ahead prediction.",
                           choices=tasks.REAL_SERIES)
  real_hidden_size: int = field(100, "Reservoir size for the real series.", minimum=1)
  real_spectral_radius: float = field(0.9, "Spectral radius for the real series.", minimum=0.0)
  real_leak_rate: float = field(0.5, "Leak rate for the real series.", minimum=0.0, maximum=1.0)
  real_lags: int = field(9, "Lags p of the AR(p) baseline.", minimum=1)
  real_test_fraction: float = field(0.2, "Final fraction of the real series held out.", minimum=0.0,
                                    maximum=1.0)
  real_reservoirs: int = field(10, "Reservoirs (seeds) averaged for the real series.", minimum=1)
  seed: int = field(0, "Seed of the reservoirs.")

  def validate(self) -> None:
    if self.washout >= self.train_length:
      raise ValueError(f"washout ({self.washout}) must be shorter than train_length ({self.train_length})")
    for name in ("spectral_radius", "density", "leak_rate", "real_spectral_radius", "real_leak_rate",
                 "real_test_fraction"):
      if not getattr(self, name) > 0:
        raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
    if self.real_test_fraction >= 1:
      raise ValueError(f"real_test_fraction must be < 1, got {self.real_test_fraction}")


PRESETS = {}
SMOKE = dict(hidden_size=50, train_length=400, washout=100, warmup=100, trials=3, real_reservoirs=2,
             real_hidden_size=20, ridge=1e-6)


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def mackey_glass_part(run: RunDir, config: Config, key) -> dict:
  """Fit on teacher-forced Mackey-Glass, then NRMSE of autonomous runs at every horizon step."""
  first_test = config.train_length + config.warmup
  total = first_test + config.trials * config.trial_stride + config.horizon + 1
  series = tasks.mackey_glass(total)
  squashed = np.tanh(series - 1.0)
  dtype = "float64" if config.float64 else "float32"
  reservoir = esn.Reservoir(config.hidden_size, spectral_radius=config.spectral_radius,
                            density=config.density, input_scaling=config.input_scaling,
                            bias_scaling=config.bias_scaling,
                            leak_rate=config.leak_rate, param_dtype=dtype)
  model = esn.ESN(reservoir, washout=config.washout, ridge=config.ridge)
  params = reservoir.init(key, 1)
  inputs = jnp.asarray(squashed[:config.train_length - 1, None], dtype)
  targets = jnp.asarray(squashed[1:config.train_length, None], dtype)
  start = time.time()
  w_hy, _, hs = model.fit(params, inputs, targets)
  fit_s = time.time() - start
  train_nrmse = esn.nrmse(model.predict(w_hy, inputs, hs)[config.washout:], targets[config.washout:])

  @jax.jit
  def forecast(observed):
    """observed [warmup, 1] -> the next ``horizon`` squashed values, generated autonomously."""
    last, _ = model.states(params, observed)
    return model.generate(params, w_hy, last, observed[-1], config.horizon)[:, 0]

  starts = first_test + config.trial_stride * np.arange(config.trials)
  windows = np.stack([squashed[s - config.warmup:s] for s in starts])[..., None]
  predicted = np.asarray(jax.lax.map(forecast, jnp.asarray(windows, dtype)))
  predicted = np.arctanh(np.clip(predicted, -1 + 1e-15, 1 - 1e-15)) + 1.0
  truth = np.stack([series[s:s + config.horizon] for s in starts])
  variance = float(np.var(series))
  nrmse_by_horizon = np.sqrt(np.mean((predicted - truth) ** 2, axis=0) / variance)
  nrmse_final = float(nrmse_by_horizon[-1])
  run.log(0, "train", mackey_glass_one_step_nrmse=train_nrmse)
  run.log(0, "test", **{f"mackey_glass_nrmse_{config.horizon}": nrmse_final})

  plt = _pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
  context = series[starts[0] - 100:starts[0]]
  ahead = np.arange(1, config.horizon + 1)
  left.plot(np.arange(-99, 1), context, color="black", label="observed (read by the reservoir)")
  left.plot(ahead, predicted[0], color="tab:orange", linewidth=2.5, label="ESN, autonomous")
  left.plot(ahead, truth[0], color="black", linestyle=":", linewidth=1.5, label="true continuation")
  left.axvline(0, color="gray", linewidth=0.8)
  left.set_xlabel("steps after the last observation")
  left.set_ylabel("x(t)")
  left.set_title("the first test window", fontsize=10)
  left.grid(alpha=0.3)
  left.legend(fontsize=8)
  right.semilogy(ahead, nrmse_by_horizon, color="tab:orange",
                 label=f"ESN, N={config.hidden_size}, {config.trials} windows")
  right.axhline(10 ** JAEGER_HAAS_LOG10_NRMSE84, color="black", linestyle="--", linewidth=1.0,
                label=f"{JAEGER_HAAS} at step 84")
  right.set_xlabel("steps ahead")
  right.set_ylabel("NRMSE over the test windows")
  right.set_title("error of the autonomous prediction", fontsize=10)
  right.grid(alpha=0.3)
  right.legend(fontsize=8)
  fig.suptitle(f"esn: Mackey-Glass tau=17, N={config.hidden_size}, rho={config.spectral_radius:g}, density "
               f"{config.density:g}, ridge {config.ridge:g} | NRMSE_{config.horizon} = "
               f"10^{np.log10(nrmse_final):.2f}", fontsize=11)
  plots.save_figure(fig, run.path("esn_mackey_glass.png"))
  return {f"nrmse_{config.horizon}": nrmse_final, "published_nrmse_84": 10 ** JAEGER_HAAS_LOG10_NRMSE84,
          "published_source": JAEGER_HAAS, "train_nrmse_one_step": train_nrmse,
          "nrmse_by_horizon": nrmse_by_horizon.tolist(), "fit_wall_s": fit_s, "reservoir": config.hidden_size,
          "trials": config.trials}


def lagged(values: np.ndarray, lags: int) -> tuple[np.ndarray, np.ndarray]:
  """Rows [x(t-p+1) .. x(t)] -> targets x(t+1): ([N-p, p], [N-p]); row i predicts x[i + p]."""
  rows = np.stack([values[i:len(values) - lags + i] for i in range(lags)], axis=1)
  return rows, values[lags:]


def real_series_part(run: RunDir, config: Config, key) -> dict:
  """One-step-ahead ESN prediction of a statsmodels series, against persistence and AR(p).

  ESN: input x_t (the normalised series), read-out z_t = [1; x_t; h_t] -> x_{t+1}. The first
  points with t + 1 < N_train train it; the rest are the test set, predicted while the
  reservoir keeps reading the observed series.
  """
  name = config.real_series
  times, values = tasks.real_series(name)
  run.check_data(f"{name} series", times, values)
  num_test = int(round(config.real_test_fraction * len(values)))
  num_train = len(values) - num_test
  if num_test < 1 or num_train <= config.real_lags + 1:
    raise ValueError(f"real_test_fraction={config.real_test_fraction} leaves {num_train} training and "
                     f"{num_test} test points of {name}; both need more (and more than real_lags)")
  mean, std = values[:num_train].mean(), values[:num_train].std()
  x = (values - mean) / std
  dtype = "float64" if config.float64 else "float32"
  inputs = jnp.asarray(x[:-1, None], dtype)       # step t reads x_t and predicts x_{t+1}
  targets = x[1:]
  fit_end = num_train - 1                          # steps t < fit_end have targets in the training part
  washout = min(20, fit_end // 4)

  def esn_predictions(seed_key, ridge, fit_steps):
    """Drive a fresh reservoir over the whole series; fit the read-out on steps [washout, fit_steps)."""
    reservoir = esn.Reservoir(config.real_hidden_size, spectral_radius=config.real_spectral_radius,
                              input_scaling=0.5, bias_scaling=0.2, leak_rate=config.real_leak_rate,
                              param_dtype=dtype)
    params = reservoir.init(seed_key, 1)
    _, hs = run_cell(reservoir, params, inputs)
    features = esn.readout_features(inputs, hs)
    w_hy = esn.ridge_readout(features[washout:fit_steps],
                             jnp.asarray(targets[washout:fit_steps, None], dtype), ridge)
    return np.asarray(features @ w_hy.T)[:, 0]

  validation_start = int(0.8 * fit_end)
  ridges = [10.0 ** e for e in range(-8, 2)]
  scores = []
  for ridge in ridges:
    predictions = esn_predictions(jax.random.fold_in(key, 0), ridge, validation_start)
    scores.append(esn.nrmse(predictions[validation_start:fit_end], targets[validation_start:fit_end]))
  best_ridge = ridges[int(np.argmin(scores))]
  test_targets = targets[fit_end:]
  per_seed = [esn_predictions(jax.random.fold_in(key, seed), best_ridge, fit_end)[fit_end:]
              for seed in range(config.real_reservoirs)]
  esn_scores = [esn.nrmse(pred, test_targets) for pred in per_seed]
  persistence = esn.nrmse(x[num_train - 1:-1], test_targets)
  p = config.real_lags
  rows, lag_targets = lagged(x, p)
  design = np.concatenate([np.ones((len(rows), 1)), rows], axis=1)
  ar_train = num_train - p                         # rows whose target lies in the training part
  ar_weights = np.linalg.lstsq(design[:ar_train], lag_targets[:ar_train], rcond=None)[0]
  ar_predictions = design[ar_train:] @ ar_weights
  ar = esn.nrmse(ar_predictions, test_targets)
  run.log(0, "valid", **{f"{name}_esn_nrmse": float(min(scores))})
  run.log(0, "test", **{f"{name}_esn_nrmse": float(np.mean(esn_scores)),
                        f"{name}_persistence_nrmse": persistence, f"{name}_ar_nrmse": ar})

  plt = _pyplot()
  fig, (whole, zoom, right) = plt.subplots(1, 3, figsize=(15, 4.2),
                                           gridspec_kw={"width_ratios": [1.4, 1.4, 1]})
  test_times = times[num_train:]
  unit = "sunspot number" if name == "sunspots" else "CO2 (ppm)"
  whole.plot(times, values, color="black", linewidth=0.8, label=f"{name} (observed)")
  whole.axvspan(test_times[0], test_times[-1], color="tab:orange", alpha=0.15,
                label=f"held out ({num_test} points)")
  whole.set_xlabel("year")
  whole.set_ylabel(unit)
  whole.set_title("the whole series", fontsize=10)
  whole.set_ylim(top=np.max(values) + 0.3 * np.ptp(values))      # room for the legend above the data
  whole.grid(alpha=0.3)
  whole.legend(fontsize=8, loc="upper left")
  zoom.plot(test_times, values[num_train:], color="black", linewidth=1.0, label="observed")
  zoom.plot(test_times, np.mean(per_seed, axis=0) * std + mean, color="tab:orange",
            label=f"ESN, mean of {config.real_reservoirs} (NRMSE {np.mean(esn_scores):.3f})")
  zoom.plot(test_times, ar_predictions * std + mean, color="tab:green", linestyle="--",
            label=f"AR({p}) (NRMSE {ar:.3f})")
  zoom.set_xlabel("year")
  zoom.set_ylabel(unit)
  zoom.set_title(f"held-out part, one step ahead (persistence NRMSE {persistence:.3f})", fontsize=10)
  zoom.set_ylim(top=np.max(values[num_train:]) + 0.35 * np.ptp(values[num_train:]))
  zoom.grid(alpha=0.3)
  zoom.legend(fontsize=8, loc="upper left")
  right.semilogx(ridges, scores, color="tab:orange", marker="o", markersize=3, label="ESN, first reservoir")
  right.axvline(best_ridge, color="black", linestyle="--", linewidth=1.0,
                label=f"chosen lambda {best_ridge:g}")
  right.set_xlabel("ridge lambda")
  right.set_ylabel("validation NRMSE (last 20% of training)")
  right.set_title("choice of the ridge", fontsize=10)
  right.grid(alpha=0.3)
  right.legend(fontsize=8)
  fig.suptitle(f"esn: statsmodels {name}, one step ahead, N={config.real_hidden_size}, "
               f"rho={config.real_spectral_radius:g}, leak {config.real_leak_rate:g}", fontsize=11)
  plots.save_figure(fig, run.path(f"esn_{name}.png"))
  return {"series": name, "points": len(values), "test_points": num_test,
          "esn_nrmse_mean": float(np.mean(esn_scores)), "esn_nrmse_std": float(np.std(esn_scores)),
          "esn_nrmse_per_seed": esn_scores, "ridge": best_ridge,
          "ridge_search": dict(zip(map(str, ridges), scores)),
          "persistence_nrmse": persistence, "ar_nrmse": ar, "lags": p, "reservoir": config.real_hidden_size}


def train_and_evaluate(config: Config, workdir: str, options=None) -> dict:
  """Fit both ESNs into ``workdir`` (float64 only inside this call); returns results.json's content."""
  options = options or RunOptions()
  run = RunDir(workdir, "esn", config, options, label=f"esn N={config.hidden_size}")
  key = jax.random.PRNGKey(config.seed)
  with jax.enable_x64(config.float64):
    results = {"mackey_glass": mackey_glass_part(run, config, jax.random.fold_in(key, 0)),
               "real_series": real_series_part(run, config, jax.random.fold_in(key, 1))}
  results = run.finish(results)
  mg, real = results["mackey_glass"], results["real_series"]
  value = mg[f"nrmse_{config.horizon}"]
  print(f"esn Mackey-Glass: NRMSE_{config.horizon} = {value:.3g} (10^{np.log10(value):.2f}; {JAEGER_HAAS}) "
        f"with {mg['reservoir']} units over {mg['trials']} windows")
  print(f"esn {real['series']}: one-step NRMSE ESN {real['esn_nrmse_mean']:.3f} "
        f"+- {real['esn_nrmse_std']:.3f}, "
        f"AR({real['lags']}) {real['ar_nrmse']:.3f}, persistence {real['persistence_nrmse']:.3f}")
  return results


EXPERIMENT = common.Experiment("esn", Config, train_and_evaluate, PRESETS, SMOKE, __doc__)

if __name__ == "__main__":
  common.main(EXPERIMENT)
