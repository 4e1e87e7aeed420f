"""Orbax checkpoints: retention, interrupted saves, corrupt and mismatched checkpoints."""

import json
import logging
import os
import re
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import make_cell
from rnn_jax.checkpoint import (CHECKSUMS, WRITER_KEY, CheckpointManager, CheckpointMismatchError,
                                CorruptCheckpointError, NonFiniteStateError)
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


# ---------------------------------------------------------------------------
# Damaged steps: one-line errors naming the step, what is wrong and the fix
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
  """A checkpoint directory with steps 1 and 2 of lm_state(5, seed=step), saved once."""
  directory = tmp_path_factory.mktemp("saved") / "ckpt"
  manager = CheckpointManager(str(directory), keep=3)
  for step in (1, 2):
    manager.save(step, lm_state(5, seed=step), extra={"step": step})
  return directory


def copy_of(two_steps, tmp_path):
  directory = tmp_path / "ckpt"
  shutil.copytree(two_steps, directory)
  return directory


def step_files(directory, step):
  walk = os.walk(directory / str(step))
  return sorted(os.path.join(root, name) for root, _, names in walk for name in names)


def largest_data_file(directory, step):
  return max((f for f in step_files(directory, step) if f"{os.sep}d{os.sep}" in f), key=os.path.getsize)


