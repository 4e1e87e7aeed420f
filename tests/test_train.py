"""Schedules, the optax chain (clipping), the recurrent-weight penalty, the jitted steps and the run dir."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rnn_jax import make_cell
from rnn_jax.lm import LanguageModel
from rnn_jax.losses import recurrent_penalty
from rnn_jax.optim import make_optimizer, make_schedule
from rnn_jax.plots import plot_run
from rnn_jax.rundir import RunDir, read_metrics
from rnn_jax.train import create_train_state, make_train_step


def test_step_schedule_is_zaremba_small():
  schedule = make_schedule("step", 1.0, steps_per_epoch=10, decay_start_epoch=4, decay_rate=0.5)
  rates = [float(schedule(epoch * 10 + 3)) for epoch in range(7)]
  assert rates == [1.0, 1.0, 1.0, 1.0, 0.5, 0.25, 0.125]
  assert float(schedule(39)) == 1.0 and float(schedule(40)) == 0.5


def test_cosine_schedule_warmup_peak_and_end():
  schedule = make_schedule("cosine", 2e-3, warmup_steps=10, total_steps=110)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(1e-3)
  assert float(schedule(10)) == pytest.approx(2e-3)
  assert float(schedule(60)) == pytest.approx(1e-3, rel=1e-5)
  assert float(schedule(110)) == pytest.approx(0.0, abs=1e-9)
  assert float(make_schedule("constant", 0.3)(1000)) == pytest.approx(0.3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="step", learning_rate=1.0), "steps_per_epoch"),
    (dict(kind="cosine", learning_rate=1.0, warmup_steps=10, total_steps=5), "total_steps"),
    (dict(kind="linear", learning_rate=1.0), "unknown schedule"),
    (dict(kind="constant", learning_rate=-1.0), "positive"),
])
def test_schedule_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    make_schedule(**kwargs)


def test_clipping_by_global_norm_and_by_value():
  grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([12.0])}  # global norm 13
  params = jax.tree_util.tree_map(jnp.zeros_like, grads)
  optimizer = make_optimizer("sgd", 1.0, clip=1.3)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  np.testing.assert_allclose(updates["a"], [-0.3, -0.4], rtol=1e-6)
  np.testing.assert_allclose(optax.global_norm(updates), 1.3, rtol=1e-6)
  optimizer = make_optimizer("sgd", 1.0, clip=3.5, clip_mode="value")
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  np.testing.assert_allclose(updates["a"], [-3.0, -3.5])
  np.testing.assert_allclose(updates["b"], [-3.5])


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam", "adamw", "rmsprop"])
def test_every_optimizer_descends_a_quadratic(name):
  optimizer = make_optimizer(name, 0.05, clip=10.0, weight_decay=1e-4 if name == "adamw" else 0.0)
  params = {"w": jnp.array([2.0, -3.0])}
  state = optimizer.init(params)
  for _ in range(50):
    grads = {"w": 2 * params["w"]}
    updates, state = optimizer.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert float(jnp.sum(params["w"] ** 2)) < 13.0 * 0.5


def test_optimizer_errors():
  with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
    make_optimizer("lbfgs", 0.1)
  with pytest.raises(ValueError, match="clip must be >= 0"):
    make_optimizer("sgd", 0.1, clip=-1.0)
  with pytest.raises(ValueError, match="unknown clip_mode"):
    make_optimizer("sgd", 0.1, clip=1.0, clip_mode="max")


def test_recurrent_penalty_touches_only_w_hh():
  model = LanguageModel(make_cell("lstm", 6), vocab_size=11, embed_size=5, num_layers=2)
  params = model.init(jax.random.PRNGKey(0))
  w_hh = [params["rnn"][f"layer_{l}"]["forward"]["w_hh"] for l in range(2)]
  expected = sum(0.1 * np.abs(w).sum() + 0.01 * np.square(w).sum() for w in w_hh)
  assert float(recurrent_penalty(params, l1=0.1, l2=0.01)) == pytest.approx(float(expected), rel=1e-5)
  grads = jax.grad(lambda p: recurrent_penalty(p, l1=0.1, l2=0.01))(params)
  for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]:
    if path[-1].key == "w_hh":
      assert float(jnp.abs(leaf).sum()) > 0
    else:
      assert float(jnp.abs(leaf).sum()) == 0.0, path
  assert float(recurrent_penalty(params)) == 0.0
  with pytest.raises(ValueError, match="no 'w_hh'"):
    recurrent_penalty({"w": jnp.ones(3)}, l2=1.0)


def test_train_step_reports_grad_norm_before_clipping():
  params = {"w": jnp.array([1.0, 1.0])}

  def loss_fn(params, batch, rng):
    del rng
    loss = jnp.sum(batch["scale"] * params["w"])
    return loss, {"half_loss": loss / 2}

  optimizer = make_optimizer("sgd", 0.1, clip=1.0)
  schedule = make_schedule("constant", 0.1)
  state = create_train_state(params, optimizer, jax.random.PRNGKey(0))
  step = make_train_step(loss_fn, optimizer, schedule)
  new_state, metrics = step(state, {"scale": jnp.array([3.0, 4.0])})
  assert float(metrics["grad_norm"]) == pytest.approx(5.0)
  assert float(metrics["half_loss"]) == pytest.approx(3.5)
  assert float(metrics["learning_rate"]) == pytest.approx(0.1)
  np.testing.assert_allclose(new_state.params["w"], [1 - 0.1 * 0.6, 1 - 0.1 * 0.8], rtol=1e-6)
  assert int(new_state.step) == 1
  assert not np.array_equal(np.asarray(new_state.rng), np.asarray(state.rng))


def test_cosine_horizon_continues_from_the_resume_step_without_a_jump():
  base = make_schedule("cosine", 1e-3, warmup_steps=10, total_steps=100)
  extended = make_schedule("cosine", 1e-3, warmup_steps=10, total_steps=100, horizons=[(60, 200)])
  for step in (0, 10, 35, 59):
    assert float(extended(step)) == pytest.approx(float(base(step)), rel=1e-6)
  assert float(extended(60)) == pytest.approx(float(base(60)), rel=1e-5)
  tail = [float(extended(s)) for s in range(60, 201, 10)]
  assert all(a > b for a, b in zip(tail, tail[1:])) and tail[-1] == pytest.approx(0.0, abs=1e-9)
  assert float(extended(100)) > 1e-4  # the old schedule would be at 0 here
  with pytest.raises(ValueError, match="horizon"):
    make_schedule("cosine", 1e-3, total_steps=100, horizons=[(120, 110)])


def test_run_dir_writes_results_and_curves(tmp_path):
  run = RunDir(str(tmp_path), "unit", config={"learning_rate": 0.1})
  for step in (10, 20, 30):
    run.log(step, "train", loss=3.0 / step, bpc=2.0 / step)
  run.log(30, "valid", bpc=0.09)
  with open(run.metrics_path, "a") as f:
    f.write('{"step": 40, "split": "tra')  # a torn line from a killed run is skipped
  assert len(read_metrics(str(tmp_path))) == 4
  results = run.finish({"test_bpc": 0.1, "nan_metric": float("nan"), "x": np.float32(1.5)})
  saved = __import__("json").load(open(tmp_path / "results.json"))
  assert saved == results and saved["test_bpc"] == 0.1 and saved["config"] == {"learning_rate": 0.1}
  assert saved["nan_metric"] == "nan" and saved["x"] == 1.5 and "backend" in saved["device"]
  assert saved["wall_time_s"] >= 0 and saved["experiment"] == "unit"
  run.mark_resume(20)
  assert [(r["step"], r["split"]) for r in read_metrics(str(tmp_path))] == [
      (10, "train"), (20, "train"), (20, "resume")]
  path = plot_run(str(tmp_path), "unit run")
  assert path.endswith("curves.png") and (tmp_path / "curves.png").stat().st_size > 1000
