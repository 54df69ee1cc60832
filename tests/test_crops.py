"""Random resized crops cut from the whole original image: the box distribution is torchvision's, the
crops that image folders and shards deliver are the boxes they claim (read back from images whose
pixels encode their coordinates), seeded per (seed, epoch, index, view), and the GPU decode path cuts
the same crops as the CPU workers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from lightning_gen import registry
from lightning_gen.config import compose, section_object
from lightning_gen.data import crops, decode
from lightning_gen.data.crops import CropSpec, ItemMaker
from lightning_gen.data.shard_writer import write_shards
from lightning_gen.data.views import Views, ViewsConfig
from tests import datasets

GLOBAL = CropSpec(32, (0.08, 1.0), (3 / 4, 4 / 3))
LOCAL = CropSpec(16, (0.05, 0.4), (3 / 4, 4 / 3))
SPECS = [GLOBAL, GLOBAL, LOCAL]


def torchvision_boxes(height, width, scale, ratio, n, seed=0):
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(seed)
    image = torch.empty(1, height, width)
    return [RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(n)]


@pytest.mark.parametrize("height,width", [(375, 500), (500, 333), (64, 64)])
def test_boxes_follow_scale_and_ratio_of_the_whole_image_like_torchvision(height, width):
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    ours = [
        crops.random_resized_crop_box(height, width, scale, ratio, crops.crop_generator(0, 0, i, 0))
        for i in range(3000)
    ]
    for top, left, h, w in ours:
        assert top >= 0 and top + h <= height and left >= 0 and left + w <= width
    area = np.array([h * w / (height * width) for _, _, h, w in ours])
    log_ratio = np.array([math.log(w / h) for _, _, h, w in ours])
    # integer rounding of the sides moves area and ratio slightly past the continuous ranges
    assert area.min() >= 0.08 * 0.9 and area.max() <= 1.0
    assert log_ratio.min() >= math.log(3 / 4) - 0.05 and log_ratio.max() <= math.log(4 / 3) + 0.05
    reference = torchvision_boxes(height, width, scale, ratio, 3000)
    ref_area = np.array([h * w / (height * width) for _, _, h, w in reference])
    ref_log_ratio = np.array([math.log(w / h) for _, _, h, w in reference])
    assert stats.ks_2samp(area, ref_area).pvalue > 1e-3
    assert stats.ks_2samp(log_ratio, ref_log_ratio).pvalue > 1e-3
    # along the long side, crops reach past the centre square (there, centres would stay in [0.23, 0.77])
    if height != width:
        centres = np.array(
            [(left + w / 2) / width if width > height else (top + h / 2) / height for top, left, h, w in ours]
        )
        assert centres.min() < 0.2 and centres.max() > 0.8


def test_box_fallback_is_torchvisions_centre_crop():
    # no box of >= 90 % of a 50x1000 strip has an aspect ratio <= 4/3: all 10 tries fail
    ours = crops.random_resized_crop_box(
        50, 1000, (0.9, 1.0), (3 / 4, 4 / 3), crops.crop_generator(0, 0, 0, 0)
    )
    assert tuple(ours) == tuple(torchvision_boxes(50, 1000, (0.9, 1.0), (3 / 4, 4 / 3), 1)[0])
    tall = crops.random_resized_crop_box(
        1000, 50, (0.9, 1.0), (3 / 4, 4 / 3), crops.crop_generator(0, 0, 0, 0)
    )
    assert tuple(tall) == tuple(torchvision_boxes(1000, 50, (0.9, 1.0), (3 / 4, 4 / 3), 1)[0])


def test_boxes_are_a_function_of_seed_epoch_index_and_view():
    def box(seed, epoch, index, view):
        return crops.view_boxes(300, 400, [GLOBAL] * 2, seed, epoch, index)[view]

    assert box(0, 0, 5, 0) == box(0, 0, 5, 0)
    others = {box(1, 0, 5, 0), box(0, 1, 5, 0), box(0, 0, 6, 0), box(0, 0, 5, 1)}
    assert box(0, 0, 5, 0) not in others and len(others) == 4


def read_back_box(view: torch.Tensor) -> tuple[float, float, float, float]:
    """(top, left, height, width) in original pixels of a resized crop of a coordinate image.

    Bilinear resizing keeps a linear ramp linear: column j of an S-wide output shows original column
    left - 0.5 + (j + 0.5) * width / S (away from the borders, where the antialiasing filter is cut).
    """
    size = view.shape[-1]
    j = np.arange(1, size - 1)

    def fit(profile):
        slope, intercept = np.polyfit(j, profile[1 : size - 1], 1)
        return intercept + 0.5 - 0.5 * slope, slope * size

    left, width = fit(view[0].double().mean(0).numpy())
    top, height = fit(view[1].double().mean(1).numpy())
    return top, left, height, width


def datamodule(*overrides):
    cfg = compose(list(overrides))
    return registry.build("data", section_object(cfg.data))


@pytest.fixture(scope="module")
def coordinate_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("coords")
    sizes = datasets.write_coordinate_folder(root / "tree")
    write_shards(root / "tree", root / "shards", workers=1, chunk_bytes="64KB")
    return root, sizes


def training_views(dm, seed=7, specs=SPECS) -> dict[int, list[torch.Tensor]]:
    """index -> the views one epoch delivers (epoch 0), through the DataModule's real training loader."""
    dm.seed, dm.train_crops = seed, specs
    dm.setup()
    loader = dm.train_dataloader()
    out = {}
    for batch in loader:
        for k, i in enumerate(batch["index"].tolist()):
            out[i] = [v[k] for v in batch["views"]]
    return out


