"""Shared setup for the command-line entry points."""

from __future__ import annotations

import functools
import logging as py_logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from vlp_jax import config_lib
from vlp_jax.config_lib import ConfigError, UserError

_COORDINATOR = flags.DEFINE_string(
  "coordinator_address",
  None,
  "host:port of process 0, to launch several processes by hand (e.g. two on one machine); "
  "TPU pods, SLURM and Open MPI jobs are detected without it.",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator_address.")
_VERBOSE = flags.DEFINE_bool(
  "verbose",
  False,
  "Full tracebacks: of user errors (bad config, locked workdir, full disk), which otherwise "
  "print one `error:` line, and of the libraries' logged errors.",
)

# Environment variables that mark a multi-process launch jax.distributed detects by itself.
_CLUSTER_SIZE_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")

# Libraries whose INFO records drown the training log (orbax logs every file it writes).
_CHATTY_LIBRARIES = (
  f"{os.sep}orbax{os.sep}",
  f"{os.sep}grain{os.sep}",
  f"{os.sep}jax{os.sep}_src{os.sep}",
)


class _DropLibraryInfo(py_logging.Filter):
  """Drops the libraries' INFO records; keeps their warnings and errors, without the
  tracebacks unless --verbose (orbax logs one per thread a failed save passed through)."""

  def __init__(self, keep_tracebacks: bool):
    super().__init__()
    self.keep_tracebacks = keep_tracebacks

  def filter(self, record: py_logging.LogRecord) -> bool:
    if not any(part in record.pathname for part in _CHATTY_LIBRARIES):
      return True
    if record.levelno < py_logging.WARNING:
      return False
    if not self.keep_tracebacks:
      record.exc_info, record.exc_text = None, None
    return True


def resolve_config_file(path: str) -> str:
  """`path` where it exists; else the packaged config (vlp_jax/configs) it names: a path
  ending in configs/<name>.py (README's "configs/demo.py" from any directory, after `pip
  install .` too), "<name>.py" or "<name>". A file of the user's own at `path` wins."""
  if os.path.exists(path):
    return path
  folder, name = os.path.split(path)
  name = name if name.endswith(".py") else f"{name}.py"
  packaged = os.path.join(config_lib.CONFIGS_DIR, name)
  if os.path.basename(folder) in ("", "configs") and os.path.isfile(packaged):
    return packaged
  known = ", ".join(config_lib.packaged_recipes())
  raise ConfigError(f"config file {path!r} does not exist; packaged configs: {known}")


class _ResolvingParser(flags.ArgumentParser):
  """ml_collections' "path[:arg]" config file parser, the path resolved first
  (resolve_config_file)."""

  def __init__(self, parser: flags.ArgumentParser):
    self._parser = parser

  def parse(self, argument: str) -> Any:
    path, sep, arg = argument.partition(":")
    return self._parser.parse(resolve_config_file(path) + sep + arg)

  def flag_type(self) -> str:
    return self._parser.flag_type()


def define_config_flag(
  name: str = "config",
  help_string: str = "Config file (path[:arg]) or packaged config name.",
  default: str | None = None,
  flag_values: flags.FlagValues = flags.FLAGS,
  sys_argv: list[str] | None = None,
) -> flags.FlagHolder:
  """A --config flag (with --config.<field>=value overrides) that also takes the packaged
  configs by name or by README's path from any directory (resolve_config_file);
  `flag_values` and `sys_argv` as ml_collections' DEFINE_config_file. The caller declares
  it a key flag (flags.declare_key_flag) for --helpshort to list it."""
  default = resolve_config_file(default) if default else None
  holder = config_flags.DEFINE_config_file(
    name, default, help_string, flag_values=flag_values, sys_argv=sys_argv
  )
  flag_values[name].parser = _ResolvingParser(flag_values[name].parser)
  return holder


def log_to_absl_at_info() -> None:
  """absl logging at INFO for an argparse entry point (the converters)."""
  flags.FLAGS.mark_as_parsed()  # absl's logging waits for parsed flags; ours are argparse's.
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)


def quiet_library_logs() -> None:
  """Keeps our INFO lines and the libraries' warnings; drops the libraries' INFO chatter."""
  logging.get_absl_handler().addFilter(_DropLibraryInfo(keep_tracebacks=_VERBOSE.value))


def run(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)` for the entry points: a UserError (a bad config value, a locked
  workdir, a full disk, ...) and a bad flag, e.g. an unknown config key, print
  `error: <message>` on stderr and exit with status 2; --verbose raises user errors with
  their traceback instead."""
  app.run(_reporting_user_errors(main), flags_parser=_parse_flags)


def _fail(message: str) -> NoReturn:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def _reporting_user_errors(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  @functools.wraps(main)
  def wrapped(argv: list[str]) -> None:
    try:
      main(argv)
    except UserError as e:
      if _VERBOSE.value:
        raise
      _fail(str(e))

  return wrapped


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f"{e} (--helpshort lists the flags)")
  except UserError as e:  # E.g. a config file's own argument ("path:key=value").
    _fail(str(e))
  except (AttributeError, KeyError) as e:
    if (message := _unknown_config_key(e, argv)) is None:
      raise
    _fail(message)


def _unknown_config_key(error: Exception, argv: list[str]) -> str | None:
  """ml_collections' error for a `--config.a.b=v` naming no field, as one line naming
  the flag; None for any other error."""
  text = error
  while isinstance(text, BaseException) and text.args:  # AttributeError(KeyError(str))
    text = text.args[0]
  first, _, hint = str(text).partition("\n")
  if not (match := re.fullmatch(r"""['"]?([\w-]+)['"]?""", first.strip())):
    return None
  key = match.group(1)
  pattern = rf"--?\w+(\.\w+)*\.{re.escape(key)}(\.\w+)*(=|$)"  # A leaf or a parent.
  flag = next((a for a in argv[1:] if re.match(pattern, a)), None)
  if flag is None:
    return None
  hint = hint.strip()
  suggestion = f" ({hint[:1].lower()}{hint[1:]})" if hint else ""
  return f"{flag}: the config has no field {key!r}{suggestion}"


def _launched_on_a_cluster() -> bool:
  if any(int(os.environ.get(v, "1")) > 1 for v in _CLUSTER_SIZE_VARIABLES):
    return True
  # A TPU pod slice lists one hostname per worker; a single TPU VM lists one.
  return len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def initialize_distributed() -> None:
  """jax.distributed.initialize() for multi-process launches; nothing for one process."""
  if _COORDINATOR.value:
    if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id")
    # CPU-only processes need a collectives backend to talk to each other (tests, debugging).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _launched_on_a_cluster():
    jax.distributed.initialize()
  else:
    return
  logging.info("Process %d of %d", jax.process_index(), jax.process_count())
  if jax.process_index() > 0:
    logging.set_verbosity(logging.WARNING)  # Progress is logged once, by process 0.
