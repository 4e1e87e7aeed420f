"""rnn_jax.interop: weights to and from PyTorch, flax.linen, Keras 3 and safetensors files.

Each framework's run of the converted weights must give our outputs (float32, 1e-6), our
params must survive ours -> framework -> ours bit-exactly, and every mismatch or option
without a counterpart must fail with a message naming it. torch, flax and keras tests skip
when the framework is missing; the safetensors tests need none of them.
"""

import json
import os

os.environ["KERAS_BACKEND"] = "jax"   # before keras is imported (by the keras fixture)

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from rnn_jax import GRU, LSTM, Elman, StackedRNN, interop, rnn

B, T, F, H = 4, 6, 3, 5
LENGTHS = np.array([6, 2, 4, 1])
ATOL = 1e-6


@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def nn():
  return pytest.importorskip("flax.linen")


@pytest.fixture(scope="module")
def keras():
  return pytest.importorskip("keras")


def inputs(seed=0, shape=(B, T, F)):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def assert_bit_equal(a, b):
  """Same tree, dtypes and bits (so -0.0 and NaN payloads count)."""
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    u, v = np.asarray(u), np.asarray(v)
    assert u.dtype == v.dtype and u.shape == v.shape
    np.testing.assert_array_equal(u.view(np.uint8), v.view(np.uint8))


def real_steps(lengths, steps=T):
  return (np.arange(steps)[None, :] < np.asarray(lengths)[:, None])[..., None]


# ---------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------

TORCH_CASES = {   # name: (cell for a state_dict, expected rnn_jax cell, torch constructor options)
    "rnn_tanh": ("rnn_tanh", Elman(H), dict(kind="RNN", nonlinearity="tanh")),
    "rnn_relu": ("rnn_relu", Elman(H, activation="relu"), dict(kind="RNN", nonlinearity="relu")),
    "lstm": ("lstm", LSTM(H), dict(kind="LSTM")),
    "lstm_proj": ("lstm", LSTM(H, proj_size=3), dict(kind="LSTM", proj_size=3)),
    "gru": ("gru", GRU(H), dict(kind="GRU")),
}


def torch_rnn(torch, name, *, batch_first=True, seed=0, **overrides):
  options = dict(TORCH_CASES[name][2])
  kind = options.pop("kind")
  options = {**dict(input_size=F, hidden_size=H, num_layers=2, bidirectional=True, batch_first=batch_first,
                    dropout=0.25), **options, **overrides}
  torch.manual_seed(seed)
  return getattr(torch.nn, kind)(**options).eval()


def run_torch(torch, module, xs, lengths):
  """Packed run of a [B, T, F] batch: outputs [B, T, D*P] (zero-padded), h_n and c_n."""
  batch_first = module.batch_first
  data = torch.from_numpy(xs if batch_first else np.swapaxes(xs, 0, 1).copy())
  packed = torch.nn.utils.rnn.pack_padded_sequence(data, torch.from_numpy(lengths), batch_first=batch_first,
                                                   enforce_sorted=False)
  with torch.no_grad():
    out, state = module(packed)
  out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=batch_first, total_length=xs.shape[1])
  out = out.numpy() if batch_first else np.swapaxes(out.numpy(), 0, 1)
  h_n, c_n = state if isinstance(state, tuple) else (state, None)
  return out, h_n.numpy(), None if c_n is None else c_n.numpy()


@pytest.mark.parametrize("name, batch_first", [("rnn_tanh", True), ("rnn_relu", False), ("lstm", False),
                                               ("lstm_proj", True), ("gru", False)])
