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


def test_readme_opens_with_exactly_two_setup_commands_and_ci_runs_the_test_one():
  first_block = re.search(r"```bash\n(.*?)```", _readme(), flags=re.S).group(1)
  commands = [line for line in first_block.splitlines() if line.strip()]
  assert len(commands) == 2
  assert "experiments/char_lm.py" in commands[0]
  assert "pytest" in commands[1]
  ci = (ROOT / ".ci" / "run").read_text()
  test_command = commands[1].split("&& ")[-1].replace(".venv/bin/python", "")
  assert test_command.strip() in ci
