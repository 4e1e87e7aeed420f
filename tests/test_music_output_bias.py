"""The frame model's initial output bias at each key's training log-odds (polyphonic.marginal_log_odds),
and which music runs draw Chung et al. 2014's figures."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import cells, polyphonic
from rnn_jax.polyphonic import FrameModel


def small_rolls():
  """Two rolls over K = 4 keys, 5 frames in all: key 0 sounds in 4, key 1 in 1, key 2 in 5, key 3 never."""
  first = np.array([[1, 0, 1, 0], [1, 1, 1, 0], [1, 0, 1, 0]], np.uint8)
  second = np.array([[1, 0, 1, 0], [0, 0, 1, 0]], np.uint8)
  return [first, second]


def test_marginal_log_odds_is_the_smoothed_frequency():
  bias = polyphonic.marginal_log_odds(small_rolls(), num_pitches=4)
  p = (np.array([4, 1, 5, 0]) + 0.5) / (5 + 1.0)
  np.testing.assert_allclose(bias, np.log(p / (1 - p)), rtol=1e-6)
  np.testing.assert_allclose(1 / (1 + np.exp(-bias)), p, rtol=1e-6)   # sigma(b_k) = p_k
  assert bias.dtype == np.float32 and np.all(np.isfinite(bias))      # a key that never sounds stays finite


@pytest.mark.parametrize("rolls,message", [
    ([], "no sequences"),
    ([np.zeros((3, 5), np.uint8)], "rolls must have shape [T, 4], got (3, 5)"),
])
def test_marginal_log_odds_refuses_bad_rolls(rolls, message):
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
    polyphonic.marginal_log_odds(rolls, num_pitches=4)


def test_init_with_the_marginal_bias_starts_at_the_marginal_nll():
  """At init the logits are b_y plus a small function of h_t, so the NLL starts near the marginal
  model's sum_k H(p_k) (here ~2.1 nats per frame), not near K ln 2 as from sigma(o) = 1/2. With a
  deep output (one intermediate layer), where the U(+-1/sqrt(fan_in)) start stalled training."""
  rolls = small_rolls()
  model = FrameModel(cells.make_cell("elman", 5), num_pitches=4, output_layer_sizes=(6,))
  bias = polyphonic.marginal_log_odds(rolls, num_pitches=4)
  params = model.init(jax.random.PRNGKey(0), output_bias=bias)
  np.testing.assert_array_equal(np.asarray(params["readout"]["b"]), bias)
  plain = model.init(jax.random.PRNGKey(0))
  assert jax.tree_util.tree_structure(plain) == jax.tree_util.tree_structure(params)
  for a, b in zip(jax.tree_util.tree_leaves(plain["rnn"]), jax.tree_util.tree_leaves(params["rnn"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))   # only b_y differs
  p = 1 / (1 + np.exp(-bias.astype(np.float64)))
  frames = np.concatenate(rolls).astype(np.float64)
  marginal = -(frames * np.log(p) + (1 - frames) * np.log(1 - p)).sum(axis=1).mean()
  start = polyphonic.nll_per_step(model, params, rolls, batch_size=2)
  assert abs(start - marginal) < 0.3 * marginal
  assert polyphonic.nll_per_step(model, plain, rolls, batch_size=2) > marginal + 0.3   # U(+-1/sqrt(H)) biases


def test_init_refuses_an_output_bias_of_the_wrong_shape():
  model = FrameModel(cells.make_cell("gru", 3), num_pitches=4)
  with pytest.raises(ValueError, match=r"output_bias must have shape \(4,\), got \(5,\)"):
    model.init(jax.random.PRNGKey(0), output_bias=jnp.zeros((5,)))


def test_chung_2014_figures_are_drawn_only_for_their_one_layer_models():
  from experiments import music   # pylint: disable=import-outside-toplevel
  assert music.chung_2014_figure(music.Config(), "gru") == 8.54
  assert music.chung_2014_figure(music.Config(), "dts_rnn") is None
  assert music.chung_2014_figure(music.Config(num_layers=2), "elman") is None           # sRNN
  assert music.chung_2014_figure(music.Config(output_layer_sizes=(8,)), "elman") is None   # DO-RNN
  assert music.Config().output_bias_init == "marginal" and music.Config().eval_every == 100
  assert music.Config().steps == 2000 and music.PRESETS["deep_transition"]["steps"] == 2000