def test_torch_round_trip_two_layer_bidirectional_variable_lengths(torch, name, batch_first):
  module = torch_rnn(torch, name, batch_first=batch_first)
  layer, params = interop.from_torch(module)
  assert layer == StackedRNN(TORCH_CASES[name][1], num_layers=2, bidirectional=True, dropout=0.25)

  xs = inputs()
  out, h_n, c_n = run_torch(torch, module, xs, LENGTHS)
  xs_ours = xs if batch_first else np.swapaxes(xs, 0, 1)
  finals, ys = layer(params, jnp.asarray(xs_ours), jnp.asarray(LENGTHS), time_major=not batch_first)
  ys = ys if batch_first else jnp.swapaxes(ys, 0, 1)
  np.testing.assert_allclose(ys, out, atol=ATOL, rtol=0)     # real steps equal, zeros after
  for index, carry in enumerate(c for pair in finals for c in pair):   # h_n[l * 2 + d]
    np.testing.assert_allclose(carry.h if c_n is not None else carry, h_n[index], atol=ATOL, rtol=0)
    if c_n is not None:
      np.testing.assert_allclose(carry.c, c_n[index], atol=ATOL, rtol=0)

  state = interop.to_torch(layer, params)
  fresh = torch_rnn(torch, name, batch_first=batch_first, seed=1)
  fresh.load_state_dict(state, strict=True)
  np.testing.assert_allclose(run_torch(torch, fresh, xs, LENGTHS)[0], out, atol=ATOL, rtol=0)
  again_layer, again = interop.from_torch(state, cell=TORCH_CASES[name][0])
  assert again_layer == StackedRNN(layer.cell, num_layers=2, bidirectional=True)   # no dropout in state_dicts
  assert_bit_equal(again, params)


def test_torch_state_dict_needs_its_cell_and_reads_under_a_prefix(torch):
  module = torch_rnn(torch, "gru", dropout=0.0)
  layer, params = interop.from_torch(module)
  state = {f"encoder.{k}": v for k, v in module.state_dict().items()}
  state["decoder.weight"] = torch.zeros(2, 2)
  from_state = interop.from_torch(state, cell="gru", prefix="encoder.")
  assert from_state[0] == layer
  assert_bit_equal(from_state[1], params)
  with pytest.raises(ValueError, match="cell='rnn_tanh', 'rnn_relu', 'lstm' or 'gru'"):
    interop.from_torch(module.state_dict())
  with pytest.raises(ValueError, match=r"prefix='encoder\.'"):
    interop.from_torch(state, cell="gru")
  with pytest.raises(ValueError, match="cell='lstm' but the module is GRU"):
    interop.from_torch(module, cell="lstm")
  with pytest.raises(ValueError, match="hidden_size=6"):
    interop.from_torch(module, cell=GRU(6))


def test_torch_bias_false_imports_zero_biases_and_exports_without_them(torch):
  module = torch_rnn(torch, "lstm", bias=False, num_layers=1, bidirectional=False, dropout=0.0)
  layer, params = interop.from_torch(module)
  np.testing.assert_array_equal(params["layer_0"]["forward"]["b"], 0)
  xs = inputs(1)
  with torch.no_grad():
    out = module(torch.from_numpy(xs))[0].numpy()
  np.testing.assert_allclose(layer(params, jnp.asarray(xs))[1], out, atol=ATOL, rtol=0)
  module.load_state_dict(interop.to_torch(layer, params, bias=False), strict=True)
  biased = jax.tree_util.tree_map(lambda v: v, params)
  biased["layer_0"]["forward"]["b"] = params["layer_0"]["forward"]["b"].at[0].set(0.5)
  with pytest.raises(ValueError, match=r"\['b'\] is not zero, but bias=False would drop it"):
    interop.to_torch(layer, biased, bias=False)
  assert interop.torch_module(layer, params, bias=False).bias is False