def one_line_error(call):
  with pytest.raises(CorruptCheckpointError) as caught:
    call()
  message = str(caught.value)
  assert "\n" not in message and "tensorstore_spec" not in message, message
  return caught.value, message


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # nothing more on stderr
def test_damaged_steps_give_one_line_errors_naming_the_step_and_the_step_that_verifies(two_steps, tmp_path):
  """Emptied files (orbax's own listing fails on them with a bare JSONDecodeError), a truncated data
  file and a truncated file of a step saved before manifests existed (a TensorStore error several
  lines long): each gives one line naming the step directory, what is wrong and step 1, which
  still restores bit for bit."""
  cases = {}
  directory = copy_of(two_steps, tmp_path / "emptied")
  for path in step_files(directory, 2):
    open(path, "wb").close()
  cases["emptied"] = (directory, r"is corrupt: its checksum manifest rnn_jax_checksums.json is empty")

  directory = copy_of(two_steps, tmp_path / "emptied_data")
  for path in step_files(directory, 2):
    if not path.endswith(CHECKSUMS):
      open(path, "wb").close()
  cases["emptied data"] = (directory, r"is corrupt: \S+ has 0 of its \d+ bytes \(emptied\) and \d+ more file")

  directory = copy_of(two_steps, tmp_path / "truncated")
  path = largest_data_file(directory, 2)
  data = open(path, "rb").read()
  open(path, "wb").write(data[: len(data) // 2])
  cases["truncated"] = (directory, rf"is corrupt: state/\S+ has {len(data) // 2} of its {len(data)} bytes "
                                   r"\(truncated\)")

  directory = copy_of(two_steps, tmp_path / "legacy_truncated")  # no manifest, no record of one
  legacy(directory, 2)
  for path in step_files(directory, 2):  # every data file, whichever orbax reads first
    if f"{os.sep}d{os.sep}" in path:
      os.truncate(path, os.path.getsize(path) // 2)
  cut = r"state/\S+ has \d+ of its \d+ bytes \(truncated\)"
  cases["legacy truncated"] = (directory, rf"is corrupt: it could not be read \({cut}\)")

  for name, (directory, expected) in cases.items():
    manager = CheckpointManager(str(directory), keep=3)
    assert manager.all_steps() == [1, 2], name       # listed, so that the resume refuses it clearly
    error, message = one_line_error(lambda: manager.restore(lm_state(5)))
    assert re.search(rf"^checkpoint {re.escape(str(directory / '2'))} {expected}", message), (name, message)
    offer = (f"; step 1 is the newest earlier step that verifies: resume with checkpoint_fallback=True to "
             f"continue from it, or delete {directory / '2'}")
    assert message.endswith(offer), message
    if name == "legacy truncated":
      assert error.__cause__ is not None and "tensorstore_spec" in str(error.__cause__)  # the dump, chained
      time.sleep(1.0)  # the reads the failed restore left in flight finish (and must stay quiet) in this test
    restored, extra = manager.restore(lm_state(5), step=1)
    assert extra == {"step": 1}
    assert_trees_equal(restored, lm_state(5, seed=1))


def legacy(directory, step):
  """Make ``step`` look saved before manifests existed: no manifest, no record of one in extra."""
  os.remove(directory / str(step) / CHECKSUMS)
  path = directory / str(step) / "extra" / "metadata"
  extra = json.loads(path.read_text())
  del extra[WRITER_KEY]
  path.write_text(json.dumps(extra))


def test_a_step_without_its_manifest_is_unfinished_and_skipped_but_older_steps_are_accepted(
    two_steps, tmp_path, caplog):
  """The manifest is written last, so a step of this version without one was not finished: it is
  not listed (a warning says so) and the step before it is the latest. A step saved before
  manifests existed, or with the sha256-only manifest of format 1, still restores."""
  directory = copy_of(two_steps, tmp_path)
  os.remove(directory / "2" / CHECKSUMS)
  manager = CheckpointManager(str(directory), keep=3)
  with caplog.at_level(logging.WARNING):
    assert manager.latest_step() == 1 and manager.all_steps() == [1]
  assert f"checkpoint {directory / '2'} is unfinished (its save stopped before the checksum manifest was " \
         f"written); it is not listed" in caplog.text
  restored, extra = manager.restore(lm_state(5))
  assert extra == {"step": 1}
  manager.save(2, lm_state(5, seed=2), extra={"step": 2})  # a new save of the step replaces it
  assert manager.all_steps() == [1, 2] and sorted(os.listdir(directory)) == ["1", "2"]

  legacy(directory, 2)
  manifest = directory / "1" / CHECKSUMS
  saved = json.loads(manifest.read_text())["files"]
  manifest.write_text(json.dumps({name: entry["sha256"] for name, entry in saved.items()}))  # format 1
  reopened = CheckpointManager(str(directory), keep=3)
  assert reopened.all_steps() == [1, 2]
  for step in (1, 2):
    restored, extra = reopened.restore(lm_state(5), step=step)
    assert extra == {"step": step}
    assert_trees_equal(restored, lm_state(5, seed=step))
  path = largest_data_file(directory, 1)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0xFF
  open(path, "wb").write(bytes(data))
  _, message = one_line_error(lambda: reopened.restore(lm_state(5), step=1))
  assert "1 is corrupt: 1 file(s) differ from what was saved" in message
  assert message.endswith("no earlier step verifies: start again in a fresh workdir")


def test_a_corrupt_latest_step_is_refused_unless_fallback_then_moved_aside_not_deleted(two_steps, tmp_path,
                                                                                       caplog):
  directory = copy_of(two_steps, tmp_path)
  path = largest_data_file(directory, 2)
  data = bytearray(open(path, "rb").read())
  data[10:20] = bytes(10)
  open(path, "wb").write(bytes(data))
  manager = CheckpointManager(str(directory), keep=3)
  _, message = one_line_error(manager.resume_step)
  expected = (rf"checkpoint {re.escape(str(directory / '2'))} is corrupt: 1 file\(s\) differ from what was "
              r"saved \(state/\S+\); step 1 is the newest earlier step that verifies")
  assert re.match(expected, message), message
  with caplog.at_level(logging.WARNING):
    assert manager.resume_step(fallback=True) == 1
  assert re.search(r"checkpoint step 2 is corrupt \(1 file\(s\) differ.*\); falling back to step 1, the "
                   r"newest step that verifies \(checkpoint_fallback\); the bad step is kept as "
                   r"\S+/2\.corrupt-", caplog.text)
  aside = [name for name in os.listdir(directory) if name.startswith("2.corrupt-")]
  assert len(aside) == 1 and os.path.getsize(directory / aside[0] / os.path.relpath(path, directory / "2"))
  assert manager.all_steps() == [1]
  restored, extra = manager.restore(lm_state(5), step=1)
  assert extra == {"step": 1}
  manager.save(2, lm_state(5, seed=2), extra={"step": 2})     # training goes on past the bad step
  assert manager.all_steps() == [1, 2]
  assert_trees_equal(manager.restore(lm_state(5))[0], lm_state(5, seed=2))
  only = CheckpointManager(str(tmp_path / "only"), keep=1)
  only.save(3, lm_state(5, seed=3))
  open(largest_data_file(tmp_path / "only", 3), "wb").close()
  for fallback in (False, True):
    _, message = one_line_error(lambda: only.resume_step(fallback=fallback))
    assert message.endswith("; no earlier step verifies: start again in a fresh workdir"), message


def test_a_state_holding_nan_or_inf_is_never_saved(two_steps, tmp_path):
  """A NaN in the params or an infinity in the optimiser moments: the save is refused naming the
  first such leaf, nothing is written, and the latest checkpoint is still the good one."""
  directory = copy_of(two_steps, tmp_path)
  manager = CheckpointManager(str(directory), keep=3)
  state = lm_state(5, seed=3)
  params = state["train"].params
  w_hh = params["rnn"]["layer_0"]["forward"]["w_hh"]
  poisoned = jax.tree_util.tree_map(lambda x: x, params)
  poisoned["rnn"]["layer_0"]["forward"]["w_hh"] = w_hh.at[0, :3].set(jnp.nan)
  bad_params = {**state, "train": state["train"]._replace(params=poisoned)}
  with pytest.raises(NonFiniteStateError) as caught:
    manager.save(3, bad_params, extra={"step": 3})
  assert str(caught.value) == (
      f"checkpoint step 3 not saved: the state holds non-finite values (train/params/rnn/layer_0/forward/"
      f"w_hh: 3 NaN of {w_hh.size} values); the earlier checkpoints are kept (latest: step 2); lower the "
      f"learning rate or enable clipping, then resume")
  assert isinstance(caught.value, FloatingPointError)  # a user error for the experiment scripts
  adam = state["train"].opt_state[1][0]
  table = adam.nu["embedding"]["table"]
  nu = {**adam.nu, "embedding": {"table": table.at[1, 1].set(jnp.inf)}}
  opt_state = (state["train"].opt_state[0], (adam._replace(nu=nu), *state["train"].opt_state[1][1:]),
               *state["train"].opt_state[2:])
  bad_moments = {**state, "train": state["train"]._replace(opt_state=opt_state)}
  with pytest.raises(NonFiniteStateError, match=r"\(train/opt_state/1/0/nu/embedding/table: 1 inf of \d+ "
                                                r"values\)"):
    manager.save(3, bad_moments, extra={"step": 3})
  assert sorted(os.listdir(directory)) == ["1", "2"] and manager.latest_step() == 2
  manager.save(3, state, extra={"step": 3})
  assert manager.latest_step() == 3