def test_folder_and_shard_crops_are_the_claimed_whole_image_boxes(coordinate_data):
    root, sizes = coordinate_data
    common = ["data.image_size=32", "data.batch_size=2", "data.num_workers=2"]
    folder = training_views(
        datamodule("data=folder", f"data.root={root / 'tree'}", "data.in_memory=false", *common)
    )
    shards = training_views(datamodule("data=shards", f"data.root={root / 'shards'}", *common))
    assert sorted(folder) == sorted(shards) == list(range(len(sizes)))
    outside_centre_square = 0
    for index, (height, width) in enumerate(sizes):
        expected = crops.view_boxes(height, width, SPECS, 7, 0, index)
        for view, (spec, box) in enumerate(zip(SPECS, expected)):
            # the same image bytes, seeds and decoder: the two paths deliver the same pixels
            assert torch.equal(folder[index][view], shards[index][view])
            top, left, h, w = read_back_box(folder[index][view])
            assert abs(top - box.top) < 1.0 and abs(left - box.left) < 1.0, (index, view, box)
            assert (
                abs(h - box.height) < 1.0 + 0.02 * box.height and abs(w - box.width) < 1.0 + 0.02 * box.width
            )
            area = h * w / (height * width)  # relative to the whole original image
            assert spec.scale[0] * 0.85 <= area <= spec.scale[1] * 1.05
            assert spec.ratio[0] * 0.9 <= w / h <= spec.ratio[1] * 1.1
            short = min(height, width)
            centre = ((height - short) / 2, (width - short) / 2)
            if (
                top < centre[0] - 2
                or left < centre[1] - 2
                or top + h > centre[0] + short + 2
                or left + w > centre[1] + short + 2
            ):
                outside_centre_square += 1
    assert outside_centre_square > 0  # crops reach past the centre square that the old pipeline kept


def test_crops_do_not_depend_on_the_number_of_workers(coordinate_data):
    root, _ = coordinate_data
    common = [f"data.root={root / 'tree'}", "data.in_memory=false", "data.image_size=32", "data.batch_size=2"]
    two = training_views(datamodule("data=folder", *common, "data.num_workers=2"))
    none = training_views(datamodule("data=folder", *common, "data.num_workers=0"))
    assert all(torch.equal(a, b) for i in two for a, b in zip(two[i], none[i]))
    other_seed = training_views(datamodule("data=folder", *common, "data.num_workers=0"), seed=8)
    assert not all(torch.equal(a, b) for i in two for a, b in zip(two[i], other_seed[i]))


def test_folder_crops_follow_the_epoch_into_persistent_workers(coordinate_data):
    root, sizes = coordinate_data
    dm = datamodule(
        "data=folder",
        f"data.root={root / 'tree'}",
        "data.in_memory=false",
        "data.image_size=32",
        "data.batch_size=2",
        "data.num_workers=2",
    )
    dm.seed, dm.train_crops = 7, SPECS
    dm.setup()
    loader = dm.train_dataloader()
    assert loader.persistent_workers
    for epoch in (0, 1, 2):
        loader.sampler.set_epoch(epoch)  # what Lightning does at every epoch start
        for batch in loader:
            for k, index in enumerate(batch["index"].tolist()):
                box = crops.view_boxes(*sizes[index], SPECS, 7, epoch, index)[0]
                top, left, _, _ = read_back_box(batch["views"][0][k])
                assert abs(top - box.top) < 1.0 and abs(left - box.left) < 1.0, (epoch, index)


