"""Old spellings that still work: one rule for every renamed argument, option and config field.

A renamed name keeps working for a while: giving the old one warns (``FutureWarning``, shown to
end users by default) naming the new spelling, and giving both is a
:class:`~hkpipe._src.errors.ConfigError` (they could disagree).
"""

from __future__ import annotations

import warnings
from typing import Any

from hkpipe._src.errors import ConfigError


def renamed(old: str, old_value: Any, new: str, new_value: Any, *, where: str, why: str = "",
            stacklevel: int = 3) -> Any:
  """The value of a renamed argument, from its new or (with a warning) its old spelling.

  Args:
    old: the old spelling, as the user writes it (e.g. ``"num_stages"``, ``"--stages"``,
      ``"config.pipeline.stages"``); messages show it as ``old=value``.
    old_value: what was given under it (``None``: not given).
    new: the new spelling (e.g. ``"num_ranks"``).
    new_value: what was given under it (``None``: not given).
    where: names the call or config that takes it (e.g. ``"hkpipe.schedules.get"``).
    why: an optional sentence on why the name changed.
    stacklevel: passed to ``warnings.warn`` (3: the caller of the function that calls this).

  Returns:
    ``new_value`` if given, else ``old_value`` (``None`` when neither was given).

  Raises:
    ConfigError: both spellings were given.
  """
  if old_value is None:
    return new_value
  if new_value is not None:
    raise ConfigError(f"{where}: got both {old}={old_value!r} (deprecated) and "
                      f"{new}={new_value!r}; pass only {new}.")
  warnings.warn(f"{where}: {old} is deprecated; use {new} instead ({new}={old_value!r})."
                + (f" {why}" if why else ""), FutureWarning, stacklevel=stacklevel)
  return old_value
