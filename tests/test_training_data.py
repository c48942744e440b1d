"""Training data: in-memory datasets, image folders, the scikit-learn digits, and bad data failing fast."""

import struct
import zlib

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from edm2_diffusers.data import (
    EDM2ImageDataset,
    build_image_dataset,
    check_dataset,
    image_to_array,
    load_digits_dataset,
    load_train_dataset,
    random_flip,
)

MODEL = dict(sample_size=8, in_channels=3, architecture="G")


def data_cfg(**kw):
    cfg = dict(
        source=None,
        dataset_name=None,
        dataset_config_name=None,
        dataset_split="train",
        train_data_dir=None,
        cache_dir=None,
        image_column="image",
        label_column=None,
        resolution=None,
        random_flip=False,
    )
    cfg.update(kw)
    return cfg


def write_folder(root, sizes, mode="RGB"):
    """An imagefolder with two class folders; pixel (0, 0) of image i holds the value 10·i."""
    for i, size in enumerate(sizes):
        folder = root / ("cats" if i % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        array = np.full((size[1], size[0], 3), 128, dtype=np.uint8)
        array[0, 0] = 10 * i
        Image.fromarray(array, "RGB").convert(mode).save(folder / f"img{i}.png")
    return root


def test_in_memory_dataset_to_tensors_in_range_with_labels():
    import datasets

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    ds = datasets.Dataset.from_dict({"img": [Image.fromarray(p) for p in pixels], "y": [0, 1, 2, 0, 1, 2]})
    cfg = data_cfg(image_column="img", label_column="y")
    model = dict(MODEL, num_class_embeds=3)
    loaded = load_train_dataset(cfg, dataset=ds)
    assert check_dataset(loaded, cfg, model, "memory") == 8
    tds = build_image_dataset(loaded, cfg, model, "memory", 8)
    item = tds[4]
    assert item["pixel_values"].shape == (3, 8, 8) and item["pixel_values"].dtype == torch.float32
    expected = torch.from_numpy(pixels[4].transpose(2, 0, 1).astype(np.float32) / 127.5 - 1)
    torch.testing.assert_close(item["pixel_values"], expected)
    assert item["class_labels"] == 1 and item["index"] == 4
    batch = tds.__getitems__([0, 5])
    assert [b["class_labels"] for b in batch] == [0, 2]
    torch.testing.assert_close(batch[1]["pixel_values"], tds[5]["pixel_values"])


def test_dataset_name_loads_through_load_dataset(tmp_path):
    # A local folder of parquet shards stands in for a Hub dataset: the same `load_dataset(name, config, split)`.
    import datasets

    pixels = np.arange(4 * 8 * 8 * 3, dtype=np.uint8).reshape(4, 8, 8, 3)
    ds = datasets.Dataset.from_dict({"img": [Image.fromarray(p) for p in pixels], "label": [0, 1, 2, 3]})
    (tmp_path / "hubds" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "hubds" / "data" / "train-00000-of-00001.parquet"))
    cfg = data_cfg(dataset_name=str(tmp_path / "hubds"), image_column="img", cache_dir=str(tmp_path / "cache"))
    loaded = load_train_dataset(cfg)
    assert len(loaded) == 4 and set(loaded.column_names) == {"img", "label"}
    assert check_dataset(loaded, cfg, MODEL, "hub") == 8
    tds = build_image_dataset(loaded, cfg, MODEL, "hub", 8)
    expected = torch.from_numpy(pixels[2].transpose(2, 0, 1).astype(np.float32) / 127.5 - 1)
    torch.testing.assert_close(tds[2]["pixel_values"], expected)
    assert "class_labels" not in tds[2]  # unconditional: labels are not read
    cfg["max_train_samples"] = 3
    assert len(load_train_dataset(cfg)) == 3


def test_image_folder_mixed_sizes_need_resolution(tmp_path):
    root = write_folder(tmp_path / "imgs", [(8, 8), (8, 8), (12, 10)])
    cfg = data_cfg(train_data_dir=str(root), cache_dir=str(tmp_path / "cache"))
    ds = load_train_dataset(cfg)
    assert len(ds) == 3 and "image" in ds.column_names
    with pytest.raises(ValueError, match="different sizes.*--resolution"):
        check_dataset(ds, cfg, MODEL, "imagefolder")
    cfg["resolution"] = 8
    assert check_dataset(ds, cfg, MODEL, "imagefolder") == 8
    tds = build_image_dataset(ds, cfg, MODEL, "imagefolder", 8)
    shapes = {tuple(tds[i]["pixel_values"].shape) for i in range(3)}
    assert shapes == {(3, 8, 8)}
    assert all(-1 <= tds[i]["pixel_values"].min() and tds[i]["pixel_values"].max() <= 1 for i in range(3))


