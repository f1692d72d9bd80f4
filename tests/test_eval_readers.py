"""Every reader parses a small fixture in its official format and rejects a malformed one
with an error naming the file and the line or key."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from vlp_jax.evaluation import DataError, readers
from vlp_jax.evaluation import compositional_readers as creaders
from vlp_jax.input_pipeline import classification_readers as cls_readers


def write_image(path, colour=(200, 30, 30), size=(40, 30)) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", size, colour).save(path)
  return path


def image_bytes(colour, fmt="PNG") -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", (16, 16), colour).save(buffer, format=fmt)
  return buffer.getvalue()


def write_json(path, data) -> str:
  with open(path, "w") as f:
    json.dump(data, f)
  return str(path)


def test_specs_parse_paths_and_options_and_reject_unknown_options():
  specs = readers.parse_specs("/a.json,images=/img;/b,split=val", "--data.x", ("images", "split"))
  assert [(s.path, s.options) for s in specs] == [
    ("/a.json", {"images": "/img"}),
    ("/b", {"split": "val"}),
  ]
  with pytest.raises(ValueError, match=r"--data\.x.*'imgs=/i'"):
    readers.parse_specs("/a.json,imgs=/i", "--data.x", ("images",))


def test_karpathy_json_takes_one_split(tmp_path):
  data = {
    "dataset": "coco",
    "images": [
      {
        "filepath": "val2014",
        "filename": "a.jpg",
        "split": "test",
        "sentences": [{"raw": "A cat."}, {"raw": "A pet."}],
      },
      {
        "filepath": "val2014",
        "filename": "b.jpg",
        "split": "train",
        "sentences": [{"raw": "A dog."}],
      },
      {
        "filepath": "val2014",
        "filename": "c.jpg",
        "split": "test",
        "sentences": [{"raw": "A car."}],
      },
    ],
  }
  path = write_json(tmp_path / "dataset_coco.json", data)
  got = readers.read_caption_json(path, "/coco")
  assert got.name == "mscoco_captions"
  assert got.captions == [["A cat.", "A pet."], ["A car."]]
  assert [i.path for i in got.images] == ["/coco/val2014/a.jpg", "/coco/val2014/c.jpg"]
  data["images"][2]["sentences"] = [{"raw": "ok"}, {"tokens": ["no", "raw"]}]
  write_json(path, data)
  with pytest.raises(
    DataError, match=r"dataset_coco\.json: images\[2\]\.sentences\[1\]: missing key 'raw'"
  ):
    readers.read_caption_json(path, "/coco")


def test_coco_caption_json_orders_images_by_id(tmp_path):
  data = {
    "images": [{"id": 9, "file_name": "z.jpg"}, {"id": 2, "file_name": "y.jpg"}],
    "annotations": [
      {"image_id": 9, "caption": "last"},
      {"image_id": 2, "caption": "first"},
      {"image_id": 9, "caption": "last too"},
    ],
  }
  path = write_json(tmp_path / "coco_test_karpathy.json", data)
  got = readers.read_caption_json(path, str(tmp_path / "val2014"))
  assert got.captions == [["first"], ["last", "last too"]]
  assert got.images[0].path.endswith("val2014/y.jpg")
  data["annotations"].append({"image_id": 5, "caption": "orphan"})
  write_json(path, data)
  with pytest.raises(DataError, match=r"coco_test_karpathy\.json: annotations\[3\]: image_id 5"):
    readers.read_caption_json(path, "")


def test_blip_list_and_flickr_txt(tmp_path):
  path = write_json(
    tmp_path / "flickr30k_test.json",
    [{"image": "x/1.jpg", "caption": ["a", "b"]}, {"image": "x/2.jpg", "caption": "c"}],
  )
  got = readers.read_caption_json(path, "/f")
  assert got.captions == [["a", "b"], ["c"]] and got.images[1].path == "/f/x/2.jpg"
  write_json(path, [{"image": "x/1.jpg", "caption": "a"}, {"caption": "no image"}])
  with pytest.raises(DataError, match=r"flickr30k_test\.json: \[1\]: missing key 'image'"):
    readers.read_caption_json(path, "/f")

  txt = tmp_path / "flickr30k_test_karpathy.txt"
  txt.write_text("image,caption\n1.jpg,A dog, running.\n1.jpg,A dog.\n2.jpg,Two cats.\n")
  got = readers.read_flickr_txt(str(txt), "/imgs")
  assert got.captions == [["A dog, running.", "A dog."], ["Two cats."]]
  assert [i.path for i in got.images] == ["/imgs/1.jpg", "/imgs/2.jpg"]
  txt.write_text("image,caption\n1.jpg,A dog.\n2.png,Two cats.\n")
  with pytest.raises(DataError, match=r"flickr30k_test_karpathy\.txt:3:"):
    readers.read_flickr_txt(str(txt), "/imgs")


def write_wds(root, samples, split="test", classnames=None, templates=None):
  """CLIP_benchmark's webdataset layout: <split>/nshards.txt, <split>/0.tar, metadata."""
  os.makedirs(os.path.join(root, split), exist_ok=True)
  with tarfile.open(os.path.join(root, split, "0.tar"), "w") as tar:
    for key, members in samples:
      for ext, data in members.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  with open(os.path.join(root, split, "nshards.txt"), "w") as f:
    f.write("1\n")
  for name, lines in (
    ("classnames.txt", classnames),
    ("zeroshot_classification_templates.txt", templates),
  ):
    if lines:
      with open(os.path.join(root, name), "w") as f:
        f.write("\n".join(lines) + "\n")
  return str(root)


