"""Readers for the compositional benchmarks' official files -> `MatchingSet`s.

- SugarCrepe: add_obj.json ... swap_att.json, each `{id: {"filename", "caption",
  "negative_caption"}}`, with COCO val2017 images (`images=`).
- ARO: visual_genome_relation.json / visual_genome_attribution.json (lists of
  `{"image_path", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "true_caption",
  "false_caption", "relation_name" | "attributes"}`, images in `<dir>/images`, cropped
  to the box as ARO does); COCO-Order / Flickr30k-Order as ARO's test cases
  `[{"image", "caption_options": [true, 4 shuffled]}]` (`coco_order=`, `flickr_order=`,
  with `coco_images=` / `flickr_images=`): ARO draws the shuffles with spaCy at load time.
- Winoground: examples.jsonl (`id`, `caption_0/1`, `image_0/1`, `collapsed_tag`) and
  `images/<image_0>.png`.
- CREPE: its CSVs (`image_id`, `x`, `y`, `width`, `height`, `caption`, and `hard_negs`
  or `valid_hard_negs_{atom,comp,combined}` as Python list literals), Visual Genome
  images `<image_id>.jpg` in one or more folders (`images=dir1:dir2`), cropped to the box.
- SVO probes: svo_probes.csv (`sentence`, `pos_image_id`, `neg_image_id`, `subj_neg`,
  `verb_neg`, `obj_neg`) with images `<image_id>.<ext>` (`images=`); rows whose images
  are absent (many URLs are dead) are dropped and counted, as the official notebook does.
"""

from __future__ import annotations

import ast
import csv
import glob
import json
import os
import re

import numpy as np
from absl import logging

from vlp_jax.evaluation.compositional import PAD, Interner, MatchingSet
from vlp_jax.input_pipeline.dataset_files import IMAGE_EXTENSIONS, read_json, read_text, require
from vlp_jax.input_pipeline.image_sources import DataError, ImageRef

SUGARCREPE_SUBSETS = (
  "add_obj",
  "add_att",
  "replace_obj",
  "replace_att",
  "replace_rel",
  "swap_obj",
  "swap_att",
)
VG_RELATION_FILE = "visual_genome_relation.json"
VG_ATTRIBUTION_FILE = "visual_genome_attribution.json"
NUMBER = (int, float)


def _existing(path: str) -> str:
  if not os.path.exists(path):
    raise DataError(f"{path} does not exist")
  return path


def read_sugarcrepe(root: str, image_root: str) -> MatchingSet:
  """The subsets present in `root` (at least one); items are [positive, negative]."""
  interner = Interner()
  item_images, item_texts, subsets = [], [], []
  found = [s for s in SUGARCREPE_SUBSETS if os.path.exists(os.path.join(root, f"{s}.json"))]
  if not found:
    raise DataError(
      f"{root}: none of the SugarCrepe files {[f'{s}.json' for s in SUGARCREPE_SUBSETS]}"
    )
  if len(found) < len(SUGARCREPE_SUBSETS):
    logging.warning("SugarCrepe: only %s found in %s", found, root)
  images = _existing(image_root or os.path.join(root, "val2017"))
  for subset in found:
    path = os.path.join(root, f"{subset}.json")
    data = read_json(path)
    if not isinstance(data, dict):
      raise DataError(f"{path}: expected a map from ids to examples")
    for key, entry in data.items():
      where = f"{path}: key {key!r}"
      filename = require(entry, "filename", where)
      item_images.append([interner.image(ImageRef(os.path.join(images, filename)))])
      item_texts.append(
        [
          interner.text(require(entry, "caption", where)),
          interner.text(require(entry, "negative_caption", where)),
        ]
      )
      subsets.append(subset)
  return interner.matching_set(
    "sugar_crepe", item_images, item_texts, {"subset": np.asarray(subsets)}
  )


def _box(entry: dict, where: str, keys: tuple[str, str, str, str]) -> tuple[float, ...]:
  x, y, w, h = (require(entry, k, where, NUMBER) for k in keys)
  return (x, y, x + w, y + h)


def read_aro_vg(path: str, image_root: str, group_key: str) -> MatchingSet:
  """VG-Relation (group_key "relation_name") or VG-Attribution ("attributes")."""
  data = read_json(path)
  if not isinstance(data, list):
    raise DataError(f"{path}: expected a list of test cases")
  interner = Interner()
  item_images, item_texts, groups = [], [], []
  for i, entry in enumerate(data):
    where = f"{path}: [{i}]"
    box = _box(entry, where, ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))
    image = ImageRef(os.path.join(image_root, require(entry, "image_path", where)), box=box)
    item_images.append([interner.image(image)])
    false = interner.text(require(entry, "false_caption", where))
    item_texts.append([false, interner.text(require(entry, "true_caption", where))])
    if group_key == "attributes":
      attributes = require(entry, "attributes", where, list)
      if len(attributes) != 2:
        raise DataError(f"{where}: key 'attributes' should hold two attributes")
      groups.append(f"{attributes[0]}_{attributes[1]}")
    else:
      groups.append(require(entry, group_key, where))
  return interner.matching_set(
    os.path.basename(path), item_images, item_texts, {"group": np.asarray(groups)}
  )


