"""Reading PyTorch checkpoints without unpickling code, and filling Flax parameter trees.

Checkpoints are read with safetensors, or with `torch.load(weights_only=True)` (tensors and
plain containers only). Filling a parameter tree checks every key: parameters the
checkpoint lacks, tensors whose shapes differ and checkpoint tensors nobody used are
listed by name in one error.
"""

from __future__ import annotations

import argparse
import os
import pickle
from collections.abc import Callable, Mapping
from typing import Any

import flax
import numpy as np

from vlp_jax.config_lib import UserError

StateDict = dict[str, np.ndarray]

# File names a checkpoint directory may hold, in order of preference.
CHECKPOINT_FILES = (
  "open_clip_model.safetensors",
  "model.safetensors",
  "open_clip_pytorch_model.bin",
  "pytorch_model.bin",
)


class WeightsError(UserError, ValueError):
  """A checkpoint that does not fit the model; the message names the keys."""


def _checkpoint_file(path: str) -> str:
  if os.path.isdir(path):
    for name in CHECKPOINT_FILES:
      if os.path.isfile(os.path.join(path, name)):
        return os.path.join(path, name)
    raise FileNotFoundError(f"{path!r} holds none of {', '.join(CHECKPOINT_FILES)}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist")
  return path


def to_numpy(tensor: Any) -> np.ndarray:
  """A torch tensor (bfloat16 as float32) or a NumPy array as a NumPy array."""
  if isinstance(tensor, np.ndarray):
    return tensor
  import torch  # Only reached for tensors torch produced.

  if tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16; float32 holds it exactly.
    tensor = tensor.float()
  return tensor.detach().cpu().numpy()


def _reason(error: BaseException) -> str:
  """One line saying what went wrong, without the advice paragraphs torch wraps it in."""
  if isinstance(error, pickle.UnpicklingError) and error.__context__ is not None:
    error = error.__context__  # torch.load's weights-only refusal: the unpickler's reason.
  text = " ".join(str(error).split())
  text = text.split(". ")[0][:300]  # Only the first sentence: the rest is advice.
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _read_safetensors(path: str) -> StateDict:
  from safetensors.numpy import load_file

  try:
    try:
      return dict(load_file(path))
    except TypeError:  # bfloat16 tensors: NumPy cannot hold them, torch can.
      from safetensors.torch import load_file as load_torch_file

      return {k: to_numpy(v) for k, v in load_torch_file(path).items()}
  except ImportError:
    raise
  except Exception as e:  # SafetensorError, OSError, ...: a corrupt or cut-short file.
    raise WeightsError(f"{path!r} is not a readable safetensors file: {_reason(e)}") from e


def _read_torch(path: str) -> Any:
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      f"reading {path!r} needs PyTorch (pip install torch); a .safetensors file does not"
    ) from e
  try:
    # Training scripts (MAE, DeiT, ...) store their argparse.Namespace next to the weights:
    # a plain attribute holder, safe to rebuild, so it is allowed besides tensors.
    with torch.serialization.safe_globals([argparse.Namespace]):
      return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:  # Pickles with code objects land here: refused, not run.
    raise WeightsError(f"{path!r} is not a weights-only PyTorch checkpoint: {_reason(e)}") from e
  except Exception as e:  # A cut-short zip, an empty file, another format.
    raise WeightsError(f"{path!r} is not a readable PyTorch checkpoint: {_reason(e)}") from e


def read_state_dict(path: str) -> StateDict:
  """name -> array from a `.safetensors`, `.pt`/`.pth`/`.bin` file or a directory holding one.

  Unwraps {"state_dict": ...} / {"model": ...} containers and DistributedDataParallel's
  "module." prefix. A file that cannot be read as a checkpoint raises a WeightsError
  naming it.
  """
  path = _checkpoint_file(path)
  if path.endswith(".safetensors"):
    return _read_safetensors(path)
  loaded = _read_torch(path)
  for container in ("state_dict", "model"):
    if isinstance(loaded, Mapping) and isinstance(loaded.get(container), Mapping):
      loaded = loaded[container]
  if not isinstance(loaded, Mapping):
    raise WeightsError(f"{path!r} does not hold a state dict (found {type(loaded).__name__})")
  prefix = "module." if all(k.startswith("module.") for k in loaded) else ""
  try:
    return {k[len(prefix) :]: to_numpy(v) for k, v in loaded.items() if hasattr(v, "shape")}
  except Exception as e:  # A tensor NumPy cannot hold (complex32, a meta tensor, ...).
    raise WeightsError(f"{path!r} holds a tensor that cannot be read: {_reason(e)}") from e


class StateDictReader:
  """Hands out checkpoint tensors by name and remembers which were used."""

  def __init__(self, state_dict: Mapping[str, np.ndarray], source: str = "checkpoint"):
    self.state_dict = state_dict
    self.source = source
    self.used: set[str] = set()
    self.missing: list[str] = []

  def __contains__(self, key: str) -> bool:
    return key in self.state_dict

  def get(self, key: str) -> np.ndarray | None:
    """The tensor `key` as float32/int NumPy, or None (recorded as missing)."""
    if key not in self.state_dict:
      self.missing.append(key)
      return None
    self.used.add(key)
    value = np.asarray(self.state_dict[key])
    return value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value

  def unused(self, ignore: Callable[[str], bool] = lambda key: False) -> list[str]:
    return sorted(k for k in self.state_dict if k not in self.used and not ignore(k))


def flatten(params: Any) -> dict[str, Any]:
  """{"a/b/kernel": leaf} view of a nested parameter dict."""
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(params).items()}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def fill_params(
  template: Any,
  values: Mapping[str, np.ndarray | None],
  *,
  reader: StateDictReader,
  allow_missing: Callable[[str], bool] = lambda path: False,
  ignore_unused: Callable[[str], bool] = lambda key: False,
) -> dict[str, Any]:
  """`template` (a parameter tree or its shapes) with the leaves named in `values` replaced.

  Leaves of the template that `values` does not provide keep the template's value only
  when `allow_missing(path)` says so (e.g. adapters, LoRA, a new projection head);
  otherwise the call fails listing every missing, mis-shaped and unused key.
  """
  flat = flatten(template)
  problems = []
  unknown = sorted(set(values) - set(flat))
  if unknown:
    problems.append(f"converted parameters the model does not have: {unknown}")
  missing_params = [p for p in flat if values.get(p) is None and not allow_missing(p)]
  if missing_params:
    problems.append(f"model parameters not in the {reader.source}: {missing_params}")
  if reader.missing:
    problems.append(f"keys missing from the {reader.source}: {sorted(set(reader.missing))}")
  out = {}
  for path, leaf in flat.items():
    value = values.get(path)
    if value is None:
      out[path] = leaf
    elif tuple(value.shape) != tuple(leaf.shape):
      problems.append(f"{path}: {reader.source} has shape {value.shape}, model {leaf.shape}")
    else:
      out[path] = np.asarray(value, dtype=leaf.dtype)
  unused = reader.unused(ignore_unused)
  if unused:
    problems.append(f"{reader.source} tensors the model does not use: {unused}")
  if problems:
    raise WeightsError("; ".join(problems))
  return unflatten(out)
