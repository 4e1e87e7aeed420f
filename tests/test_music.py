"""Chorale piano rolls (parser, cache, split), the sigmoid frame model, and music.py --smoke."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import cells
from rnn_jax.data import chorales
from rnn_jax.polyphonic import FrameModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "music.py")


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
  logits = np.asarray(model.logits(params, frames, lengths), np.float64)
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
  a, b = model.logits(params, frames), model.logits(params, changed)
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


# ---- the experiment --------------------------------------------------------------
def test_music_smoke(tmp_path):
  pytest.importorskip("music21")
  workdir = tmp_path / "music"
  result = subprocess.run([sys.executable, SCRIPT, "--smoke", "--cells=lstm", f"--workdir={workdir}",
                           f"--data_dir={tmp_path / 'cache'}"], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.load(open(workdir / "results.json"))
  row = results["cells"][0]
  assert row["cell"] == "lstm" and 0 < row["test_nll"] < 88 * np.log(2) + 1
  assert results["published"]["test_nll"]["lstm"] == 8.67
  assert (workdir / "generated.mid").read_bytes()[:4] == b"MThd"
  assert (workdir / "generated.png").stat().st_size > 1000
  assert (workdir / "lstm" / "metrics.jsonl").exists() and (workdir / "metrics.jsonl").exists()
  bad = subprocess.run([sys.executable, SCRIPT, "--smoke", "--cells=lstm", "--seed_chord=12",
                        f"--workdir={tmp_path / 'bad'}"], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
  assert bad.returncode != 0 and "--seed_chord: MIDI pitches must lie in [21, 108]" in bad.stderr


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
