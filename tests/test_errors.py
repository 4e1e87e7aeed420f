"""Every bad input raises a ValueError whose message names the wrong value and the expected one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import GRU, LSTM, Elman, LSTMState, ScanOptions, StackedRNN, bidirectional, make_cell, rnn

B, T, F, H = 2, 5, 3, 4
CELL = LSTM(H)
PARAMS = CELL.init(jax.random.key(0), F)
XS = jnp.ones((B, T, F))


def test_wrong_feature_size_in_rnn_bidirectional_stack_and_step():
  wrong = jnp.ones((B, T, F + 2))
  message = "lstm: x has 5 features, params expect 3"
  with pytest.raises(ValueError, match=message):
    rnn(CELL, PARAMS, wrong)
  with pytest.raises(ValueError, match=message):
    bidirectional(CELL, PARAMS, PARAMS, wrong)
  stack = StackedRNN(CELL, num_layers=2)
  with pytest.raises(ValueError, match=message):
    stack(stack.init(jax.random.key(1), F), wrong)
  with pytest.raises(ValueError, match="lstm: x has 5 features, params expect 3"):
    CELL.step(PARAMS, CELL.initial_carry(PARAMS), jnp.ones(F + 2))
  gru = GRU(H)
  with pytest.raises(ValueError, match="gru: x has 1 features, params expect 3"):
    rnn(gru, gru.init(jax.random.key(2), F), jnp.ones((B, T, 1)))


def test_wrong_feature_size_on_the_cpu_kernel_path_names_the_sizes():
  cell = LSTM(16)  # a multiple of the vector width: the fused kernel's path
  params = cell.init(jax.random.key(0), 8)
  wrong = jnp.ones((B, T, 9))
  for call in (lambda: rnn(cell, params, wrong), lambda: StackedRNN(cell)({"layer_0": {"forward": params}}, wrong),
               lambda: bidirectional(cell, params, params, wrong)):
    with pytest.raises(ValueError, match="lstm: x has 9 features, params expect 8"):
      call()


def test_params_of_another_cell_or_size_name_the_keys_and_shapes():
  gru = GRU(H)
  with pytest.raises(ValueError, match=r"gru: params do not match GRU\(hidden_size=4.*missing \['b_hn'\]; "
                                       r"b has shape \(16,\), expected \(12,\)"):
    rnn(gru, PARAMS, XS)
  bigger = LSTM(H + 1)
  with pytest.raises(ValueError, match=r"w_hh has shape \(16, 4\), expected \(20, 5\)"):
    rnn(bigger, PARAMS, XS)
  with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
    rnn(CELL, {**PARAMS, "extra": jnp.ones(2)}, XS)


def test_run_cell_checks_a_concrete_length_as_rnn_does():
  from rnn_jax import run_cell
  for length, message in ((9, r"length must lie in \[0, T=5\], got 9"), (-1, r"got -1"),
                          (2.5, "length must be an integer, got 2.5"),
                          (jnp.arange(T), r"length must be a scalar")):
    with pytest.raises(ValueError, match=message):
      run_cell(CELL, PARAMS, XS[0], length)


def test_a_traced_hyper_parameter_says_the_cell_is_static():
  with pytest.raises(TypeError, match="hyper-parameter hidden_size is a traced value; a cell is static"):
    jax.jit(lambda size: LSTM(size))(3)


def test_xs_of_the_wrong_rank():
  with pytest.raises(ValueError, match=r"lstm: xs must have shape \[B, T, F\], got shape \(5, 3\)"):
    rnn(CELL, PARAMS, jnp.ones((T, F)))
  with pytest.raises(ValueError, match=r"xs must have shape \[T, B, F\]"):
    rnn(CELL, PARAMS, jnp.ones((T, F)), time_major=True)


@pytest.mark.parametrize("lengths, low, high", [([-1, 2], -1, 2), ([6, 2], 2, 6), ([0, 9], 0, 9)])
def test_lengths_out_of_range(lengths, low, high):
  message = rf"lstm: lengths must lie in \[0, T=5\], got min {low} and max {high}"
  with pytest.raises(ValueError, match=message):
    rnn(CELL, PARAMS, XS, np.array(lengths))
  with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=5\]"):
    bidirectional(CELL, PARAMS, PARAMS, XS, jnp.array(lengths))


def test_lengths_with_a_mismatched_batch_size():
  with pytest.raises(ValueError, match=r"lstm: lengths must have shape \(2,\) to match the batch size, "
                                       r"got \(3,\)"):
    rnn(CELL, PARAMS, XS, jnp.array([1, 2, 3]))
  with pytest.raises(ValueError, match=r"lengths must have shape \(2,\) to match the batch size, got \(\)"):
    rnn(CELL, PARAMS, XS, jnp.array(3))
  with pytest.raises(ValueError, match=r"lengths must have shape \(2,\) to match the batch size, got \(2, 1"):
    rnn(CELL, PARAMS, XS, jnp.array([[1], [2]]))
  # Time-major: B is the second axis.
  with pytest.raises(ValueError, match=r"lengths must have shape \(5,\) to match the batch size, got \(2,\)"):
    rnn(CELL, PARAMS, XS, jnp.array([1, 2]), time_major=True)


def test_non_integer_lengths():
  with pytest.raises(ValueError, match="lstm: lengths must be integers, got dtype float32"):
    rnn(CELL, PARAMS, XS, jnp.array([1.0, 2.0]))
  with pytest.raises(ValueError, match="lengths must be integers, got dtype bool"):
    rnn(CELL, PARAMS, XS, jnp.array([True, False]))


def test_unknown_activation_and_cell_name():
  with pytest.raises(ValueError, match=r"elman: unknown activation 'gelu'; expected one of \('tanh', 'relu'"):
    Elman(H, activation="gelu")
  expected = r"unknown cell 'transformer'; expected one of \('elman', 'tanh', 'relu', 'tanh_orthogonal', 'irnn'"
  with pytest.raises(ValueError, match=expected):
    make_cell("transformer", H)


def test_bad_hyper_parameters():
  with pytest.raises(ValueError, match="lstm: hidden_size must be a positive integer, got 0"):
    LSTM(0)
  with pytest.raises(ValueError, match=r"lstm: proj_size must be in \(0, hidden_size=4\), got 4"):
    LSTM(4, proj_size=4)
  with pytest.raises(ValueError, match="gru: unknown recurrent_init 'xavier'; expected one of"):
    GRU(4, recurrent_init="xavier")
  with pytest.raises(ValueError, match="elman: unknown dtype 'int8'"):
    Elman(4, dtype="int8")
  with pytest.raises(ValueError, match="lstm: input_size must be a positive integer, got 0"):
    CELL.init(jax.random.key(0), 0)
  with pytest.raises(ValueError, match=r"StackedRNN: dropout must be in \[0, 1\), got 1.0"):
    StackedRNN(CELL, dropout=1.0)
  with pytest.raises(ValueError, match="StackedRNN: unknown merge 'max'; expected one of"):
    StackedRNN(CELL, bidirectional=True, merge="max")
  with pytest.raises(ValueError, match="StackedRNN: num_layers must be an integer >= 1, got 0"):
    StackedRNN(CELL, num_layers=0)
  with pytest.raises(ValueError, match="StackedRNN: num_layers must be an integer >= 1, got 1.5"):
    StackedRNN(CELL, num_layers=1.5)
  with pytest.raises(ValueError, match="unknown merge 'mean'"):
    bidirectional(CELL, PARAMS, PARAMS, XS, merge="mean")


@pytest.mark.parametrize("carry, got", [
    (LSTMState(h=jnp.zeros(H + 1), c=jnp.zeros(H)), r"LSTMState\(h=\(5,\), c=\(4,\)\)"),
    (LSTMState(h=jnp.zeros((B + 1, H)), c=jnp.zeros((B + 1, H))), r"LSTMState\(h=\(3, 4\), c=\(3, 4\)\)"),
    (jnp.zeros(H), r"got \(4,\)"),
])
def test_bad_initial_carry_shape(carry, got):
  expected = (r"lstm: initial_carry must have shapes LSTMState\(h=\(4,\), c=\(4,\)\) \(shared\) "
              r"or with a leading batch axis B=2")
  with pytest.raises(ValueError, match=expected + ".*" + got):
    rnn(CELL, PARAMS, XS, initial_carry=carry)


def test_bad_initial_carry_for_elman():
  cell = Elman(H)
  with pytest.raises(ValueError, match=r"elman: initial_carry must have shapes \(4,\) .* got \(2, 5\)"):
    rnn(cell, cell.init(jax.random.key(0), F), XS, initial_carry=jnp.zeros((B, H + 1)))


def test_stacked_rnn_call_errors():
  stack = StackedRNN(CELL, num_layers=2, dropout=0.5)
  params = stack.init(jax.random.key(0), F)
  with pytest.raises(ValueError, match="StackedRNN: train=True with dropout > 0 needs an rng key"):
    stack(params, XS, train=True)
  expected = r"StackedRNN: initial_carries has 1 entries, expected one per layer \(2\)"
  with pytest.raises(ValueError, match=expected):
    stack(params, XS, initial_carries=[None])


def test_out_of_range_ids_under_jit_give_nan_rows_never_another_token():
  """Concrete ids are refused; traced ids outside [0, V), negative ones included, embed as NaN."""
  from rnn_jax import layers
  table = {"table": jnp.arange(12.0).reshape(4, 3)}
  with pytest.raises(ValueError, match=r"token ids must lie in \[0, 4\)"):
    layers.embed(table, jnp.array([0, 4]))
  rows = jax.jit(layers.embed)(table, jnp.array([1, -1, 4, 3]))
  np.testing.assert_array_equal(rows[0], [3.0, 4.0, 5.0])
  np.testing.assert_array_equal(rows[3], [9.0, 10.0, 11.0])
  assert bool(jnp.all(jnp.isnan(rows[1]))) and bool(jnp.all(jnp.isnan(rows[2])))


def test_a_cell_without_a_recurrence_is_refused_when_it_is_defined():
  import dataclasses
  from rnn_jax.cells import Cell
  with pytest.raises(TypeError, match="Incomplete: a cell defines recurrence or recurrence_saving"):
    @dataclasses.dataclass(frozen=True)
    class Incomplete(Cell):
      def init(self, key, input_size):
        return {}


def test_inputs_that_are_not_real_arrays_are_refused_by_name():
  with pytest.raises(ValueError, match="lstm: xs must be a jax or numpy array, got list"):
    rnn(CELL, PARAMS, np.ones((B, T, F)).tolist())
  with pytest.raises(ValueError, match="lstm: xs must hold real numbers, got dtype complex64"):
    rnn(CELL, PARAMS, jnp.ones((B, T, F), jnp.complex64))
  from rnn_jax import run_cell
  with pytest.raises(ValueError, match="lstm: xs must hold real numbers, got dtype <U1"):
    run_cell(CELL, PARAMS, np.full((T, F), "x"))


def test_traced_lengths_of_a_float_dtype_are_refused_under_jit():
  from rnn_jax import run_cell
  with pytest.raises(ValueError, match="lstm: length must be an integer, got dtype float32"):
    jax.jit(lambda length: run_cell(CELL, PARAMS, XS[0], length))(2.0)
  with pytest.raises(ValueError, match="lstm: lengths must be integers, got dtype float32"):
    jax.jit(lambda lengths: rnn(CELL, PARAMS, XS, lengths))(jnp.array([1.0, 2.0]))


def test_run_cell_refuses_a_batched_initial_carry():
  from rnn_jax import run_cell
  carry = LSTMState(h=jnp.zeros((B, H)), c=jnp.zeros((B, H)))
  with pytest.raises(ValueError, match=r"lstm: run_cell reads one example; initial_carry must have shapes "
                                       r"LSTMState\(h=\(4,\), c=\(4,\)\) \(no batch axis\), got "
                                       r"LSTMState\(h=\(2, 4\), c=\(2, 4\)\)"):
    run_cell(CELL, PARAMS, XS[0], initial_carry=carry)


def test_bidirectional_checks_its_carry_pair_and_the_sizes_merge_sum_adds():
  wide = LSTM(H + 1)
  with pytest.raises(ValueError, match=r"lstm: merge='sum' adds the two directions, so the backward cell's output "
                                       r"size \(5\) must equal the forward cell's \(4\); use merge='concat'"):
    bidirectional(CELL, PARAMS, jax.eval_shape(lambda key: wide.init(key, F), jax.random.key(1)), XS, merge="sum",
                  backward_cell=wide)
  with pytest.raises(ValueError, match=r"lstm: bidirectional initial_carry must be a \(forward, backward\) pair "
                                       r"of carries \(None for zeros\), got NoneType"):
    bidirectional(CELL, PARAMS, PARAMS, XS, initial_carry=None)


def test_stacked_rnn_params_missing_a_layer_or_direction_are_named():
  stack = StackedRNN(CELL, num_layers=2, bidirectional=True)
  params = stack.init(jax.random.key(0), F)
  with pytest.raises(ValueError, match=r"StackedRNN: params do not match 2 layer\(s\) of directions "
                                       r"\('forward', 'backward'\): missing \['layer_1'\]"):
    stack({"layer_0": params["layer_0"]}, XS)
  with pytest.raises(ValueError, match=r"layer_0 has no \['backward'\]"):
    stack({**params, "layer_0": {"forward": params["layer_0"]["forward"]}}, XS)


def test_inputs_and_carries_of_another_dtype_run_in_the_params_dtype():
  """The recurrence computes in the params' dtype: float64 data (x64 on), integer inputs, a float16
  initial carry and bfloat16 params no longer change the scan's carry type (a TypeError before)."""
  def shapes(cell, params, xs, **options):  # traced, not compiled
    return jax.eval_shape(lambda p, x: rnn(cell, p, x, **options), params, xs)
  with jax.enable_x64(True):
    carry, ys = shapes(CELL, PARAMS, jnp.ones((B, T, F), jnp.float64))
  assert ys.dtype == jnp.float32 and carry.h.dtype == jnp.float32
  assert shapes(CELL, PARAMS, jnp.ones((B, T, F), jnp.int32))[1].dtype == jnp.float32
  half_carry = LSTMState(h=jnp.zeros(H, jnp.float16), c=jnp.zeros(H, jnp.float16))
  assert shapes(CELL, PARAMS, XS, initial_carry=half_carry)[0].c.dtype == jnp.float32
  half = LSTM(H, param_dtype="bfloat16")
  for grad in ("autodiff", "manual"):
    assert shapes(half, jax.eval_shape(lambda key: half.init(key, F), jax.random.key(0)), XS,
                  options=ScanOptions(grad=grad))[1].dtype == jnp.bfloat16