def test_torch_mismatched_state_dicts_name_each_key(torch):
  module = torch_rnn(torch, "lstm")
  state = {k: v.clone() for k, v in module.state_dict().items()}
  missing = dict(state)
  del missing["bias_hh_l1_reverse"]
  with pytest.raises(ValueError, match=r"missing bias_hh_l1_reverse \[20\]"):
    interop.from_torch(missing, cell="lstm")
  with pytest.raises(ValueError, match=r"unexpected extra \[3\]"):
    interop.from_torch({**state, "extra": torch.zeros(3)}, cell="lstm")
  with pytest.raises(ValueError, match=r"wrong shape: weight_ih_l1 is \[20, 7\], expected \[20, 10\]"):
    interop.from_torch({**state, "weight_ih_l1": torch.zeros(20, 7)}, cell="lstm")
  with pytest.raises(ValueError, match="weights of layers 0, 1, 7; expected layers 0 to 7"):
    interop.from_torch({**state, "weight_ih_l7": torch.zeros(20, 10)}, cell="lstm")
  with pytest.raises(ValueError, match="a lstm state_dict, not a gru"):
    interop.from_torch(state, cell="gru")
  with pytest.raises(ValueError, match="mix dtypes"):
    interop.from_torch({**state, "bias_ih_l0": state["bias_ih_l0"].double()}, cell="lstm")
  with pytest.raises(ValueError, match="expects torch.nn.RNN, nn.LSTM or nn.GRU"):
    interop.from_torch(torch.nn.Linear(3, 4))


UNPORTABLE = [
    (StackedRNN(LSTM(H, peephole=True)), "peephole=True"),
    (StackedRNN(LSTM(H, layer_norm=True)), "layer_norm=True"),
    (StackedRNN(Elman(H, readout_size=2)), "readout_size=2"),
    (StackedRNN(Elman(H, activation="sigmoid")), "activation='sigmoid'"),
    (StackedRNN(GRU(H, reset_after=False)), "reset_after=False"),
    (StackedRNN(GRU(H), num_layers=2, residual=True), "residual=True"),
    (StackedRNN(GRU(H), bidirectional=True, merge="sum"), "merge='sum'"),
    (StackedRNN(GRU(H), learn_initial_state=True), "learn_initial_state=True"),
]


@pytest.mark.parametrize("layer, option", UNPORTABLE, ids=[option for _, option in UNPORTABLE])
def test_to_torch_refuses_options_torch_lacks(layer, option):
  params = layer.init(jax.random.key(0), F)
  with pytest.raises(ValueError, match=f"{option}.* no PyTorch counterpart"):
    interop.to_torch(layer, params, as_numpy=True)


def test_to_torch_checks_params_against_the_layer():
  layer = StackedRNN(LSTM(H), num_layers=2)
  params = StackedRNN(LSTM(H + 1), num_layers=2).init(jax.random.key(0), F)
  with pytest.raises(ValueError, match=r"\['layer_0'\]\['forward'\].*w_xh is \[24, 3\], expected \[20, 3\]"):
    interop.to_torch(layer, params, as_numpy=True)
  with pytest.raises(ValueError, match="missing layer_1"):
    interop.to_torch(layer, {"layer_0": params["layer_0"]}, as_numpy=True)


# ---------------------------------------------------------------------------
# flax.linen
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("flax_name, options", [("SimpleCell", "relu"), ("LSTMCell", None),
                                                ("OptimizedLSTMCell", None), ("GRUCell", None)])