def read_aro_order(path: str, image_root: str) -> MatchingSet:
  data = read_json(path)
  if not isinstance(data, list):
    raise DataError(f"{path}: expected a list of test cases")
  interner = Interner()
  item_images, item_texts = [], []
  for i, entry in enumerate(data):
    where = f"{path}: [{i}]"
    options = require(entry, "caption_options", where, list)
    if len(options) != 5 or not all(isinstance(o, str) for o in options):
      raise DataError(f"{where}: 'caption_options' should be 5 captions, the true one first")
    item_images.append(
      [interner.image(ImageRef(os.path.join(image_root, require(entry, "image", where))))]
    )
    item_texts.append([interner.text(o) for o in options])
  return interner.matching_set(os.path.basename(path), item_images, item_texts)


def read_aro(root: str, options: dict[str, str]) -> dict[str, MatchingSet]:
  """Every ARO subset found: VG files in `root`, order files where the options point."""
  sets = {}
  images = options.get("images") or os.path.join(root, "images")
  for name, file, key in (
    ("vg_relation", VG_RELATION_FILE, "relation_name"),
    ("vg_attribution", VG_ATTRIBUTION_FILE, "attributes"),
  ):
    if os.path.exists(os.path.join(root, file)):
      sets[name] = read_aro_vg(os.path.join(root, file), _existing(images), key)
  for name, file_key, images_key in (
    ("coco_order", "coco_order", "coco_images"),
    ("flickr30k_order", "flickr_order", "flickr_images"),
  ):
    if options.get(file_key):
      image_root = options.get(images_key) or os.path.dirname(options[file_key])
      sets[name] = read_aro_order(_existing(options[file_key]), image_root)
  if not sets:
    raise DataError(f"{root}: no {VG_RELATION_FILE} or {VG_ATTRIBUTION_FILE}, and no order files")
  return sets


def _find_image(folders: list[str], stem: str) -> str | None:
  for folder in folders:
    for ext in ("", *IMAGE_EXTENSIONS):
      path = os.path.join(folder, f"{stem}{ext}")
      if os.path.isfile(path):
        return path
  return None


def read_winoground(path: str, image_root: str) -> MatchingSet:
  """examples.jsonl (or a directory holding it, or data/examples.jsonl) + images."""
  if os.path.isdir(path):
    candidates = [
      os.path.join(path, "examples.jsonl"),
      os.path.join(path, "data", "examples.jsonl"),
    ]
    path = next((c for c in candidates if os.path.exists(c)), candidates[0])
  image_root = _existing(image_root or os.path.join(os.path.dirname(path), "images"))
  interner = Interner()
  item_images, item_texts, tags = [], [], []
  lines = read_text(path).splitlines()
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f"{path}:{number}"
    try:
      entry = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{where}: not valid JSON ({e.msg})") from e
    pair = []
    for key in ("image_0", "image_1"):
      found = _find_image([image_root], require(entry, key, where))
      if found is None:
        raise DataError(f"{where}: image {entry[key]!r} not found in {image_root}")
      pair.append(interner.image(ImageRef(found)))
    item_images.append(pair)
    item_texts.append([interner.text(require(entry, k, where)) for k in ("caption_0", "caption_1")])
    tags.append(str(entry.get("collapsed_tag", "")))
  return interner.matching_set("winoground", item_images, item_texts, {"tag": np.asarray(tags)})


