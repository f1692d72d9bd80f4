"""convert: every input format round-trips; bad samples are skipped by reason or fixed."""

import io
import json
import logging
import os
import subprocess
import sys
import tarfile

import grain
import numpy as np
import pytest
from PIL import Image

from tests.runs import fails_after
from vlp_jax.input_pipeline import convert, image_ops, prepare, records, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W, H = 40, 30
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (240, 220, 40), (150, 50, 200)]


def _encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt, **kwargs)
  return buffer.getvalue()


def _jpeg(colour, size=(W, H)) -> bytes:
  return _encode(Image.new("RGB", size, colour), quality=95)


def _read(dst) -> list[dict]:
  paths = records.resolve_shards(str(dst))
  source = grain.sources.ArrayRecordDataSource(paths)
  return [records.decode_record(source[i]) for i in range(len(source))]


def _raw(dst) -> list[bytes]:
  source = grain.sources.ArrayRecordDataSource(records.resolve_shards(str(dst)))
  return [source[i] for i in range(len(source))]


def _mean_colour(record: dict) -> np.ndarray:
  return np.asarray(image_ops.open_image(record["image"]), np.float32).mean(axis=(0, 1))


def _assert_colour(record: dict, colour, tolerance: float = 6) -> None:
  np.testing.assert_allclose(_mean_colour(record), colour, atol=tolerance)


def _write_tar(path, members: list[tuple[str, bytes]]) -> None:
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def _small_options(**kwargs) -> convert.ConvertOptions:
  return convert.ConvertOptions(**{"records_per_shard": 4, **kwargs})


def test_webdataset_round_trip_keeps_rgb_jpegs_as_they_are(tmp_path):
  images = [_jpeg(c) for c in COLOURS]
  for shard, indices in (("00000", range(3)), ("00001", range(3, 5))):
    members = []
    for i in indices:
      meta = json.dumps({"url": f"http://x/{i}", "caption": "unused: the .txt wins"}).encode()
      members += [(f"{i:04d}.jpg", images[i]), (f"{i:04d}.txt", f"caption {i}\n".encode())]
      members += [(f"{i:04d}.json", meta)]
    _write_tar(tmp_path / f"{shard}.tar", members)
  spec = str(tmp_path / "{00000..00001}.tar")
  state = convert.convert(sources.WebDatasetSource(spec), str(tmp_path / "out"), _small_options())

  got = _read(tmp_path / "out")
  assert [r["key"] for r in got] == [f"{i:04d}" for i in range(5)]
  assert [r["caption"] for r in got] == [f"caption {i}" for i in range(5)]
  assert [r["image"] for r in got] == images  # Valid RGB JPEGs are not re-encoded.
  assert state.shards == ["data-00000.array_record", "data-00001.array_record"]
  summary = json.loads((tmp_path / "out" / "summary.json").read_text())
  assert summary["written"] == 5 and summary["skipped"] == {}
  assert summary["source"]["files"] == [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]


def test_json_list_resolves_relative_paths_and_skips_missing_files(tmp_path):
  (tmp_path / "imgs").mkdir()
  for i, colour in enumerate(COLOURS[:3]):
    (tmp_path / "imgs" / f"{i}.jpg").write_bytes(_jpeg(colour))
  entries = [
    {"image": str(tmp_path / "imgs" / "0.jpg"), "caption": "absolute path"},
    {"image": "1.jpg", "caption": ["first of two", "second of two"]},
    {"image": "missing.jpg", "caption": "no such file"},
    {"image": "2.jpg", "caption": "relative path", "image_id": 42},
  ]
  annotations = tmp_path / "train.json"
  annotations.write_text(json.dumps(entries))
  source = sources.JsonListSource(str(annotations), image_root=str(tmp_path / "imgs"))
  state = convert.convert(source, str(tmp_path / "out"), _small_options())

  got = _read(tmp_path / "out")
  assert [r["caption"] for r in got] == [
    "absolute path",
    ["first of two", "second of two"],
    "relative path",
  ]
  assert got[1]["key"] == "1.jpg" and got[2]["key"] == "42"
  for record, colour in zip(got, COLOURS):
    _assert_colour(record, colour)
  assert state.skipped == {"missing_image": 1} and state.written == 3