def test_flax_cells_equal_a_scan_of_flax_steps(nn, flax_name, options):
  module = getattr(nn, flax_name)(features=H, **({"activation_fn": nn.relu} if options else {}))
  xs = jnp.asarray(inputs(2))
  carry0 = module.initialize_carry(jax.random.key(0), (B, F))
  variables = module.init(jax.random.key(1), carry0, xs[:, 0])
  noise = iter(jax.random.split(jax.random.key(2), 16))   # non-zero biases, so each one is checked
  variables = jax.tree_util.tree_map(lambda v: v + 0.3 * jax.random.normal(next(noise), v.shape), variables)
  cell, params = interop.from_flax(module, variables)
  assert type(interop.flax_cell(cell, optimized=flax_name.startswith("Optimized"))) is type(module)

  def step(carry, x_t):
    return module.apply(variables, carry, x_t)
  flax_final, flax_ys = jax.lax.scan(step, carry0, jnp.swapaxes(xs, 0, 1))
  final, ys = rnn(cell, params, xs)
  np.testing.assert_allclose(ys, jnp.swapaxes(flax_ys, 0, 1), atol=ATOL, rtol=0)
  jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, atol=ATOL, rtol=0),
                         final, interop.from_flax_carry(cell, flax_final))
  assert_bit_equal(interop.to_flax(cell, params), variables["params"])
  assert_bit_equal(interop.from_flax(flax_name, interop.to_flax(cell, params), activation=options)[1], params)
  ours_carry = jax.tree_util.tree_map(lambda v: jnp.zeros((B,) + v.shape), cell.initial_carry(params))
  rebuilt = interop.flax_cell(cell).apply({"params": interop.to_flax(cell, params)},
                                          interop.to_flax_carry(cell, ours_carry), xs[:, 0])[1]
  np.testing.assert_allclose(rebuilt, flax_ys[0], atol=ATOL, rtol=0)


def test_flax_options_and_params_without_counterpart_fail(nn):
  cell = nn.SimpleCell(features=H)
  variables = cell.init(jax.random.key(0), cell.initialize_carry(jax.random.key(1), (F,)), jnp.ones(F))
  with pytest.raises(ValueError, match="residual=True"):
    interop.from_flax(nn.SimpleCell(features=H, residual=True), variables)
  with pytest.raises(ValueError, match="gate_fn='hard_sigmoid'"):
    interop.from_flax(nn.LSTMCell(features=H, gate_fn=nn.hard_sigmoid), {})
  with pytest.raises(ValueError, match="activation_fn='relu'.*expected tanh"):
    interop.from_flax(nn.GRUCell(features=H, activation_fn=nn.relu), {})
  with pytest.raises(ValueError, match="features=4 but the kernels have 5"):
    interop.from_flax(nn.SimpleCell(features=4), variables)
  with pytest.raises(ValueError, match=r"missing i/bias \[5\]"):
    interop.from_flax("SimpleCell", {"i": {"kernel": variables["params"]["i"]["kernel"]},
                                     "h": variables["params"]["h"]})
  with pytest.raises(ValueError, match="unsupported cell 'MGUCell'"):
    interop.from_flax("MGUCell", variables)
  for ours, option in [(LSTM(H, proj_size=2), "proj_size=2"), (Elman(H, readout_size=2), "readout_size=2"),
                       (GRU(H, reset_after=False), "reset_after=False")]:
    with pytest.raises(ValueError, match=f"{option} has no flax.linen counterpart"):
      interop.to_flax(ours, ours.init(jax.random.key(0), F))
  with pytest.raises(ValueError, match="LSTMState"):
    interop.to_flax_carry(LSTM(H), (jnp.zeros(H), jnp.zeros(H)))


# ---------------------------------------------------------------------------
# Keras 3
# ---------------------------------------------------------------------------

KERAS_CASES = {
    "simple_rnn_relu": ("SimpleRNN", dict(activation="relu")),
    "lstm": ("LSTM", {}),
    "gru_reset_after": ("GRU", dict(reset_after=True)),
    "gru_reset_before": ("GRU", dict(reset_after=False)),
}


def keras_layer(keras, name, seed=0, **overrides):
  """A built Keras layer with random (non-zero bias) weights."""
  kind, options = KERAS_CASES[name]
  layer = getattr(keras.layers, kind)(H, return_sequences=True, **{**options, **overrides})
  layer.build((None, T, F))
  rng = np.random.default_rng(seed)
  layer.set_weights([rng.normal(scale=0.5, size=w.shape).astype(np.float32) for w in layer.get_weights()])
  return layer