def test_webdataset_retrieval_and_classification(tmp_path):
  root = write_wds(
    tmp_path / "wds_mscoco_captions",
    [
      ("s0", {"jpg": image_bytes((255, 0, 0), "JPEG"), "txt": b"red one\nstill red"}),
      ("s1", {"webp": image_bytes((0, 0, 255), "WEBP"), "txt": b"blue"}),
    ],
  )
  got = readers.read_retrieval(readers.DatasetSpec(root, {}, root), max_captions=5)
  assert got.name == "wds_mscoco_captions" and got.captions == [["red one", "still red"], ["blue"]]
  pixels = np.asarray(got.images[1].open())
  assert pixels.shape == (16, 16, 3) and pixels[..., 2].mean() > 200

  root = write_wds(
    tmp_path / "wds_cifar",
    [
      ("a", {"png": image_bytes((0, 255, 0)), "cls": b"1"}),
      ("b", {"png": image_bytes((9, 9, 9)), "cls": b"0"}),
    ],
    classnames=["cat", "dog"],
    templates=["a photo of a {c}."],
  )
  got = cls_readers.read_classification(readers.DatasetSpec(root, {}, root), "test")
  assert got.labels.tolist() == [1, 0] and got.classnames == ["cat", "dog"]
  assert got.templates == ["a photo of a {c}."]
  write_wds(tmp_path / "bad", [("a", {"png": image_bytes((0, 0, 0)), "cls": b"one"})])
  with pytest.raises(DataError, match=r"bad/test/0\.tar: sample 'a': \.cls is not an integer"):
    cls_readers.read_classification(readers.DatasetSpec(str(tmp_path / "bad"), {}, ""), "test")


def test_class_folders_sorted_and_empty_class_rejected(tmp_path):
  write_image(str(tmp_path / "test" / "zebra" / "1.png"))
  write_image(str(tmp_path / "test" / "ant" / "b.jpg"))
  write_image(str(tmp_path / "test" / "ant" / "a.png"))
  spec = readers.DatasetSpec(str(tmp_path), {}, "")
  got = cls_readers.read_classification(spec, "test")
  assert got.classnames == ["ant", "zebra"] and got.labels.tolist() == [0, 0, 1]
  assert [os.path.basename(i.path) for i in got.images] == ["a.png", "b.jpg", "1.png"]
  os.makedirs(tmp_path / "test" / "empty")
  with pytest.raises(DataError, match=r"test/empty: class folder without images"):
    cls_readers.read_classification(spec, "test")


def test_templates_need_a_placeholder(tmp_path):
  path = tmp_path / "templates.txt"
  path.write_text("a photo of a {c}.\nno placeholder here\n")
  with pytest.raises(DataError, match=r"templates\.txt:2:"):
    cls_readers.read_templates(str(path))