def test_resize_and_centre_crop():
    array = np.zeros((10, 20), dtype=np.uint8)
    array[:, 5:15] = 255  # a white centre band, half the width
    out = image_to_array(Image.fromarray(array, "L"), resolution=4, channels=1)
    assert out.shape == (1, 4, 4)
    assert out[0, :, 1:3].min() > 0.9  # the centre crop keeps the band ...
    # ... and a grey image becomes RGB for a 3-channel model
    assert image_to_array(Image.fromarray(array, "L"), resolution=None, channels=3).shape == (3, 10, 20)


def test_center_crop_keeps_todays_middle_square_and_random_crop_is_seeded_per_epoch():
    import datasets

    wide = np.tile(np.arange(0, 240, 6, dtype=np.uint8), (10, 1))  # 10 x 40, every column its own grey
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(wide, "L")] * 3})
    resized = np.asarray(Image.fromarray(wide, "L").resize((20, 5), resample=Image.Resampling.BICUBIC))
    windows = [resized[:, left : left + 5].astype(np.float32) / 127.5 - 1 for left in range(16)]
    model = dict(MODEL, in_channels=1)

    def crops(center_crop, seed=0, epoch=0, index=0):
        tds = build_image_dataset(ds, data_cfg(center_crop=center_crop), model, "memory", 5, seed=seed)
        tds.set_epoch(epoch)
        pixels = tds[index]["pixel_values"][0].numpy()
        return [left for left, w in enumerate(windows) if np.array_equal(w, pixels)]

    # The default (and --center_crop) is the middle square, exactly as before the option existed.
    default = build_image_dataset(ds, data_cfg(), model, "memory", 5)[0]["pixel_values"][0].numpy()
    assert np.array_equal(default, windows[7]) and crops(True) == [7] and crops(True, epoch=3) == [7]
    # Without it, a random square of the resized image, drawn from (seed, epoch, index): the same again on resume.
    drawn = {(e, i): crops(False, epoch=e, index=i) for e in range(4) for i in range(3)}
    assert all(len(v) == 1 for v in drawn.values())
    assert len({v[0] for v in drawn.values()}) > 3
    assert crops(False, epoch=2, index=1) == drawn[2, 1]
    assert [crops(False, seed=5, epoch=e) for e in range(4)] != [drawn[e, 0] for e in range(4)]


def test_grayscale_folder_for_a_one_channel_model(tmp_path):
    root = write_folder(tmp_path / "g", [(8, 8)] * 2, mode="L")
    cfg = data_cfg(train_data_dir=str(root), cache_dir=str(tmp_path / "cache"))
    model = dict(MODEL, in_channels=1)
    ds = load_train_dataset(cfg)
    tds = build_image_dataset(ds, cfg, model, "imagefolder", check_dataset(ds, cfg, model, "imagefolder"))
    assert tds[0]["pixel_values"].shape == (1, 8, 8)


def test_corrupt_image_stops_with_its_name(tmp_path):
    root = write_folder(tmp_path / "c", [(8, 8)] * 3)
    (root / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    cfg = data_cfg(train_data_dir=str(root), resolution=8, cache_dir=str(tmp_path / "cache"))
    ds = load_train_dataset(cfg)
    with pytest.raises(ValueError, match="broken.png"):
        check_dataset(ds, cfg, MODEL, "imagefolder")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def corrupt_png(path, size: int = 8) -> None:
    """A PNG whose every chunk has a valid CRC, but whose IDAT holds only the first half of the zlib stream of its
    pixels: its structure and checksums check out, its pixels do not decode."""
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    pixels = np.random.default_rng(0).integers(0, 256, (size, 3 * size), dtype=np.uint8)
    rows = b"".join(b"\x00" + row.tobytes() for row in pixels)  # filter byte "none" + RGB
    stream = zlib.compress(rows)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", stream[: len(stream) // 2])
        + png_chunk(b"IEND", b"")
    )


def test_an_image_with_valid_checksums_but_undecodable_pixels_stops_naming_file_and_row(tmp_path):
    root = write_folder(tmp_path / "c", [(8, 8)] * 3)
    bad = root / "dogs" / "zz_pixels.png"
    corrupt_png(bad)
    with Image.open(bad) as img:
        img.verify()  # the structural check alone lets it through
    with Image.open(bad) as img, pytest.raises(OSError):
        img.load()
    cfg = data_cfg(train_data_dir=str(root), resolution=8, cache_dir=str(tmp_path / "cache"))
    ds = load_train_dataset(cfg)
    paths = [p["path"] for p in ds.cast_column("image", datasets.Image(decode=False))["image"]]
    row = [i for i, p in enumerate(paths) if "zz_" in p]
    with pytest.raises(ValueError, match=rf"zz_pixels\.png.*\(dataset row {row[0]}\)"):
        check_dataset(ds, cfg, MODEL, "imagefolder")