@pytest.mark.parametrize("name", sorted(KERAS_CASES))
def test_keras_layers_match_with_masked_lengths_and_round_trip(keras, name):
  layer = keras_layer(keras, name)
  xs = inputs(3)
  mask = real_steps(LENGTHS)[..., 0]
  out = np.asarray(layer(xs, mask=mask))
  cell, params = interop.from_keras(layer)
  options = KERAS_CASES[name][1]
  assert cell.hidden_size == H and getattr(cell, "reset_after", True) == options.get("reset_after", True)
  _, ys = rnn(cell, params, jnp.asarray(xs), jnp.asarray(LENGTHS))
  real = real_steps(LENGTHS)
  np.testing.assert_allclose(np.where(real, ys, 0), np.where(real, out, 0), atol=ATOL, rtol=0)

  fresh = keras_layer(keras, name, seed=1)
  fresh.set_weights(interop.to_keras(cell, params))
  np.testing.assert_allclose(np.asarray(fresh(xs, mask=mask)), out, atol=ATOL, rtol=0)
  activation = options.get("activation")
  listed = interop.from_keras(layer.get_weights(), activation=activation)
  assert listed[0] == cell
  assert_bit_equal(listed[1], params)
  assert_bit_equal(interop.from_keras(interop.to_keras(cell, params), activation=activation)[1], params)


def test_keras_use_bias_false_and_errors(keras):
  layer = keras_layer(keras, "lstm", use_bias=False)
  cell, params = interop.from_keras(layer)
  np.testing.assert_array_equal(params["b"], 0)
  assert len(interop.to_keras(cell, params, use_bias=False)) == 2
  with pytest.raises(ValueError, match="use_bias=False would drop it"):
    interop.to_keras(cell, {**params, "b": params["b"] + 1}, use_bias=False)
  with pytest.raises(ValueError, match="recurrent_activation='hard_sigmoid'"):
    interop.from_keras(keras_layer(keras, "lstm", recurrent_activation="hard_sigmoid"))
  with pytest.raises(ValueError, match="activation='relu'.*expected 'tanh'"):
    interop.from_keras(keras_layer(keras, "gru_reset_after", activation="relu"))
  with pytest.raises(ValueError, match="no weights yet: build it"):
    interop.from_keras(keras.layers.GRU(H))
  with pytest.raises(ValueError, match="forward_layer and backward_layer"):
    interop.from_keras(keras.layers.Bidirectional(keras.layers.LSTM(H)))
  weights = keras_layer(keras, "gru_reset_after").get_weights()
  with pytest.raises(ValueError, match=r"wrong shape: kernel is \[3, 12\], expected \[3, 15\]"):
    interop.from_keras([weights[0][:, :12], *weights[1:]])
  with pytest.raises(ValueError, match="reset_after=False but the bias has shape"):
    interop.from_keras(weights, reset_after=False)
  with pytest.raises(ValueError, match="cell='lstm' but the weights are a gru"):
    interop.from_keras(weights, cell="lstm")
  with pytest.raises(ValueError, match="proj_size=2 has no Keras counterpart"):
    interop.to_keras(LSTM(H, proj_size=2), LSTM(H, proj_size=2).init(jax.random.key(0), F))


# ---------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------

def stack_and_params(dtype=jnp.float32):
  cell = LSTM(H, proj_size=3, recurrent_init="glorot", forget_bias=1.0)
  layer = StackedRNN(cell, num_layers=2, bidirectional=True, dropout=0.1)
  params = jax.tree_util.tree_map(lambda v: v.astype(dtype), layer.init(jax.random.key(0), F))
  params["layer_1"]["backward"]["b"] = params["layer_1"]["backward"]["b"].at[0].set(-0.0)
  return layer, params


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_safetensors_round_trip_is_bit_exact(tmp_path, dtype):
  layer, params = stack_and_params(dtype)
  path = tmp_path / "model.safetensors"
  interop.save_safetensors(path, params, layer)
  loaded_layer, loaded = interop.load_safetensors(path)
  assert loaded_layer == layer
  assert_bit_equal(loaded, params)
  gru = StackedRNN(GRU(H), num_layers=1)
  gru_params = gru.init(jax.random.key(1), F)
  interop.save_safetensors(path, gru_params["layer_0"]["forward"], gru.cell)   # a cell is a one-layer stack
  assert interop.load_safetensors(path)[0] == gru
  assert_bit_equal(interop.load_safetensors(path)[1], gru_params)