def test_csv_with_open_clip_defaults_and_with_custom_columns(tmp_path):
  for i, colour in enumerate(COLOURS[:2]):
    (tmp_path / f"{i}.jpg").write_bytes(_jpeg(colour))
  (tmp_path / "train.tsv").write_text("filepath\ttitle\n0.jpg\ta red one\n1.jpg\ta green one\n")
  convert.convert(sources.CsvSource(str(tmp_path / "train.tsv")), str(tmp_path / "a"))
  got = _read(tmp_path / "a")
  assert [(r["key"], r["caption"]) for r in got] == [
    ("0.jpg", "a red one"),
    ("1.jpg", "a green one"),
  ]

  # Comma-separated, other column names, a quoted caption with a comma, and non-UTF-8 bytes.
  (tmp_path / "pairs.csv").write_bytes(
    b'text,path\n"red, bright",0.jpg\n\xff\xfe bad,1.jpg\n,1.jpg\n'
  )
  source = sources.CsvSource(str(tmp_path / "pairs.csv"), keys=("path", "text", ""))
  state = convert.convert(source, str(tmp_path / "b"))
  assert [r["caption"] for r in _read(tmp_path / "b")] == ["red, bright"]
  assert state.skipped == {"caption_not_utf8": 1, "empty_caption": 1}

  with pytest.raises(sources.SourceError, match="no column"):
    sources.CsvSource(str(tmp_path / "pairs.csv"))


def test_tfds_coco_style_nested_captions(tmp_path):
  import tensorflow_datasets as tfds

  class TinyCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    # tfds 4.9.10 looks for checksums beside the builder's code through importlib_resources,
    # which the pinned etils no longer installs; this builder downloads nothing.
    code_path = None

    def _info(self):
      return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(),
            "image/filename": tfds.features.Text(),
            "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
          }
        )
      )

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, colour in enumerate(COLOURS[:3]):
        yield (
          i,
          {
            "image": np.full((H, W, 3), colour, np.uint8),
            "image/filename": f"{i}.png",
            "captions": {"text": [f"image {i}", f"picture {i}"]},
          },
        )

  data_dir = str(tmp_path / "tfds")
  TinyCaptions(data_dir=data_dir).download_and_prepare()
  # Read back from the files alone, as for a dataset prepared elsewhere.
  source = sources.TfdsSource("tiny_captions", data_dir, "train")
  assert source.count() == 3
  convert.convert(source, str(tmp_path / "out"), _small_options())

  got = sorted(_read(tmp_path / "out"), key=lambda r: r["key"])
  assert [r["key"] for r in got] == ["0.png", "1.png", "2.png"]
  assert [r["caption"] for r in got] == [[f"image {i}", f"picture {i}"] for i in range(3)]
  for record, colour in zip(got, COLOURS):
    # TFDS stores PNG: RGB PNG bytes are kept, so the pixels are exact.
    np.testing.assert_array_equal(np.asarray(image_ops.open_image(record["image"]))[0, 0], colour)


