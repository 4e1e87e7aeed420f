"""Every bad input raises a ValueError whose message names the wrong value and the expected one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import GRU, LSTM, Elman, LSTMState, StackedRNN, bidirectional, make_cell, rnn

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