def test_tfds_image_classification_from_a_local_data_dir(tmp_path):
  import tensorflow_datasets as tfds

  class VlpTinyShapes(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    # A builder defined in a test has no source file; without this, tfds 4.9.10 looks
    # for one through importlib_resources, which it does not declare as a dependency.
    code_path = None

    def _info(self):
      return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(shape=(16, 16, 3)),
            "label": tfds.features.ClassLabel(names=["red", "green", "blue"]),
          }
        )
      )

    def _split_generators(self, dl_manager):
      return {"test": self._generate_examples()}

    def _generate_examples(self):
      for i, label in enumerate([2, 0, 1, 2]):
        colour = np.zeros((16, 16, 3), np.uint8)
        colour[..., label] = 255
        yield i, {"image": colour, "label": label}

  VlpTinyShapes(data_dir=str(tmp_path)).download_and_prepare()
  spec = readers.DatasetSpec("tfds:vlp_tiny_shapes", {"data_dir": str(tmp_path)}, "")
  got = cls_readers.read_classification(spec, "test")
  assert got.name == "tfds/vlp_tiny_shapes" and got.classnames == ["red", "green", "blue"]
  assert sorted(got.labels.tolist()) == [0, 1, 2, 2]
  for image, label in zip(got.images, got.labels):
    assert np.asarray(image.open())[..., label].mean() > 250
  with pytest.raises(DataError, match=r"tfds:vlp_tiny_shapes: no split 'validation'"):
    cls_readers.read_classification(spec, "validation")


def test_sugarcrepe_files_and_a_missing_key(tmp_path):
  images = tmp_path / "val2017"
  write_image(str(images / "000000000139.jpg"))
  write_image(str(images / "000000000285.jpg"))
  entry = {
    "filename": "000000000139.jpg",
    "caption": "A red cube.",
    "negative_caption": "A blue cube.",
  }
  write_json(
    tmp_path / "swap_att.json", {"0": entry, "3": {**entry, "filename": "000000000285.jpg"}}
  )
  write_json(
    tmp_path / "add_obj.json", {"0": {**entry, "negative_caption": "A red cube and a dog."}}
  )
  got = creaders.read_sugarcrepe(str(tmp_path), str(images))
  assert got.groups["subset"].tolist() == ["add_obj", "swap_att", "swap_att"]
  assert got.item_images.tolist() == [[0], [0], [1]] and len(got.images) == 2
  assert [got.texts[i] for i in got.item_texts[1]] == ["A red cube.", "A blue cube."]
  write_json(tmp_path / "add_obj.json", {"7": {"filename": "x.jpg", "caption": "c"}})
  with pytest.raises(DataError, match=r"add_obj\.json: key '7': missing key 'negative_caption'"):
    creaders.read_sugarcrepe(str(tmp_path), str(images))


def test_aro_visual_genome_and_order_files(tmp_path):
  write_image(str(tmp_path / "images" / "2.jpg"), size=(100, 80))
  relation = [
    {
      "image_id": "2",
      "bbox_x": 10,
      "bbox_y": 5,
      "bbox_w": 50,
      "bbox_h": 40,
      "true_caption": "the cup is on the table",
      "false_caption": "the table is on the cup",
      "relation_name": "on",
      "image_path": "2.jpg",
    }
  ]
  attribution = [
    {
      "image_id": "2",
      "bbox_x": 0,
      "bbox_y": 0,
      "bbox_w": 20,
      "bbox_h": 20,
      "true_caption": "the red cup and the white table",
      "false_caption": "the white cup and the red table",
      "attributes": ["red", "white"],
      "image_path": "2.jpg",
    }
  ]
  write_json(tmp_path / "visual_genome_relation.json", relation)
  write_json(tmp_path / "visual_genome_attribution.json", attribution)
  order = [
    {"image": "val2014/x.jpg", "caption_options": ["a b c", "b a c", "c b a", "a c b", "b c a"]}
  ]
  write_json(tmp_path / "coco_order.json", order)
  got = creaders.read_aro(
    str(tmp_path), {"coco_order": str(tmp_path / "coco_order.json"), "coco_images": "/coco"}
  )
  assert sorted(got) == ["coco_order", "vg_attribution", "vg_relation"]
  vgr = got["vg_relation"]
  assert [vgr.texts[i] for i in vgr.item_texts[0]] == [
    "the table is on the cup",
    "the cup is on the table",
  ]
  assert vgr.groups["group"].tolist() == ["on"]
  assert vgr.images[0].open().size == (50, 40)  # cropped to the relation's box
  assert got["vg_attribution"].groups["group"].tolist() == ["red_white"]
  assert got["coco_order"].images[0].path == "/coco/val2014/x.jpg"
  del relation[0]["bbox_w"]
  write_json(tmp_path / "visual_genome_relation.json", relation)
  with pytest.raises(DataError, match=r"visual_genome_relation\.json: \[0\]: missing key 'bbox_w'"):
    creaders.read_aro(str(tmp_path), {})


