"""Orbax checkpoints: retention, interrupted saves, corrupt and mismatched checkpoints."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import make_cell
from rnn_jax.checkpoint import CheckpointManager, CheckpointMismatchError, CorruptCheckpointError
from rnn_jax.lm import LanguageModel
from rnn_jax.optim import make_optimizer
from rnn_jax.train import create_train_state


def lm_state(hidden, seed=0):
  model = LanguageModel(make_cell("lstm", hidden), vocab_size=13, embed_size=4)
  params = model.init(jax.random.PRNGKey(seed))
  optimizer = make_optimizer("adam", 1e-3, clip=1.0)
  return {"train": create_train_state(params, optimizer, jax.random.PRNGKey(seed)),
          "carry": model.initial_carries(params, 2)}


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_keeps_last_n_plus_best_and_restores_exactly(tmp_path):
  manager = CheckpointManager(str(tmp_path / "ckpt"), keep=2, best_metric="valid_nats")
  states = {}
  for step, valid in zip(range(1, 6), [3.0, 1.0, 2.0, 2.5, 2.2]):
    states[step] = lm_state(5, seed=step)
    manager.save(step, states[step], extra={"data": {"epoch": 0, "window": step}},
                 metrics={"valid_nats": valid})
  assert manager.all_steps() == [2, 4, 5]
  assert manager.best_step() == 2
  restored, extra = manager.restore(lm_state(5))
  assert extra["data"]["window"] == 5
  assert_trees_equal(restored, states[5])
  assert isinstance(restored["train"].opt_state, type(states[5]["train"].opt_state))
  restored, _ = manager.restore(lm_state(5), step=2)
  assert_trees_equal(restored, states[2])


def test_interrupted_save_falls_back_to_previous_checkpoint(tmp_path):
  directory = tmp_path / "ckpt"
  manager = CheckpointManager(str(directory), keep=3)
  manager.save(1, lm_state(5, seed=1), extra={"step": 1})
  manager.save(2, lm_state(5, seed=2), extra={"step": 2})
  # A process killed while writing step 3 leaves orbax's tmp directory, half written.
  partial = directory / "3.orbax-checkpoint-tmp-1795354612"
  shutil.copytree(directory / "2", partial)
  for root, _, files in os.walk(partial):
    for name in files[: len(files) // 2]:
      os.remove(os.path.join(root, name))
  reopened = CheckpointManager(str(directory), keep=3)
  assert reopened.latest_step() == 2
  restored, extra = reopened.restore(lm_state(5))
  assert extra == {"step": 2}
  assert_trees_equal(restored, lm_state(5, seed=2))


def test_corrupt_checkpoint_gives_clear_error(tmp_path):
  directory = tmp_path / "ckpt"
  manager = CheckpointManager(str(directory), keep=2)
  manager.save(7, lm_state(5), extra={"step": 7})
  for root, _, files in os.walk(directory / "7" / "state"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\x00garbage")
  with pytest.raises(CorruptCheckpointError, match=r"checkpoint .*7.* (unreadable|could not be read|is corrupt)"):
    CheckpointManager(str(directory), keep=2).restore(lm_state(5))


def test_bytes_overwritten_inside_a_data_file_are_caught_on_restore(tmp_path):
  """64 bytes changed in the middle of the largest array file: the restore refuses, naming the step,
  instead of loading silently different weights; the step before it still restores."""
  directory = tmp_path / "ckpt"
  manager = CheckpointManager(str(directory), keep=3)
  manager.save(1, lm_state(5, seed=1), extra={"step": 1})
  manager.save(2, lm_state(5, seed=2), extra={"step": 2})
  files = [os.path.join(root, name) for root, _, names in os.walk(directory / "2" / "state") for name in names]
  largest = max(files, key=os.path.getsize)
  data = bytearray(open(largest, "rb").read())
  middle = len(data) // 2
  data[middle:middle + 64] = bytes(64)
  open(largest, "wb").write(bytes(data))
  reopened = CheckpointManager(str(directory), keep=3)
  with pytest.raises(CorruptCheckpointError, match=r"checkpoint .*2 is corrupt: 1 file\(s\) differ"):
    reopened.restore(lm_state(5))
  restored, extra = reopened.restore(lm_state(5), step=1)
  assert extra == {"step": 1}
  assert_trees_equal(restored, lm_state(5, seed=1))


def test_other_architecture_gives_error_naming_the_difference(tmp_path):
  manager = CheckpointManager(str(tmp_path / "ckpt"), keep=2)
  manager.save(1, lm_state(5), extra={})
  expected = r"w_hh: checkpoint shape \(20, 5\), model shape \(32, 8\)"
  with pytest.raises(CheckpointMismatchError, match=expected):
    manager.restore(lm_state(8))
  other = {"train": lm_state(5)["train"], "carry": jnp.zeros((2, 5))}
  with pytest.raises(CheckpointMismatchError, match="only in the checkpoint"):
    manager.restore(other)


def test_missing_checkpoint_errors(tmp_path):
  manager = CheckpointManager(str(tmp_path / "empty"), keep=1)
  with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
    manager.restore(lm_state(5))
  manager.save(3, lm_state(5))
  with pytest.raises(FileNotFoundError, match=r"available: \[3\]"):
    manager.restore(lm_state(5), step=4)