def _csv_rows(path: str, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
  try:
    with open(path, encoding="utf-8", newline="") as f:
      reader = csv.DictReader(f)
      missing = [c for c in required if c not in (reader.fieldnames or [])]
      if missing:
        raise DataError(f"{path}:1: missing columns {missing}")
      # Line numbers of the file (a quoted field may span lines).
      return [(reader.line_num, row) for row in reader]
  except FileNotFoundError as e:
    raise DataError(f"{path} does not exist") from e
  except csv.Error as e:
    raise DataError(f"{path}: {e}") from e


CREPE_NEGATIVE_COLUMNS = (
  "hard_negs",
  "valid_hard_negs_atom",
  "valid_hard_negs_comp",
  "valid_hard_negs_combined",
)


def read_crepe(path: str, image_folders: list[str]) -> MatchingSet:
  """A CREPE CSV, or every CSV under a directory; a subset per file and negative column."""
  files = (
    sorted(glob.glob(os.path.join(path, "**", "*.csv"), recursive=True))
    if os.path.isdir(path)
    else [path]
  )
  if not files:
    raise DataError(f"{path}: no CSV files")
  interner = Interner()
  item_images, item_texts, subsets = [], [], []
  required = ("image_id", "caption", "x", "y", "width", "height")
  for file in files:
    rows = _csv_rows(file, required)
    columns = [c for c in CREPE_NEGATIVE_COLUMNS if rows and c in rows[0][1]]
    if not columns:
      raise DataError(f"{file}:1: no hard-negative column ({', '.join(CREPE_NEGATIVE_COLUMNS)})")
    stem = os.path.splitext(
      os.path.relpath(file, path) if os.path.isdir(path) else os.path.basename(file)
    )[0]
    for number, row in rows:
      where = f"{file}:{number}"
      try:
        x, y, w, h = (float(row[k]) for k in ("x", "y", "width", "height"))
      except (TypeError, ValueError) as e:
        raise DataError(f"{where}: x, y, width, height must be numbers") from e
      image_path = _find_image(image_folders, row["image_id"].strip())
      if image_path is None:
        raise DataError(f"{where}: image {row['image_id']!r} not found in {image_folders}")
      image = interner.image(ImageRef(image_path, box=(x, y, x + w, y + h)))
      for column in columns:
        try:
          negatives = ast.literal_eval(row[column])
        except (ValueError, SyntaxError) as e:
          raise DataError(f"{where}: column {column!r} is not a Python list literal") from e
        if not isinstance(negatives, list | tuple) or not negatives:
          raise DataError(f"{where}: column {column!r} holds no hard negatives")
        item_images.append([image])
        item_texts.append(
          [interner.text(row["caption"])] + [interner.text(str(n)) for n in negatives]
        )
        subsets.append(
          stem if column == "hard_negs" else f"{stem}/{column.removeprefix('valid_hard_negs_')}"
        )
  width = max(len(t) for t in item_texts)
  padded = np.full((len(item_texts), width), PAD, np.int64)
  for i, texts in enumerate(item_texts):
    padded[i, : len(texts)] = texts
  return interner.matching_set("crepe", item_images, padded, {"subset": np.asarray(subsets)})


def _flag(value: str, where: str, column: str) -> bool:
  lowered = value.strip().lower()
  if lowered not in ("true", "false", "1", "0"):
    raise DataError(f"{where}: column {column!r} is {value!r}, not True/False")
  return lowered in ("true", "1")


def read_svo(path: str, image_root: str) -> tuple[MatchingSet, int]:
  """Rows with exactly one negative kind whose two images exist -> items
  [positive image, negative image] x [sentence]; also returns the rows dropped."""
  rows = _csv_rows(
    path, ("sentence", "pos_image_id", "neg_image_id", "subj_neg", "verb_neg", "obj_neg")
  )
  image_root = _existing(image_root or os.path.join(os.path.dirname(path), "images"))
  interner = Interner()
  pairs: dict[tuple[str, str], int] = {}
  item_images, item_texts, kinds, pos_pairs, neg_pairs = [], [], [], [], []
  missing = 0
  for number, row in rows:
    where = f"{path}:{number}"
    flags = {k: _flag(row[f"{k}_neg"], where, f"{k}_neg") for k in ("subj", "verb", "obj")}
    if sum(flags.values()) != 1:
      continue  # The notebook's subsets take rows with exactly one negative kind.
    ids = [row["pos_image_id"].strip(), row["neg_image_id"].strip()]
    if not all(ids):
      raise DataError(f"{where}: empty image id")
    paths = [_find_image([image_root], i) for i in ids]
    if None in paths:
      missing += 1
      continue
    # Pairs are keyed as the notebook keys scores: lower-cased sentence, single spaces.
    sentence = re.sub(" +", " ", row["sentence"].lower())
    item_images.append([interner.image(ImageRef(p)) for p in paths])
    item_texts.append([interner.text(row["sentence"])])
    kinds.append(next(k for k, v in flags.items() if v))
    pos_pairs.append(pairs.setdefault((sentence, ids[0]), len(pairs)))
    neg_pairs.append(pairs.setdefault((sentence, ids[1]), len(pairs)))
  if missing:
    logging.warning("SVO probes: %d rows dropped, their images are not in %s", missing, image_root)
  if not item_images:
    raise DataError(f"{path}: no usable rows (images looked up in {image_root})")
  matching = MatchingSet(
    "svo_probes",
    interner.images,
    interner.texts,
    np.asarray(item_images),
    np.asarray(item_texts),
    {
      "kind": np.asarray(kinds),
      "pos_pair": np.asarray(pos_pairs),
      "neg_pair": np.asarray(neg_pairs),
    },
  )
  return matching, missing