def test_missing_folder_and_missing_columns(tmp_path):
    import datasets

    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_train_dataset(data_cfg(train_data_dir=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        load_train_dataset(data_cfg(train_data_dir=str(tmp_path / "empty")))
    ds = datasets.Dataset.from_dict({"picture": [Image.new("RGB", (8, 8))] * 2, "label": [0, 1]})
    with pytest.raises(ValueError, match="no image column 'image'.*picture"):
        check_dataset(ds, data_cfg(), MODEL, "memory")
    not_images = datasets.Dataset.from_dict({"image": ["a", "b"]})
    with pytest.raises(ValueError, match="does not hold images"):
        check_dataset(not_images, data_cfg(), MODEL, "memory")
    with pytest.raises(ValueError, match="no training data"):
        load_train_dataset(data_cfg())


def test_label_column_must_match_the_model(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))] * 3, "label": [0, 1, 4]})
    with pytest.raises(ValueError, match="unconditional"):
        check_dataset(ds, data_cfg(label_column="label"), MODEL, "memory")
    with pytest.raises(ValueError, match="class-conditional.*--label_column"):
        check_dataset(ds, data_cfg(), dict(MODEL, num_class_embeds=5), "memory")
    with pytest.raises(ValueError, match=r"ids in \[0, 4\].*3 classes"):
        check_dataset(ds, data_cfg(label_column="label"), dict(MODEL, num_class_embeds=3), "memory")
    with pytest.raises(ValueError, match="no label column 'cls'"):
        check_dataset(ds, data_cfg(label_column="cls"), dict(MODEL, num_class_embeds=5), "memory")
    with pytest.raises(ValueError, match="sample_size 16"):
        check_dataset(ds, data_cfg(), dict(MODEL, sample_size=16), "memory")


def test_sklearn_digits_offline():
    ds = load_digits_dataset()
    assert len(ds) == 1797 and ds.features["label"].num_classes == 10
    cfg = data_cfg(source="sklearn_digits", label_column="label")
    model = dict(MODEL, in_channels=1, num_class_embeds=10)
    assert check_dataset(ds, cfg, model, "sklearn_digits") == 8
    tds = build_image_dataset(ds, cfg, model, "sklearn_digits", 8)
    from sklearn.datasets import load_digits

    ref = load_digits()
    x = tds[17]["pixel_values"][0].numpy()
    np.testing.assert_allclose(x, ref.images[17] / 8.0 - 1.0, atol=1.001 / 255)  # 8-bit rounding
    assert tds[17]["class_labels"] == ref.target[17]


def test_random_flip_is_seeded_and_flips_about_half():
    images = torch.arange(64 * 4, dtype=torch.float32).view(64, 1, 1, 4)
    a = random_flip(images, torch.Generator().manual_seed(3))
    b = random_flip(images, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    flipped = (a != images).any(dim=-1).flatten()
    assert 16 < int(flipped.sum()) < 48
    assert torch.equal(a[flipped], images[flipped].flip(-1))


def test_training_images_are_decoded_once_and_read_back_identically():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(5, 6, 10, 3), dtype=np.uint8)  # 6x10: resized and centre-cropped to 4
    ds = datasets.Dataset.from_dict({"img": [Image.fromarray(p) for p in pixels], "y": [0, 1, 2, 0, 1]})
    model = dict(MODEL, num_class_embeds=3)
    cfg = data_cfg(image_column="img", label_column="y")
    plain = EDM2ImageDataset(ds, "img", "y", 4, 3)  # no cache: every read decodes
    cached = build_image_dataset(ds, cfg, model, "memory", 4)
    first = cached.__getitems__([3, 1, 3, 0, 4, 2])
    cached.dataset = cached.dataset.select([])  # any further decode would now fail: reads come from the cache
    for batch in (first, cached.__getitems__([3, 1, 3, 0, 4, 2]), [cached[i] for i in (3, 1, 3, 0, 4, 2)]):
        expected = plain.__getitems__([3, 1, 3, 0, 4, 2])
        assert [b["index"] for b in batch] == [3, 1, 3, 0, 4, 2]
        assert [b["class_labels"] for b in batch] == [b["class_labels"] for b in expected]
        for got, want in zip(batch, expected):
            assert torch.equal(got["pixel_values"], want["pixel_values"])  # bit for bit
    # The cache stops at its size; random crops (new pixels every epoch) are never kept.
    small = EDM2ImageDataset(ds, "img", "y", 4, 3, cache_bytes=2 * 4 * 4 * 3)
    small.__getitems__([0, 1, 2, 3])
    assert sorted(small._cache) == [0, 1]
    random_crops = EDM2ImageDataset(ds, "img", "y", 4, 3, center_crop=False, cache_bytes=1 << 20)
    random_crops.__getitems__([0, 1])
    assert random_crops._cache == {}
