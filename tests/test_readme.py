"""The README's code example runs exactly as written, and its commands are the ones CI runs."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme():
  return (ROOT / "README.md").read_text()


def test_readme_code_example_runs_as_written(capsys):
  blocks = re.findall(r"```python\n(.*?)```", _readme(), flags=re.S)
  assert blocks, "README.md has no python example"
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)
  grads = namespace["grads"]
  assert grads["w_hh"].shape == (128, 32)
  assert grads["w_xh"].shape == (128, 8)
  printed = capsys.readouterr().out
  assert "w_hh" in printed


def test_readme_interop_example_runs_as_written(tmp_path, monkeypatch):
  import pytest
  torch = pytest.importorskip("torch")
  pytest.importorskip("safetensors")
  block = next(b for b in re.findall(r"```python\n(.*?)```", _readme(), flags=re.S) if "interop" in b)
  monkeypatch.chdir(tmp_path)
  namespace = {}
  exec(compile(block, "README.md", "exec"), namespace)
  xs = torch.ones((4, 10, 8))
  lengths = torch.tensor([10, 7, 3, 1])
  packed = torch.nn.utils.rnn.pack_padded_sequence(xs, lengths, batch_first=True)
  with torch.no_grad():
    out, _ = namespace["torch_lstm"](packed)
  ys_torch, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=10)
  import numpy as np
  np.testing.assert_allclose(np.asarray(namespace["ys"]), ys_torch.numpy(), atol=1e-5)
  assert (tmp_path / "lstm.safetensors").stat().st_size > 1000


def test_readme_opens_with_exactly_two_setup_commands_and_ci_runs_the_test_one():
  first_block = re.search(r"```bash\n(.*?)```", _readme(), flags=re.S).group(1)
  commands = [line for line in first_block.splitlines() if line.strip()]
  assert len(commands) == 2
  assert "experiments/char_lm.py" in commands[0]
  assert "pytest" in commands[1]
  ci = (ROOT / ".ci" / "run").read_text()
  test_command = commands[1].split("&& ")[-1].replace(".venv/bin/python", "")
  assert test_command.strip() in ci