def test_arrow_tables_and_a_corrupt_arrow_file_named(tmp_path):
  import pyarrow as pa

  table = pa.table(
    {
      "image": [_jpeg(c) for c in COLOURS[:3]],
      "caption": [["a", "b"], ["c"], ["d", "e"]],
      "image_id": ["x0", "x1", "x2"],
    }
  )
  path = str(tmp_path / "part_0.arrow")
  with pa.OSFile(path, "wb") as sink, pa.RecordBatchFileWriter(sink, table.schema) as writer:
    writer.write_table(table, max_chunksize=2)  # Two record batches.
  (tmp_path / "part_1.arrow").write_bytes(b"ARROW1" + os.urandom(300))
  state = convert.convert(sources.ArrowSource(str(tmp_path)), str(tmp_path / "out"))

  got = _read(tmp_path / "out")
  assert [(r["key"], r["caption"]) for r in got] == [
    ("x0", ["a", "b"]),
    ("x1", ["c"]),
    ("x2", ["d", "e"]),
  ]
  assert list(state.unreadable_files) == [str(tmp_path / "part_1.arrow")]
  summary = json.loads((tmp_path / "out" / "summary.json").read_text())
  assert str(tmp_path / "part_1.arrow") in summary["unreadable_files"]


def _bomb_jpeg() -> bytes:
  """A small JPEG whose header claims 30000x30000 pixels."""
  data = bytearray(_jpeg(COLOURS[0]))
  sof = data.index(b"\xff\xc0")
  data[sof + 5 : sof + 9] = (30000).to_bytes(2, "big") * 2  # Height, then width.
  return bytes(data)


