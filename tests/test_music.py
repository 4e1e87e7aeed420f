"""Chorale piano rolls (parser, cache, split), the sigmoid frame model, sizes at equal parameter
count, and music.py in-process: --smoke --cells=lstm, --generate from the workdir, bad flags."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import cells, load_run, polyphonic
from rnn_jax.data import chorales
from rnn_jax.polyphonic import FrameModel


def hand_made_score():
  """Two voices over 4 quarter notes: C4 (2 beats) then E4; G3 whole note; an off-beat eighth D5."""
  music21 = pytest.importorskip("music21")
  upper, lower = music21.stream.Part(), music21.stream.Part()
  upper.insert(0.0, music21.note.Note("C4", quarterLength=2.0))
  upper.insert(2.0, music21.note.Note("E4", quarterLength=1.0))
  upper.insert(3.0, music21.note.Rest(quarterLength=0.5))
  upper.insert(3.5, music21.note.Note("D5", quarterLength=0.5))   # between beats: not sampled
  lower.insert(0.0, music21.chord.Chord(["G3", "B3"], quarterLength=4.0))
  score = music21.stream.Score()
  score.insert(0, upper)
  score.insert(0, lower)
  return score


def test_score_to_roll_samples_each_quarter_note():
  roll = chorales.score_to_roll(hand_made_score())
  assert roll.shape == (4, 88) and roll.dtype == np.uint8
  on = [sorted((np.nonzero(frame)[0] + chorales.LOWEST_MIDI).tolist()) for frame in roll]
  assert on == [[55, 59, 60], [55, 59, 60], [55, 59, 64], [55, 59]]


def test_roll_to_score_round_trip():
  roll = chorales.score_to_roll(hand_made_score())
  again = chorales.score_to_roll(chorales.roll_to_score(roll))
  np.testing.assert_array_equal(roll, again)


def test_cache_round_trip_and_malformed_files(tmp_path):
  rolls = [np.eye(88, dtype=np.uint8)[:5], np.ones((3, 88), np.uint8)]
  path = str(tmp_path / "rolls.npz")
  chorales.save_rolls(path, rolls, ["a", "b"])
  loaded, titles = chorales.read_rolls(path)
  assert titles == ["a", "b"]
  for a, b in zip(rolls, loaded):
    np.testing.assert_array_equal(a, b)
  (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
  with pytest.raises(ValueError, match="garbage.npz is malformed"):
    chorales.read_rolls(str(tmp_path / "garbage.npz"))
  np.savez(str(tmp_path / "wrong.npz"), frames=np.zeros((8, 12)), offsets=np.array([0, 8]),
           titles=np.array(["x"]), version=np.asarray(chorales.CACHE_VERSION))
  with pytest.raises(ValueError, match="wrong.npz is malformed"):
    chorales.read_rolls(str(tmp_path / "wrong.npz"))


def test_split_rule():
  assert [chorales.split_of(i) for i in range(10)] == ["train", "train", "train", "valid", "test"] * 2


def test_missing_music21_gives_the_install_command(monkeypatch):
  monkeypatch.setitem(sys.modules, "music21", None)
  with pytest.raises(ImportError, match="pip install music21"):
    chorales.import_music21()


def test_first_real_chorales(tmp_path):
  pytest.importorskip("music21")
  splits, titles = chorales.load_chorales(str(tmp_path), limit=5)
  assert [len(splits[s]) for s in chorales.SPLITS] == [3, 1, 1]
  first = splits["train"][0]
  assert titles["train"][0] == "Aus meines Herzens Grunde" and first.shape == (63, 88)
  voices = first.sum(axis=1)
  assert voices.max() <= 4 and np.mean(voices == 4) > 0.8   # four-part harmony on most beats
  assert os.path.exists(chorales.cache_path(str(tmp_path), 5))
  again, _ = chorales.load_chorales(str(tmp_path), limit=5)   # from the cache
  np.testing.assert_array_equal(again["train"][0], first)


@pytest.mark.slow
def test_all_chorales_counts(tmp_path):
  pytest.importorskip("music21")
  splits, _ = chorales.load_chorales(str(tmp_path))
  assert [len(splits[s]) for s in chorales.SPLITS] == [223, 74, 74]   # 371 chorales
  assert sum(len(r) for r in splits["train"]) == 12351


# ---- the frame model ------------------------------------------------------------
def test_frame_model_nll_matches_a_hand_computation():
  model = FrameModel(cells.GRU(6), num_pitches=5)
  params = model.init(jax.random.PRNGKey(0))
  frames = jnp.asarray(np.random.default_rng(0).integers(0, 2, (2, 4, 5)), jnp.float32)
  lengths = jnp.array([4, 2])
  logits = np.asarray(model(params, {"frames": frames, "lengths": lengths}), np.float64)
  p = 1 / (1 + np.exp(-logits))
  x = np.asarray(frames)
  per_frame = -(x * np.log(p) + (1 - x) * np.log(1 - p)).sum(-1)
  expected = (per_frame[0].sum() + per_frame[1, :2].sum()) / 6
  assert float(model.nll(params, frames, lengths)) == pytest.approx(expected, rel=1e-5)


def test_frame_model_is_causal_and_padding_free():
  model = FrameModel(cells.LSTM(6), num_pitches=5)
  params = model.init(jax.random.PRNGKey(1))
  frames = jnp.asarray(np.random.default_rng(1).integers(0, 2, (1, 6, 5)), jnp.float32)
  changed = frames.at[0, 3].set(1.0 - frames[0, 3])
  a, b = model(params, {"frames": frames}), model(params, {"frames": changed})
  np.testing.assert_allclose(a[0, :4], b[0, :4], atol=1e-6)   # o_t depends on x_<t only
  assert not np.allclose(a[0, 4:], b[0, 4:])
  padded = jnp.concatenate([frames, jnp.ones((1, 3, 5))], axis=1)
  assert float(model.nll(params, padded, jnp.array([6]))) == pytest.approx(float(model.nll(params, frames)),
                                                                           rel=1e-6)


def test_generate_starts_from_the_seed_chord():
  model = FrameModel(cells.Elman(6), num_pitches=88)
  params = model.init(jax.random.PRNGKey(2))
  seed = jnp.zeros((88,)).at[jnp.array([27, 34, 43, 51])].set(1.0)
  out = model.generate(params, seed, 10, jax.random.PRNGKey(3))
  assert out.shape == (10, 88)
  np.testing.assert_array_equal(out[0], seed)
  assert set(np.unique(np.asarray(out)).tolist()) <= {0.0, 1.0}
  with pytest.raises(ValueError, match="seed_frame must have shape"):
    model.generate(params, jnp.zeros((12,)), 4, jax.random.PRNGKey(0))


def test_roll_batches_resume_exactly():
  rolls = [np.eye(88, dtype=np.uint8)[:n] for n in range(3, 23)]
  stream = chorales.RollBatches(rolls, 4, seed=1)
  for _ in range(6):
    next(stream)
  position = stream.position()
  expected = [next(stream) for _ in range(3)]
  resumed = chorales.RollBatches(rolls, 4, seed=1)
  resumed.seek(position)
  for batch, again in zip(expected, [next(resumed) for _ in range(3)]):
    np.testing.assert_array_equal(batch["frames"], again["frames"])
    np.testing.assert_array_equal(batch["lengths"], again["lengths"])
    assert batch["frames"].shape[1] % 16 == 0 and batch["frames"].shape[1] >= batch["lengths"].max()


def test_equal_parameter_sizes_follow_the_lstm_budget():
  sizes = polyphonic.equal_parameter_sizes(["elman", "gru", "lstm"], 36)
  assert sizes == {"elman": 81, "gru": 43, "lstm": 36}   # Chung et al. 2014: 100, 46, 36 for ~20k
  count = lambda name, H: polyphonic.count_params(FrameModel(cells.make_cell(name, H)))
  budget = count("lstm", 36)
  assert budget == 4 * (36 * 88 + 36 * 36 + 36) + 36 * 88 + 88   # LSTM gates + sigmoid read-out
  for name in ("elman", "gru"):
    assert count(name, sizes[name]) <= budget < count(name, sizes[name] + 1)
  assert polyphonic.equal_parameter_sizes(["gru"], 36, num_layers=2)["gru"] < 43


def test_nll_per_step_weights_every_frame_equally():
  model = FrameModel(cells.GRU(5), num_pitches=88)
  params = model.init(jax.random.PRNGKey(5))
  rng = np.random.default_rng(2)
  rolls = [rng.integers(0, 2, (n, 88)).astype(np.uint8) for n in (7, 3, 12, 5, 9)]
  frames, lengths = chorales.pad_rolls(rolls)
  expected = float(model.nll(params, jnp.asarray(frames), jnp.asarray(lengths)))   # one batch of all
  assert polyphonic.nll_per_step(model, params, rolls, batch_size=2) == pytest.approx(expected, rel=1e-5)


# ---- the experiment, in-process ------------------------------------------------------
@pytest.fixture(scope="module")
def chorale_cache(tmp_path_factory):
  """One cache of the parsed smoke chorales for every run of this module."""
  pytest.importorskip("music21")
  return str(tmp_path_factory.mktemp("chorale_cache"))


def _read(path):
  with open(path) as handle:
    return json.load(handle)


def test_music_smoke_with_one_cell_then_generate_from_the_workdir(run_experiment, tmp_path, chorale_cache,
                                                                  monkeypatch):
  workdir = tmp_path / "music"
  done = run_experiment("music", "--smoke", "--cells=lstm", f"--workdir={workdir}",
                        f"--data_dir={chorale_cache}", "--recurrent_dropout=0.1", "--zoneout_cell=0.2",
                        "--weight_dropout=0.1")
  assert done.code == 0, done.err
  results = _read(workdir / "results.json")
  [row] = results["cells"]
  assert row["cell"] == "lstm" and row["hidden_size"] == 8 and row["steps"] == 8
  assert 0 < row["test_nll"] < 88 * np.log(2) + 1   # below (near) the uniform 88 ln 2 nats per frame
  assert results["lstm_test_nll"] == row["test_nll"] and results["chorales"] == {"train": 9, "valid": 3,
                                                                                  "test": 3}
  assert results["published"]["test_nll"] == {"elman": 9.10, "gru": 8.54, "lstm": 8.67}
  assert row["chung_2014_jsb_test_nll"] == 8.67 and results["config"]["cells"] == ["lstm"]
  for name in ("config.json", "metrics.jsonl", "results.json", "comparison.png", "table.txt", "generated.png",
               "generated.npy"):
    assert os.path.getsize(workdir / name) > 0, name
  for name in ("config.json", "metrics.jsonl", "results.json", "curves.png", "model.json"):
    assert os.path.getsize(workdir / "lstm" / name) > 0, f"lstm/{name}"
  assert (workdir / "generated.mid").read_bytes()[:4] == b"MThd"
  generated = np.load(workdir / "generated.npy")
  assert generated.shape == (16, 88)
  assert sorted(np.nonzero(generated[0])[0] + chorales.LOWEST_MIDI) == [48, 55, 64, 72]   # the seed chord
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert {r["cell"] for r in records} == {"lstm"}
  assert {r["split"] for r in records} == {"train", "valid", "test"}
  assert [r["step"] for r in records if r["split"] == "valid"] == [4, 8]
  assert _read(workdir / "lstm" / "results.json")["test_nll"] == row["test_nll"]
  loaded = load_run(str(workdir / "lstm"))
  assert loaded.extra["hidden_size"] == 8
  # the regularisers' flags reach the saved model's stack (generation below uses its zoneout expectation)
  assert (loaded.model.rnn.recurrent_dropout, loaded.model.rnn.zoneout_cell, loaded.model.rnn.weight_dropout) == (
      0.1, 0.2, 0.1)

  def refuse(*args, **kwargs):
    raise AssertionError("--generate read the corpus")
  monkeypatch.setattr(chorales, "load_chorales", refuse)
  again = run_experiment("music", f"--workdir={workdir}", "--generate", "--seed_chord=50,57,62",
                         "--generate_frames=5")
  assert again.code == 0, again.err
  generated = np.load(workdir / "generated.npy")
  assert generated.shape == (5, 88) and sorted(np.nonzero(generated[0])[0] + 21) == [50, 57, 62]
  refused = run_experiment("music", "--smoke", "--cells=lstm", f"--workdir={workdir}")
  assert refused.code == 2 and "pass --resume" in refused.err


@pytest.mark.parametrize("flag,message", [
    ("--cells=lstm,transformer", "cells='transformer' is not one of ['elman', 'gru', 'lstm', 'dt_rnn', 'dts_rnn']"),
    ("--cells=lstm,lstm", "cells lists a cell twice"),
    ("--seed_chord=12", "seed_chord must be >= 21, got 12"),
    ("--hidden_sizes=8", "hidden_sizes"),
])
def test_bad_flags_are_one_error_line(run_experiment, tmp_path, flag, message):
  result = run_experiment("music", "--smoke", flag, f"--workdir={tmp_path / 'bad'}")
  assert result.code == 2 and message in result.err
  [line] = result.err.strip().splitlines()
  assert line.startswith("music: error: ")
  assert not (tmp_path / "bad").exists()   # nothing was written


def test_generate_without_a_trained_run_names_the_workdir(run_experiment, tmp_path):
  result = run_experiment("music", f"--workdir={tmp_path}", "--generate")
  assert result.code == 2 and "holds no finished music run" in result.err
