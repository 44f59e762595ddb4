"""Argument checks shared by the package: one wording for "unknown X; allowed ...".

Every check raises a `ValueError` that names the argument, the value given and the allowed
values (with the nearest ones first when the value looks like a misspelling).

References: STYLE.md (bad input raises a ValueError naming the argument and the allowed values).
"""
from __future__ import annotations

import difflib
from typing import Any, Iterable


def nearest(value: Any, allowed: Iterable[Any], n: int = 3) -> list[str]:
  """Up to `n` of `allowed` (as strings) closest to `value` by `difflib` ratio, best first."""
  return difflib.get_close_matches(str(value), [str(a) for a in allowed], n=n, cutoff=0.6)


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
  """Returns `value` if it is one of `allowed`, else raises a ValueError.

  The message reads "Unknown {name}={value!r}; allowed: [...]", with "did you mean ...?" when a
  close spelling exists.
  """
  allowed = list(allowed)
  if value in allowed:
    return value
  close = nearest(value, allowed)
  hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
  raise ValueError(f"Unknown {name}={value!r}{hint}; allowed: {allowed}.")


def check_keys(name: str, given: Iterable[str], allowed: Iterable[str]) -> None:
  """Raises a ValueError naming every key of `given` that is not in `allowed`.

  name: what the keys belong to, e.g. "model 'DiT-S/2' (DiT)" or "data config".
  """
  allowed = sorted(allowed)
  unknown = sorted(set(given) - set(allowed))
  if not unknown:
    return
  hints = []
  for key in unknown:
    close = nearest(key, allowed)
    hints.append(f"{key!r}" + (f" (did you mean {', '.join(repr(c) for c in close)}?)"
                               if close else ""))
  raise ValueError(f"Unknown key(s) for {name}: {', '.join(hints)}; allowed: {allowed}.")
