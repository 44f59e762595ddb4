"""The README's notebook example runs as written."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_pure_api_example_runs():
  text = README.read_text()
  block = re.search(r"<!-- pure-api-example:start -->\s*```python\n(.*?)```\s*"
                    r"<!-- pure-api-example:end -->", text, re.S)
  assert block, "README lacks the pure-api-example block"
  namespace = {}
  exec(compile(block.group(1), "README.md", "exec"), namespace)
  assert namespace["samples"].shape == (16, 2)
  assert namespace["moments"].mean.shape == (64, 2)
