"""Multi-task seq2seq (rnn_jax.multitask): exact composition of Seq2Seq, where gradients go, the mixing
draws, resumable task streams, one-line errors; experiments/multitask.py's smoke run (the weight-0
baseline), and, under -m slow, its resume and the composition with attention."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import cells, multitask, seq2seq
from rnn_jax.data import translation

E, H = 4, 6


def architecture(**overrides):
  values = dict(kind="cho", cell=cells.make_cell("elman", H), source_vocab_size=10, target_vocab_size=10, embed_size=E)
  return seq2seq.Seq2Seq(**{**values, **overrides})


def many_to_many(arch=None, weights=(1.0, 0.5, 0.25)):
  """en_es, en_en, es_es over encoders en (11 tokens), es (9) and decoders es, en."""
  return multitask.MultiTaskSeq2Seq(
      arch or architecture(), (multitask.Component("en", 11), multitask.Component("es", 9)),
      (multitask.Component("es", 9), multitask.Component("en", 11)),
      (multitask.Task("en_es", "en", "es", weights[0]), multitask.Task("en_en", "en", "en", weights[1]),
       multitask.Task("es_es", "es", "es", weights[2])))


def batch():
  return seq2seq.make_batch([[4, 5, 6, 7], [8, 4]], [[5, 6], [7, 8, 4]], bos_id=1, eos_id=2)


def norm(tree) -> float:
  return float(sum(jnp.sum(jnp.abs(leaf)) for leaf in jax.tree_util.tree_leaves(tree)))


@pytest.fixture(scope="module")
def compiled():
  """The many-to-many model and ONE jitted (loss, aux), grad of its training loss_fn (every task's branch)."""
  model = many_to_many()
  return model, jax.jit(jax.value_and_grad(multitask.make_loss_fn(model), has_aux=True)), model.init(
      jax.random.PRNGKey(0))


def _es_autoencoder(model, params):
  """An independent Seq2Seq es -> es with its own params, and the model's params holding them."""
  single = dataclasses.replace(model.architecture, source_vocab_size=9, target_vocab_size=9)
  single_params = single.init(jax.random.PRNGKey(3))
  params = {"encoders": dict(params["encoders"]), "decoders": dict(params["decoders"])}
  params["encoders"]["es"], params["decoders"]["es"] = single.split_params(single_params)
  return single, single_params, params


def test_a_task_is_exactly_the_seq2seq_of_its_encoder_and_decoder(compiled):
  model, value_and_grad, params = compiled
  single, single_params, params = _es_autoencoder(model, params)
  (loss, _), _ = value_and_grad(params, multitask.TaskBatch(np.int32(2), batch()), jax.random.PRNGKey(0))
  np.testing.assert_allclose(loss, jax.jit(single.loss)(single_params, batch()), rtol=1e-6, atol=1e-6)
  assert model.task_model("es_es") == single


@pytest.mark.slow
def test_composition_is_exact_with_attention_too():
  model = many_to_many(architecture(kind="sutskever", cell=cells.make_cell("lstm", H), attention="general",
                                    input_feeding=True))
  single, single_params, params = _es_autoencoder(model, model.init(jax.random.PRNGKey(0)))
  np.testing.assert_allclose(jax.jit(model.loss)(params, multitask.TaskBatch(np.int32(2), batch())),
                             single.loss(single_params, batch()), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(model(params, batch(), task="es_es"), single(single_params, batch()), atol=1e-6)


def test_split_and_join_are_inverse_and_sides_depend_on_one_vocabulary():
  model = architecture()
  params = model.init(jax.random.PRNGKey(0))
  encoder, decoder = model.split_params(params)
  assert set(encoder) == {"source_embedding", "encoder", "context"}
  assert set(decoder) == {"target_embedding", "decoder", "readout", "bridge"}
  joined = seq2seq.Seq2Seq.join_params(encoder, decoder)
  assert jax.tree_util.tree_structure(joined) == jax.tree_util.tree_structure(params)
  wider = dataclasses.replace(model, target_vocab_size=13)
  shapes = jax.eval_shape(lambda: wider.split_params(wider.init(jax.random.PRNGKey(1)))[0])
  assert jax.tree_util.tree_map(lambda s: s.shape, shapes) == jax.tree_util.tree_map(jnp.shape, encoder)


def test_gradients_reach_only_the_task_components_and_shared_ones_get_both(compiled):
  model, value_and_grad, params = compiled
  grad = lambda index: value_and_grad(params, multitask.TaskBatch(np.int32(index), batch()), jax.random.PRNGKey(0))[1]
  en_es, en_en = grad(0), grad(1)
  assert norm(en_es["encoders"]["en"]) > 0 and norm(en_es["decoders"]["es"]) > 0
  assert norm(en_es["encoders"]["es"]) == 0.0 and norm(en_es["decoders"]["en"]) == 0.0
  assert norm(en_en["encoders"]["en"]) > 0 and norm(en_en["decoders"]["en"]) > 0
  assert norm(en_en["encoders"]["es"]) == 0.0 and norm(en_en["decoders"]["es"]) == 0.0
  # the shared English encoder: two different gradients, one from each task
  assert norm(jax.tree_util.tree_map(jnp.subtract, en_es["encoders"]["en"], en_en["encoders"]["en"])) > 0


def test_per_task_summary_gives_each_task_its_mean_loss(compiled):
  model, value_and_grad, params = compiled
  history = []
  for index in (0, 0, 1):
    (loss, aux), _ = value_and_grad(params, multitask.TaskBatch(np.int32(index), batch()), jax.random.PRNGKey(0))
    history.append({"loss": float(loss), **{k: float(v) for k, v in aux.items()}})
  mean = {k: float(np.mean([h[k] for h in history])) for k in history[0]}
  summary = multitask.per_task_summary(model.task_names)(mean)
  np.testing.assert_allclose(summary["en_es_loss"], history[0]["loss"], rtol=1e-6)
  np.testing.assert_allclose(summary["en_en_loss"], history[2]["loss"], rtol=1e-6)
  assert "es_es_loss" not in summary and summary["en_es_share"] == pytest.approx(2 / 3)
  assert not any(k.endswith("_loss_sum") for k in summary)


def test_mixing_frequencies_match_the_weights_and_are_reproducible():
  model = many_to_many(weights=(1.0, 0.5, 0.5))
  draws = 4000
  frequencies = multitask.task_frequencies(model, seed=0, num_draws=draws)
  for name, alpha in zip(model.task_names, model.probabilities):   # alpha = 0.5, 0.25, 0.25
    assert abs(frequencies[name] - alpha) < 4 * math.sqrt(alpha * (1 - alpha) / draws), (name, frequencies)
  assert multitask.task_frequencies(model, seed=0, num_draws=500) == multitask.task_frequencies(model, 0, 500)
  sequence = lambda seed: [multitask.draw_task(model.probabilities, seed, n) for n in range(50)]
  assert sequence(0) == sequence(0) and sequence(0) != sequence(1)
  never = many_to_many(weights=(1.0, 0.0, 2.0))
  assert multitask.task_frequencies(never, seed=5, num_draws=2000)["en_en"] == 0.0
  assert multitask.task_frequencies(many_to_many(weights=(0.0, 0.0, 1.0)), 0, 300)["es_es"] == 1.0


def test_task_stream_resumes_exactly():
  model = many_to_many()
  rng = np.random.default_rng(0)
  pairs = [(list(rng.integers(4, 9, rng.integers(1, 6))), list(rng.integers(4, 9, rng.integers(1, 6))))
           for _ in range(40)]

  def stream():
    sources, targets = zip(*pairs)
    return multitask.MultiTaskBatches(model, {name: translation.PairBatches(sources, targets, 4, seed=i)
                                              for i, name in enumerate(model.task_names)}, seed=3)

  first = stream()
  for _ in range(7):
    next(first)
  position = json.loads(json.dumps(first.position()))   # what a checkpoint stores
  expected = [next(first) for _ in range(12)]
  resumed = stream()
  resumed.seek(position)
  for batch_a, batch_b in zip(expected, [next(resumed) for _ in range(12)]):
    assert int(batch_a.task) == int(batch_b.task)
    np.testing.assert_array_equal(batch_a.batch.source, batch_b.batch.source)
  assert resumed.counts == first.counts and sum(first.counts.values()) == 19


def test_settings_are_named_after_luong_et_al():
  one_to_many = multitask.MultiTaskSeq2Seq(
      architecture(), (multitask.Component("en", 11),), (multitask.Component("es", 9), multitask.Component("en", 11)),
      (multitask.Task("en_es", "en", "es"), multitask.Task("en_en", "en", "en", 0.1)))
  assert multitask.setting_of(one_to_many) == "one-to-many"
  assert multitask.setting_of(many_to_many()) == "many-to-many"
  assert multitask.setting_of(many_to_many(weights=(1.0, 0.0, 0.5))) == "many-to-one"
  assert multitask.setting_of(many_to_many(weights=(1.0, 0.0, 0.0))) == "single-task"
  assert multitask.shared_components(one_to_many)["encoders"] == {"en": ["en_es", "en_en"]}


def _registry(tasks, encoders=(("en", 11),), decoders=(("es", 9),)):
  return multitask.MultiTaskSeq2Seq(architecture(), tuple(multitask.Component(*e) for e in encoders),
                                    tuple(multitask.Component(*d) for d in decoders), tuple(tasks))


@pytest.mark.parametrize("build, message", [
    (lambda: _registry([multitask.Task("en_es", "fr", "es")]), "names encoder 'fr'"),
    (lambda: _registry([multitask.Task("en_es", "en", "de")]), "names decoder 'de'"),
    (lambda: _registry([multitask.Task("en_es", "en", "es", 0.0)]), "sum to 0"),
    (lambda: _registry([multitask.Task("en_es", "en", "es", -1.0)]), "is -1.0; expected a finite number >= 0"),
    (lambda: _registry([multitask.Task("en_es", "en", "es", float("nan"))]), "expected a finite number"),
    (lambda: _registry([]), "registry is empty"),
    (lambda: _registry([multitask.Task("a", "en", "es"), multitask.Task("a", "en", "es")]), "more than once"),
    (lambda: _registry([multitask.Task("en-es", "en", "es")]), "must match"),
    (lambda: _registry([multitask.Task("en_es", "en", "es")], decoders=(("es", 9), ("en", 11))),
     r"\['en'\] are used by no task"),
    (lambda: _registry([multitask.Task("en_es", "en", "es")], decoders=(("es", 2),)), "lies outside decoder 'es'"),
    (lambda: _registry([multitask.Task("en_es", "en", "es")]).check_vocabularies("en_es", 12, 9),
     "source vocabulary of 12 tokens but its encoder 'en' has 11"),
    (lambda: _registry([multitask.Task("en_es", "en", "es")]).check_vocabularies("en_es", 11, 8),
     "target vocabulary of 8 tokens but its decoder 'es' has 9"),
    (lambda: _registry([multitask.Task("en_es", "en", "es")]).task("es_en"), "unknown task 'es_en'"),
    (lambda: multitask.MultiTaskBatches(_registry([multitask.Task("en_es", "en", "es")]), {}), "expected exactly"),
    (lambda: architecture().split_params({"encoder": {}, "lstm": {}}), r"unknown groups \['lstm'\]"),
])
def test_bad_inputs_are_one_line_value_errors(build, message):
  with pytest.raises(ValueError, match=message) as error:
    build()
  assert "\n" not in str(error.value)


# ---- the experiment (in-process, dates): compiles several jitted steps and decoders ---------------------
SMOKE = ("--smoke", "--dataset=dates", "--steps=8", "--eval_every=4", "--log_every=4", "--num_samples=1")


@pytest.mark.slow
def test_smoke_run_writes_per_task_results_and_resume_continues_exactly(run_experiment, tmp_path):
  pytest.importorskip("sacrebleu")
  whole = run_experiment("multitask", *SMOKE, "--setting=many_to_one", f"--workdir={tmp_path / 'whole'}")
  assert whole.code == 0, whole.err
  results = json.load(open(tmp_path / "whole" / "results.json"))
  assert set(results["tasks"]) == {"words_iso", "iso_iso"} and results["mixing_setting"] == "many-to-one"
  assert results["shared"]["decoders"] == {"iso": ["words_iso", "iso_iso"]}
  assert sum(task["minibatches"] for task in results["tasks"].values()) == 8 == results["steps"]
  assert results["translation_minibatches"] == results["tasks"]["words_iso"]["minibatches"]
  for name, task in results["tasks"].items():
    assert 0.0 <= task["test_greedy_bleu"] <= 1.0 and task["test_loss"] > 0, name
  assert "test_beam_bleu" in results["tasks"]["words_iso"] and "test_beam_bleu" not in results["tasks"]["iso_iso"]
  assert results["test_greedy_bleu"] == results["tasks"]["words_iso"]["test_greedy_bleu"]
  for name in ("curves.png", "curves_words_iso.png", "curves_iso_iso.png", "samples.txt", "test_translations.tsv",
               "words_vocab.json", "iso_vocab.json", "model.json"):
    assert os.path.getsize(tmp_path / "whole" / name) > 0, name

  # stopped at step 4, then resumed to 8: the same records and results as the uninterrupted run
  half = run_experiment("multitask", *SMOKE, "--setting=many_to_one", "--steps=4", f"--workdir={tmp_path / 'cut'}")
  assert half.code == 0, half.err
  resumed = run_experiment("multitask", "--resume", "--steps=8", f"--workdir={tmp_path / 'cut'}")
  assert resumed.code == 0, resumed.err
  again = json.load(open(tmp_path / "cut" / "results.json"))
  assert again["resumed_from_step"] == 4
  for name, task in results["tasks"].items():
    for key in ("test_loss", "test_greedy_bleu", "valid_loss", "minibatches"):
      assert again["tasks"][name][key] == pytest.approx(task[key], rel=1e-5), (name, key)

  def valid_at_8(workdir):
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return [r for r in records if r["split"] == "valid" and r["step"] == 8][-1]

  whole_valid, cut_valid = valid_at_8(tmp_path / "whole"), valid_at_8(tmp_path / "cut")
  assert set(whole_valid) == set(cut_valid)
  for key, value in whole_valid.items():
    if key not in ("time_s", "split"):
      assert cut_valid[key] == pytest.approx(value, rel=1e-5), key


def test_weight_zero_is_the_single_task_baseline(run_experiment, tmp_path):
  pytest.importorskip("sacrebleu")
  result = run_experiment("multitask", *SMOKE, "--auxiliary_weight=0", f"--workdir={tmp_path}")
  assert result.code == 0, result.err
  results = json.load(open(tmp_path / "results.json"))
  assert list(results["tasks"]) == ["words_iso"] and results["translation_minibatches"] == 8
  assert results["mixing_setting"] == "single-task"