def test_evaluation_view_is_resize_then_centre_crop(coordinate_data):
    from PIL import Image
    from torchvision.transforms import functional as TF

    from lightning_gen.data.folder import list_image_folder

    root, _ = coordinate_data
    files, _ = list_image_folder(root / "tree" / "val", ["a", "b"])
    maker = ItemMaker("image", 64, resize_scale=1.143)
    for path in files:
        ours = maker(path.read_bytes(), 0, 0, 0)["image"].double()
        with Image.open(path) as img:
            reference = TF.pil_to_tensor(TF.center_crop(TF.resize(img.convert("RGB"), 73), [64, 64])).double()
        assert ours.shape == reference.shape == (3, 64, 64)
        assert (ours - reference).abs().mean() < 1.0  # same box; resampling kernels differ by rounding


def test_device_decode_cuts_the_same_crops_as_cpu_workers(coordinate_data):
    root, _ = coordinate_data
    from lightning_gen.data.folder import list_image_folder

    files, labels = list_image_folder(root / "tree" / "train", ["a", "b"])
    cpu = ItemMaker("views", 32, specs=SPECS, seed=3)
    device = ItemMaker("encoded", 32, specs=SPECS, seed=3)
    jpeg = decode_jpeg_bytes(files[0])  # the device path decodes JPEGs itself, the rest arrive decoded
    items = [device(f.read_bytes(), y, i, 1) for i, (f, y) in enumerate(zip(files, labels))]
    items.append(device(jpeg, 0, 99, 1))
    batch = crops.collate(items)
    assert batch["encoded"][-1].ndim == 1 and batch["encoded"][0].ndim == 3  # JPEG bytes vs PNG pixels
    views = crops.device_views(batch["encoded"], batch["boxes"], SPECS, torch.device("cpu"))
    expected = [cpu(f.read_bytes(), y, i, 1)["views"] for i, (f, y) in enumerate(zip(files, labels))]
    expected.append(cpu(jpeg, 0, 99, 1)["views"])
    for v in range(len(SPECS)):
        assert torch.equal(views[v], torch.stack([e[v] for e in expected]))


def decode_jpeg_bytes(path) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    with Image.open(path) as img:
        img.convert("RGB").save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: nvjpeg decoding runs only there")
def test_gpu_decode_matches_cpu_decode(coordinate_data):
    root, _ = coordinate_data
    from lightning_gen.data.folder import list_image_folder

    files, _ = list_image_folder(root / "tree" / "train", ["a", "b"])
    jpegs = [decode.as_byte_tensor(decode_jpeg_bytes(f)) for f in files]
    on_gpu = decode.decode_on_device(jpegs, torch.device("cuda"))
    for gpu, data in zip(on_gpu, jpegs):
        assert gpu.is_cuda and gpu.dtype == torch.uint8
        assert (gpu.cpu().double() - decode.decode(data).double()).abs().mean() < 2.0  # IDCTs differ slightly
    maker = ItemMaker("encoded", 32, specs=SPECS, seed=0)
    batch = crops.collate([maker(bytes(j.numpy()), 0, i, 0) for i, j in enumerate(jpegs)])
    views = crops.device_views(batch["encoded"], batch["boxes"], SPECS, torch.device("cuda"))
    reference = crops.device_views(batch["encoded"], batch["boxes"], SPECS, torch.device("cpu"))
    for gpu, cpu in zip(views, reference):
        assert gpu.is_cuda and (gpu.cpu().double() - cpu.double()).abs().mean() < 2.0


def test_views_take_one_precut_batch_per_view_and_check_their_sizes():
    cfg = ViewsConfig(recipe="dino")
    views = Views(cfg, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 32)
    specs = views.crop_specs()
    assert [s.size for s in specs] == [32, 32] + [16] * 6
    assert specs[0].scale == (0.4, 1.0) and specs[2].scale == (0.05, 0.4)
    precut = [torch.randint(0, 256, (4, 3, s.size, s.size), dtype=torch.uint8) for s in specs]
    out = views(precut)
    assert [tuple(o.shape) for o in out] == [(4, 3, s.size, s.size) for s in specs]
    with pytest.raises(ValueError, match="one batch per view"):
        views(precut[:-1])
    # with no colour change and flip p = 1 a pre-cut view is only mirrored and standardised
    plain = Views(ViewsConfig(recipe="none"), (0.0,) * 3, (1.0,) * 3, 32)
    plain.global_crops.flip_p = 1.0
    batch = [torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8) for _ in range(2)]
    assert torch.allclose(plain(batch)[0], batch[0].flip(-1).float() / 255)