def test_bad_samples_are_skipped_by_reason_and_odd_images_become_correct_rgb(tmp_path):
  rgba = Image.new("RGBA", (W, H), (0, 0, 255, 0))
  rgba.paste((200, 0, 0, 255), (0, 0, W // 2, H))  # Left half opaque red, right transparent.
  palette = Image.new("RGB", (W, H), COLOURS[1]).convert("P", palette=Image.Palette.ADAPTIVE)
  trns = palette.copy()
  trns.info["transparency"] = trns.getpixel((0, 0))  # The only colour becomes transparent.
  sixteen = Image.fromarray(np.full((H, W), 128 * 257, np.uint16))
  good = _jpeg(COLOURS[2])
  cases = {
    "truncated": (good[: len(good) // 2], b"x"),
    "zero_bytes": (b"", b"x"),
    "alpha": (_encode(rgba, "PNG"), b"x"),
    "palette": (_encode(palette, "PNG"), b"x"),
    "palette_transparent": (_encode(trns, "PNG", transparency=trns.info["transparency"]), b"x"),
    "grey": (_encode(Image.new("L", (W, H), 90)), b"x"),
    "cmyk": (_encode(Image.new("CMYK", (W, H), (0, 255, 255, 0))), b"x"),
    "sixteen_bit": (_encode(sixteen, "PNG"), b"x"),
    "bomb": (_bomb_jpeg(), b"x"),
    "not_utf8": (good, b"caf\xe9 \xff"),
    "empty_caption": (good, b"  \n"),
    "no_caption": (good, None),
    "../../etc/x": (good, b"escape"),
  }
  members = []
  for key, (image, caption) in cases.items():
    extension = "png" if image.startswith(b"\x89PNG") else "jpg"
    members.append((f"{key}.{extension}", image))
    if caption is not None:
      members.append((f"{key}.txt", caption))
  _write_tar(tmp_path / "bad.tar", members)
  before = sorted(p for p in tmp_path.parent.rglob("*") if "out" not in p.parts)
  state = convert.convert(
    sources.WebDatasetSource(str(tmp_path / "bad.tar")), str(tmp_path / "out")
  )

  assert state.skipped == {
    "undecodable_image": 1,
    "empty_image": 1,
    "image_too_large": 1,
    "caption_not_utf8": 1,
    "empty_caption": 1,
    "missing_caption": 1,
    "unsafe_member_name": 1,
  }
  got = {r["key"]: r for r in _read(tmp_path / "out")}
  assert sorted(got) == ["alpha", "cmyk", "grey", "palette", "palette_transparent", "sixteen_bit"]
  for record in got.values():
    image = Image.open(io.BytesIO(record["image"]))
    assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (W, H))
  alpha = np.asarray(image_ops.open_image(got["alpha"]["image"]), np.float32)
  np.testing.assert_allclose(alpha[:, : W // 2 - 2].mean(axis=(0, 1)), (200, 0, 0), atol=6)
  np.testing.assert_allclose(alpha[:, W // 2 + 2 :].mean(axis=(0, 1)), (255, 255, 255), atol=6)
  _assert_colour(got["palette"], COLOURS[1])
  _assert_colour(got["palette_transparent"], (255, 255, 255))
  _assert_colour(got["grey"], (90, 90, 90))
  _assert_colour(got["cmyk"], (255, 0, 0))
  _assert_colour(got["sixteen_bit"], (128, 128, 128))
  # Nothing was extracted anywhere: the only new files are in the destination.
  after = sorted(p for p in tmp_path.parent.rglob("*") if "out" not in p.parts)
  assert after == before
  assert not (tmp_path.parent.parent / "etc" / "x.jpg").exists()


def test_open_image_scales_sixteen_bit_grey_instead_of_clipping():
  data = _encode(Image.fromarray(np.full((H, W), 1000, np.uint16)), "PNG")
  assert np.asarray(image_ops.open_image(data))[0, 0].tolist() == [4, 4, 4]  # 1000 / 257


def test_resize_shorter_only_downscales_and_keeps_aspect():
  big = prepare.prepare_image(_jpeg(COLOURS[0], (80, 60)), resize_shorter=30)
  assert Image.open(io.BytesIO(big)).size == (40, 30)
  tall = prepare.prepare_image(_encode(Image.new("RGB", (30, 90)), "PNG"), resize_shorter=20)
  assert Image.open(io.BytesIO(tall)).size == (20, 60)
  small = _jpeg(COLOURS[0], (40, 30))
  assert prepare.prepare_image(small, resize_shorter=64) == small  # Kept, not upscaled.


def test_an_unreadable_tar_is_named_and_the_rest_converted(tmp_path):
  _write_tar(tmp_path / "a.tar", [("0.jpg", _jpeg(COLOURS[0])), ("0.txt", b"fine")])
  (tmp_path / "b.tar").write_bytes(os.urandom(2000))
  source = sources.WebDatasetSource(f"{tmp_path / 'a.tar'},{tmp_path / 'b.tar'}")
  state = convert.convert(source, str(tmp_path / "out"))
  assert state.written == 1
  assert list(state.unreadable_files) == [str(tmp_path / "b.tar")]
  assert "tar" in state.unreadable_files[str(tmp_path / "b.tar")]


def _write_json(path, images: list[str]) -> None:
  path.write_text(json.dumps([{"image": image, "caption": f"of {image}"} for image in images]))


def test_only_regular_image_files_are_read_and_never_past_the_byte_limit(tmp_path):
  (tmp_path / "good.jpg").write_bytes(_jpeg(COLOURS[0]))
  (tmp_path / "big.jpg").write_bytes(_jpeg(COLOURS[1]) + bytes(3000))
  os.mkfifo(tmp_path / "fifo.jpg")  # Opening it for reading would wait for a writer forever.
  images = ["good.jpg", "big.jpg", "fifo.jpg", "/dev/zero"]  # /dev/zero never ends.
  if os.path.exists("/proc/self/maps"):
    images.append("/proc/self/maps")  # Regular, st_size 0, yet longer: only a bounded read stops.
  _write_json(tmp_path / "list.json", images)
  source = sources.JsonListSource(str(tmp_path / "list.json"), allow_outside_root=True)
  # A small limit: should the file-type check fail, /dev/zero costs 2 kB, not all memory.
  with fails_after(60):
    state = convert.convert(source, str(tmp_path / "out"), _small_options(max_image_bytes=2000))
  assert [r["key"] for r in _read(tmp_path / "out")] == ["good.jpg"]
  assert state.skipped == {"image_not_a_regular_file": 2, "image_file_too_large": len(images) - 3}


def test_a_fifo_swapped_in_after_the_type_check_cannot_block(tmp_path, monkeypatch):
  regular, fifo = tmp_path / "regular.jpg", tmp_path / "fifo.jpg"
  regular.write_bytes(b"x")
  os.mkfifo(fifo)
  real_stat = os.stat
  # The check sees a regular file; by the time it is opened, the path names a FIFO.
  monkeypatch.setattr(os, "stat", lambda p, *a, **k: real_stat(regular if p == str(fifo) else p))
  with fails_after(60), pytest.raises(prepare.SampleError) as e:
    prepare.read_image_file(str(fifo), os.path.realpath(tmp_path), 1000)
  assert e.value.reason == "image_not_a_regular_file"


def test_image_paths_must_resolve_within_the_image_root(tmp_path):
  (tmp_path / "imgs").mkdir()
  (tmp_path / "imgs" / "inside.jpg").write_bytes(_jpeg(COLOURS[0]))
  (tmp_path / "outside.jpg").write_bytes(_jpeg(COLOURS[1]))
  (tmp_path / "imgs" / "link_in.jpg").symlink_to(tmp_path / "imgs" / "inside.jpg")
  (tmp_path / "imgs" / "link_out.jpg").symlink_to(tmp_path / "outside.jpg")
  images = ["inside.jpg", "link_in.jpg", "../outside.jpg", str(tmp_path / "outside.jpg")]
  images.append("link_out.jpg")
  _write_json(tmp_path / "list.json", images)
  json_list = str(tmp_path / "list.json")
  state = convert.convert(
    sources.JsonListSource(json_list, image_root=str(tmp_path / "imgs")), str(tmp_path / "a")
  )
  assert [r["key"] for r in _read(tmp_path / "a")] == ["inside.jpg", "link_in.jpg"]
  assert state.skipped == {"image_outside_root": 3}

  source = sources.JsonListSource(
    json_list, image_root=str(tmp_path / "imgs"), allow_outside_root=True
  )
  assert convert.convert(source, str(tmp_path / "b")).written == 5

  # Without an image root, the annotation file's directory is the root.
  rows = "".join(f"{image}\tof {image}\n" for image in images)
  (tmp_path / "imgs" / "list.tsv").write_text(f"filepath\ttitle\n{rows}")
  state = convert.convert(
    sources.CsvSource(str(tmp_path / "imgs" / "list.tsv")), str(tmp_path / "c")
  )
  assert (state.written, state.skipped) == (2, {"image_outside_root": 3})


def test_command_line_refuses_device_files_and_paths_outside_the_root(tmp_path):
  (tmp_path / "good.jpg").write_bytes(_jpeg(COLOURS[0]))
  _write_json(tmp_path / "a.json", ["good.jpg", "/dev/zero"])
  common = ["--from=json", f"--src={tmp_path / 'a.json'}", "--max_image_bytes=2000"]
  convert.main([*common, f"--dst={tmp_path / 'o'}"])
  convert.main([*common, f"--dst={tmp_path / 'p'}", "--allow_outside_root"])
  for dst, reason in (("o", "image_outside_root"), ("p", "image_not_a_regular_file")):
    summary = json.loads((tmp_path / dst / "summary.json").read_text())
    assert (summary["written"], summary["skipped"]) == (1, {reason: 1})
    assert summary["options"]["max_image_bytes"] == 2000


def test_the_byte_limit_holds_for_tar_members_and_arrow_cells(tmp_path):
  import pyarrow as pa

  small, large = _jpeg(COLOURS[0]), _jpeg(COLOURS[1]) + bytes(3000)
  members = [("0.jpg", small), ("0.txt", b"small"), ("1.jpg", large), ("1.txt", b"large")]
  members += [("2.jpg", small), ("2.txt", b"long caption file " * 200)]
  _write_tar(tmp_path / "a.tar", members)
  options = _small_options(max_image_bytes=2000)
  state = convert.convert(
    sources.WebDatasetSource(str(tmp_path / "a.tar")), str(tmp_path / "t"), options
  )
  assert [r["key"] for r in _read(tmp_path / "t")] == ["0"]
  assert state.skipped == {"image_file_too_large": 1, "caption_file_too_large": 1}

  table = pa.table({"image": [small, large, None], "caption": ["a", "b", "c"]})
  path = str(tmp_path / "a.arrow")
  with pa.OSFile(path, "wb") as sink, pa.RecordBatchFileWriter(sink, table.schema) as writer:
    writer.write_table(table)
  state = convert.convert(sources.ArrowSource(path), str(tmp_path / "r"), options)
  assert [r["caption"] for r in _read(tmp_path / "r")] == ["a"]
  assert state.skipped == {"image_file_too_large": 1, "missing_image": 1}


def test_tar_members_whose_names_are_not_utf8_are_skipped(tmp_path):
  members = [("0.jpg", _jpeg(COLOURS[0])), ("0.txt", b"fine")]
  members += [("caf\xe9.jpg", _jpeg(COLOURS[1])), ("caf\xe9.txt", b"latin-1 name")]
  members += [("2.jpg", _jpeg(COLOURS[2])), ("2.txt", b"fine too")]
  with tarfile.open(tmp_path / "a.tar", "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  state = convert.convert(sources.WebDatasetSource(str(tmp_path / "a.tar")), str(tmp_path / "out"))
  assert [r["key"] for r in _read(tmp_path / "out")] == ["0", "2"]
  assert state.skipped == {"key_not_utf8": 1}


def _crash_after_shards(monkeypatch, shards: int) -> None:
  """The next conversion stops once shard `shards` is in place but before its state is saved."""
  real_save = convert._save_state

  def save_or_crash(dst, state):
    if len(state.shards) == shards:
      raise KeyboardInterrupt
    real_save(dst, state)

  monkeypatch.setattr(convert, "_save_state", save_or_crash)


def test_a_truncated_tar_is_counted_named_and_keeps_what_came_before(tmp_path, monkeypatch, caplog):
  members = []
  for i in range(6):
    members += [(f"{i}.jpg", _jpeg(COLOURS[i % 5])), (f"{i}.txt", f"caption {i}".encode())]
  _write_tar(tmp_path / "full.tar", members)
  with tarfile.open(tmp_path / "full.tar") as tar:
    offsets = [(m.offset, m.offset_data) for m in tar.getmembers()]
  data = (tmp_path / "full.tar").read_bytes()
  (tmp_path / "a.tar").write_bytes(data[: offsets[8][0] + 100])  # Inside sample 4's header.
  (tmp_path / "b.tar").write_bytes(data[: offsets[6][1] + 10])  # Inside sample 3's image.
  _write_tar(tmp_path / "c.tar", [("c.jpg", _jpeg(COLOURS[0])), ("c.txt", b"after them")])
  source = sources.WebDatasetSource(str(tmp_path / "{a,b,c}.tar"))
  with caplog.at_level(logging.WARNING):
    full = convert.convert(source, str(tmp_path / "full"), _small_options(records_per_shard=2))
  keys = [r["key"] for r in _read(tmp_path / "full")]
  assert keys == [*[str(i) for i in range(4)], *[str(i) for i in range(3)], "c"]
  assert full.skipped == {"truncated_tar": 2} and full.written == 8
  assert str(tmp_path / "a.tar") in caplog.text and str(tmp_path / "b.tar") in caplog.text

  # Stopped inside b.tar and resumed: the same shards, the same counts.
  _crash_after_shards(monkeypatch, 3)
  with pytest.raises(KeyboardInterrupt):
    convert.convert(source, str(tmp_path / "resumed"), _small_options(records_per_shard=2))
  monkeypatch.undo()
  resumed = convert.convert(source, str(tmp_path / "resumed"), _small_options(records_per_shard=2))
  assert _raw(tmp_path / "resumed") == _raw(tmp_path / "full")
  assert (resumed.written, resumed.skipped, resumed.shards) == (8, full.skipped, full.shards)


def _json_source(tmp_path, n: int) -> sources.JsonListSource:
  entries = []
  for i in range(n):
    path = tmp_path / f"{i}.png"
    if i % 5 != 3:  # Some missing files, so skipped counts must resume too.
      path.write_bytes(_encode(Image.new("RGBA", (W, H), (*COLOURS[i % 5], 200)), "PNG"))
    entries.append({"image": str(path), "caption": f"caption {i}"})
  (tmp_path / "list.json").write_text(json.dumps(entries))
  return sources.JsonListSource(str(tmp_path / "list.json"))


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, monkeypatch):
  source = _json_source(tmp_path, 23)
  full = convert.convert(source, str(tmp_path / "full"), _small_options())

  _crash_after_shards(monkeypatch, 2)  # Shard 2 is in place but the saved state does not know it.
  with pytest.raises(KeyboardInterrupt):
    convert.convert(source, str(tmp_path / "resumed"), _small_options())
  monkeypatch.undo()
  saved = json.loads((tmp_path / "resumed" / convert.STATE_FILE).read_text())
  assert len(saved["shards"]) == 1 and not saved["done"]
  assert (tmp_path / "resumed" / "data-00001.array_record").exists()  # Unrecorded: redone.

  resumed = convert.convert(source, str(tmp_path / "resumed"), _small_options(), num_workers=2)
  assert _raw(tmp_path / "resumed") == _raw(tmp_path / "full")
  assert resumed.shards == full.shards and len(full.shards) == 5
  assert (
    (resumed.written, resumed.skipped) == (full.written, full.skipped) == (19, {"missing_image": 4})
  )


def test_a_non_empty_dst_with_other_arguments_is_refused(tmp_path):
  source = _json_source(tmp_path, 6)
  convert.convert(source, str(tmp_path / "out"), _small_options())
  again = convert.convert(source, str(tmp_path / "out"), _small_options())  # Already complete.
  assert again.done and again.written == 5
  with pytest.raises(convert.ConvertError, match=r"options.records_per_shard: was 4, now 3"):
    convert.convert(source, str(tmp_path / "out"), _small_options(records_per_shard=3))
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("mine")
  with pytest.raises(convert.ConvertError, match="not empty"):
    convert.convert(source, str(tmp_path / "other"))


def test_training_names_an_unreadable_shard(tmp_path):
  records.write_shard(str(tmp_path / "a.array_record"), [records.encode_record("k", b"i", "c")])
  (tmp_path / ".b.array_record.tmp").write_bytes(b"a shard still being written")
  assert records.resolve_shards(str(tmp_path)) == [str(tmp_path / "a.array_record")]
  (tmp_path / "b.array_record").write_bytes(os.urandom(100_000))
  with pytest.raises(records.ShardError, match=r"b\.array_record"):
    records.resolve_shards(str(tmp_path))


def test_command_line(tmp_path):
  _json_source(tmp_path, 4)
  command = [
    sys.executable,
    "-m",
    "vlp_jax.input_pipeline.convert",
    "--from=json",
    f"--src={tmp_path / 'list.json'}",
    f"--dst={tmp_path / 'out'}",
    "--resize_shorter=20",
  ]
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  summary = json.loads((tmp_path / "out" / "summary.json").read_text())
  assert summary["written"] == 3 and summary["skipped"] == {"missing_image": 1}
  assert {Image.open(io.BytesIO(r["image"])).size for r in _read(tmp_path / "out")} == {(27, 20)}

  result = subprocess.run(
    [*command[:-1], "--resize_shorter=10"], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 1 and "different arguments" in result.stderr