def test_winoground_jsonl_and_a_bad_line(tmp_path):
  for name in ("ex_0_img_0", "ex_0_img_1"):
    write_image(str(tmp_path / "images" / f"{name}.png"))
  line = {
    "id": 0,
    "caption_0": "an old person kisses a young person",
    "caption_1": "a young person kisses an old person",
    "tag": "Object",
    "secondary_tag": "",
    "num_main_preds": 1,
    "collapsed_tag": "Object",
    "image_0": "ex_0_img_0",
    "image_1": "ex_0_img_1",
  }
  path = tmp_path / "examples.jsonl"
  path.write_text(json.dumps(line) + "\n")
  got = creaders.read_winoground(str(tmp_path), "")
  assert got.item_images.tolist() == [[0, 1]] and got.item_texts.tolist() == [[0, 1]]
  assert got.groups["tag"].tolist() == ["Object"]
  path.write_text(json.dumps(line) + "\n" + json.dumps({**line, "caption_1": None}) + "\n")
  with pytest.raises(DataError, match=r"examples\.jsonl:2: key 'caption_1'"):
    creaders.read_winoground(str(tmp_path), "")


def test_crepe_csvs_productivity_and_systematicity_columns(tmp_path):
  write_image(str(tmp_path / "VG_100K_2" / "107.jpg"), size=(60, 60))
  prod = tmp_path / "prod" / "swap"
  os.makedirs(prod)
  (prod / "prod_vg_hard_negs_swap_complexity_4.csv").write_text(
    "image_id,x,y,width,height,caption,hard_negs\n"
    "107,0,0,30,20,a dog on grass,\"['a grass on dog', 'grass dog on a']\"\n"
  )
  (tmp_path / "syst.csv").write_text(
    "image_id,x,y,width,height,caption,valid_hard_negs_atom,valid_hard_negs_comp\n"
    "107,5,5,10,10,a red car,\"['a blue car']\",\"['a red bike', 'a car']\"\n"
  )
  folders = [str(tmp_path / "VG_100K"), str(tmp_path / "VG_100K_2")]
  got = creaders.read_crepe(str(tmp_path), folders)
  assert got.groups["subset"].tolist() == [
    "prod/swap/prod_vg_hard_negs_swap_complexity_4",
    "syst/atom",
    "syst/comp",
  ]
  assert [got.texts[i] for i in got.item_texts[0]] == [
    "a dog on grass",
    "a grass on dog",
    "grass dog on a",
  ]
  assert got.item_texts[1].tolist()[2] == -1  # one negative: padded
  assert got.images[0].open().size == (30, 20)
  (tmp_path / "syst.csv").write_text(
    "image_id,x,y,width,height,caption,valid_hard_negs_atom\n"
    '107,5,5,10,10,a red car,"[\'unclosed"\n'
  )
  with pytest.raises(DataError, match=r"syst\.csv:2: column 'valid_hard_negs_atom'"):
    creaders.read_crepe(str(tmp_path), folders)


def test_svo_rows_with_missing_images_are_dropped_and_bad_flags_rejected(tmp_path):
  for image_id in (11, 12, 13):
    write_image(str(tmp_path / "images" / f"{image_id}.jpg"))
  header = (
    "sentence,pos_triplet,neg_triplet,subj_neg,verb_neg,obj_neg,pos_url,neg_url,"
    "pos_image_id,neg_image_id\n"
  )
  rows = [
    "A man  rides a horse.,man/ride/horse,woman/ride/horse,True,False,False,u1,u2,11,12",
    "A man rides a horse.,man/ride/horse,man/feed/horse,False,True,False,u1,u3,11,13",
    "A dog eats.,dog/eat/food,dog/eat/toy,False,False,True,u4,u5,14,13",  # image 14 missing
    "A cat sits.,cat/sit/mat,dog/lie/mat,True,True,False,u6,u7,11,12",  # two kinds: excluded
  ]
  path = tmp_path / "svo_probes.csv"
  path.write_text(header + "\n".join(rows) + "\n")
  got, dropped = creaders.read_svo(str(path), "")
  assert dropped == 1 and got.groups["kind"].tolist() == ["subj", "verb"]
  # The same positive pair in both rows (case and spaces normalised as the notebook does).
  assert got.groups["pos_pair"][0] == got.groups["pos_pair"][1]
  assert got.item_images.shape == (2, 2) and got.item_texts.shape == (2, 1)
  path.write_text(header + rows[0].replace("True", "yes", 1) + "\n")
  with pytest.raises(DataError, match=r"svo_probes\.csv:2: column 'subj_neg'"):
    creaders.read_svo(str(path), "")
