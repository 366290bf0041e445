"""The error hkpipe raises for bad input (configs, options, data, checkpoints)."""


class ConfigError(ValueError):
  """A bad config value, option or input; the message names the value and the fix.

  ``launch/train.py`` prints it as one line (``hkpipe: error: ...``) and exits with status 2,
  without a traceback. It subclasses ``ValueError`` so ``except ValueError`` still catches it.
  """