def test_model_json_builds_only_rnn_jax_dataclasses():
  from rnn_jax.rundir import build
  for name, message in (("os.system", "only rnn_jax classes are loaded"),
                        ("rnn_jax.rundir.shutil", "not an rnn_jax dataclass"),
                        ("rnn_jax.rundir.RunDir", "not an rnn_jax dataclass"),
                        ("rnn_jax.rundir.NoSuchClass", "which rnn_jax does not define")):
    with pytest.raises(ValueError, match=message):
      build({"type": name, "fields": {}})
  with pytest.raises(ValueError, match=r"unknown fields \['command'\]"):
    build({"type": "rnn_jax.cells.LSTM", "fields": {"hidden_size": 4, "command": "rm -rf /"}})


class _Payload:
  """Unpickling this object runs code: it would write the marker file."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (exec, (f"open({self.marker!r}, 'w').write('executed')",))


def test_a_torch_file_with_a_malicious_pickle_is_refused_not_executed(tmp_path):
  """interop.load_torch reads torch files with torch.load(weights_only=True) only: an object whose
  unpickling runs code (its __reduce__ calls exec) is refused with a ValueError and never runs."""
  torch = pytest.importorskip("torch")
  import pickletools
  import zipfile
  from rnn_jax import interop
  marker = tmp_path / "marker"
  module = torch.nn.LSTM(F, H)
  state = module.state_dict()
  state["bias_hh_l0"] = _Payload(marker)
  evil = tmp_path / "evil.pt"
  torch.save(state, evil)
  with zipfile.ZipFile(evil) as archive:  # the payload is really in the file: a call of builtins.exec
    pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
  assert any(op.name in ("GLOBAL", "STACK_GLOBAL") for op, _, _ in pickletools.genops(pickled))
  assert b"exec" in pickled
  with pytest.raises(ValueError, match=r"evil.pt holds an object of (builtins\.)?exec, not only tensors.*"
                                       r"refused unread"):
    interop.load_torch(evil, cell="lstm")
  assert not marker.exists()
  whole = tmp_path / "module.pt"
  torch.save(module, whole)  # a pickled module is code too
  with pytest.raises(ValueError, match="holds an object of torch.nn.modules.rnn.LSTM"):
    interop.load_torch(whole, cell="lstm")
  good = tmp_path / "good.pt"
  torch.save(module.state_dict(), good)
  stack, params = interop.load_torch(good, cell="lstm")
  np.testing.assert_array_equal(params["layer_0"]["forward"]["w_hh"], module.weight_hh_l0.detach().numpy())
  (tmp_path / "junk.pt").write_bytes(b"not a torch file")
  with pytest.raises(ValueError, match="junk.pt is not a PyTorch"):
    interop.load_torch(tmp_path / "junk.pt", cell="lstm")