def test_safetensors_file_loads_into_torch_strictly(tmp_path, torch):
  import safetensors.torch
  layer, params = stack_and_params()
  path = tmp_path / "model.safetensors"
  interop.save_safetensors(path, params, layer)
  module = torch.nn.LSTM(F, H, num_layers=2, bidirectional=True, proj_size=3, batch_first=True).eval()
  module.load_state_dict(safetensors.torch.load_file(path), strict=True)
  xs = inputs(4)
  out = run_torch(torch, module, xs, LENGTHS)[0]
  np.testing.assert_allclose(layer(params, jnp.asarray(xs), jnp.asarray(LENGTHS))[1], out, atol=ATOL, rtol=0)
  np.testing.assert_allclose(run_torch(torch, interop.torch_module(layer, params), xs, LENGTHS)[0], out,
                             atol=ATOL, rtol=0)


def rewrite(path, edit_description=None, edit_tensors=None):
  """Re-save a file with its description and/or tensors edited."""
  tensors = safetensors.numpy.load_file(path)
  with safetensors.safe_open(path, "numpy") as f:
    metadata = f.metadata()
  description = json.loads(metadata["rnn_jax"])
  if edit_description:
    edit_description(description)
  if edit_tensors:
    edit_tensors(tensors)
  safetensors.numpy.save_file(tensors, path, metadata={**metadata, "rnn_jax": json.dumps(description)})


def test_safetensors_untrusted_files_fail_clearly(tmp_path):
  layer, params = stack_and_params()
  path = str(tmp_path / "model.safetensors")

  def fails(match, **edits):
    interop.save_safetensors(path, params, layer)
    rewrite(path, **edits)
    with pytest.raises(ValueError, match=match):
      interop.load_safetensors(path)

  fails(r"wrong shape: weight_ih_l0 is \[20, 3\], expected \[24, 3\]",
        edit_description=lambda d: d["layer"]["cell"].update(hidden_size=6))
  fails(r"the description says float64 \(F64\) but bias_hh_l0 is F32, bias_hh_l0_reverse is F32",
        edit_description=lambda d: d.update(dtype="float64"))
  fails(r"cell.type must be one of \('elman', 'lstm', 'gru'\)",
        edit_description=lambda d: d["layer"]["cell"].update(type="os.system"))
  fails(r"unknown fields \['activation'\]",
        edit_description=lambda d: d["layer"]["cell"].update(activation="relu"))
  fails(r"num_layers = '2' does not fit", edit_description=lambda d: d["layer"].update(num_layers="2"))
  fails(r"the description needs 20 tensors \(2 layers\), the file holds 21",
        edit_tensors=lambda t: t.update(extra=np.zeros(3, np.float32)))
  fails(r"missing weight_hr_l1_reverse \[3, 5\]; unexpected weight_hr_l9 \[3, 5\]",
        edit_tensors=lambda t: t.update(weight_hr_l9=t.pop("weight_hr_l1_reverse")))
  safetensors.numpy.save_file(safetensors.numpy.load_file(path), path)
  with pytest.raises(ValueError, match="no rnn_jax layer description"):
    interop.load_safetensors(path)
  with open(path, "wb") as f:
    f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
  with pytest.raises(ValueError, match="not a valid safetensors file"):
    interop.load_safetensors(path)
  with pytest.raises(FileNotFoundError):
    interop.load_safetensors(tmp_path / "absent.safetensors")
  with pytest.raises(ValueError, match="peephole=True has no PyTorch-named safetensors counterpart"):
    interop.save_safetensors(path, LSTM(H, peephole=True).init(jax.random.key(0), F), LSTM(H, peephole=True))
