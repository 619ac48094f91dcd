"""idcmap.loader: file names, decoding, placement on the slide grid, and every refusal."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import read_png_rgb, real_patient_folder, solid, textured, write_png
from idcmap import loader
from idcmap.errors import (
    DuplicatePatchError,
    EmptyFolderError,
    IdcmapError,
    MosaicTooLargeError,
    PatchImageError,
    PatchNameError,
    PatientMismatchError,
)
from idcmap.loader import BACKGROUND, PatchName, find_patient_folders, inputs_sha256, load_slide, parse_patch_name

# ----------------------------------------------------------------------------------------------
# parse_patch_name


@pytest.mark.parametrize(
    "name, expected",
    [
        ("8916_idx5_x1_y1_class0.png", PatchName("8916", 1, 1, 0)),
        ("8916_idx5_x1051_y2401_class1.png", PatchName("8916", 1051, 2401, 1)),
        ("10253_idx5_x501_y51.png", PatchName("10253", 501, 51, None)),
        ("a_b_idx5_x0_y0_class1.png", PatchName("a_b", 0, 0, 1)),
        ("8916_idx5_x1_y1_class0.PNG", PatchName("8916", 1, 1, 0)),  # the extension in any case
        ("8916_idx5_x1_y1.Png", PatchName("8916", 1, 1, None)),
    ],
)
def test_parse_patch_name_good(name, expected):
    assert parse_patch_name(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "8916_idx5_x1_y1_class2.png",  # class other than 0/1
        "8916_idx5_x1_y1_class0.jpg",
        "8916_idx5_x1_y1_class0.png\n",  # a trailing newline is no patch name
        "8916_idx5_x-1_y1_class0.png",
        "8916_idx5_xa_y1_class0.png",
        "8916_idx5_x\u0661\u0660\u0661_y1_class0.png",  # Arabic-Indic digits: only ASCII ones are coordinates
        "8916_idx4_x1_y1_class0.png",
        "8916_x1_y1_class0.png",
        "_idx5_x1_y1_class0.png",  # no patient
        "8916_idx5_x1_y1_class0.png.bak",
        "notes.png",
        "",
    ],
)
def test_parse_patch_name_bad(name):
    with pytest.raises(PatchNameError) as info:
        parse_patch_name(name)
    assert name in str(info.value)


# ----------------------------------------------------------------------------------------------
# placement of pixels

COLOURS = {
    (1, 1): (10, 20, 30),
    (51, 1): (40, 50, 60),
    (101, 1): (70, 80, 90),
    (1, 51): (100, 110, 120),
    (101, 51): (130, 140, 150),  # (51, 51) is a gap
}


def _mosaic_patient(patient_factory):
    patches = {xy: (i % 2, solid(rgb)) for i, (xy, rgb) in enumerate(COLOURS.items())}
    # an edge patch 34 wide and 50 high at the far right, and one 50 wide, 20 high at the bottom
    patches[(151, 1)] = (1, solid((200, 10, 10), height=50, width=34))
    patches[(1, 101)] = (0, solid((10, 200, 10), height=20, width=50))
    return patient_factory("P", patches), patches


def test_mosaic_places_every_pixel(patient_factory):
    folder, patches = _mosaic_patient(patient_factory)
    slide = load_slide(folder)
    assert slide.patient == "P"
    assert len(slide) == len(patches)
    assert slide.origin_xy == (1, 1)  # the smallest x and y: the grid keeps the patches' phase
    assert slide.grid_shape == (3, 4)
    # from the origin to the far patch edges: x from 1 up to 151 + 34, y from 1 up to 101 + 20
    assert slide.mosaic_shape() == (120, 184)
    mosaic = slide.mosaic()
    assert mosaic.shape == (120, 184, 3) and mosaic.dtype == np.uint8
    expected = np.full_like(mosaic, BACKGROUND)
    x0, y0 = slide.origin_xy
    for (x, y), (_, array) in patches.items():
        h, w = array.shape[:2]
        expected[y - y0 : y - y0 + h, x - x0 : x - x0 + w] = array
    np.testing.assert_array_equal(mosaic, expected)
    # spot checks written out by hand
    assert mosaic[0, 0].tolist() == [10, 20, 30]  # the first pixel of the patch at x=1, y=1
    assert mosaic[74, 74].tolist() == [255, 255, 255]  # the gap at (51, 51)
    assert mosaic[0, 183].tolist() == [200, 10, 10]  # last column of the 34 px edge patch
    assert mosaic[119, 0].tolist() == [10, 200, 10]  # last row of the 20 px edge patch
    assert mosaic[59, 183].tolist() == [255, 255, 255]  # below the edge patch: nothing


@pytest.mark.parametrize("cells, whole", [
    ([(0, 0), (0, 1), (3, 3), (0, 5)], True),  # half the patches have a neighbour: a whole slide
    ([(0, 0), (0, 1), (3, 3), (0, 5), (5, 0)], False),  # 2 of 5: scattered samples
    ([(0, 0)], False),
])
def test_a_slide_is_whole_when_at_least_half_its_patches_have_a_neighbour(patient_factory, cells, whole):
    patches = {(c * 50 + 1, r * 50 + 1): (0, solid((r, c, 0))) for r, c in cells}
    assert load_slide(patient_factory("P", patches)).is_whole is whole


def test_mosaic_relative_to_origin_when_slide_does_not_start_at_zero(patient_factory):
    patches = {(501, 1001): (0, solid((1, 2, 3))), (551, 1051): (1, solid((4, 5, 6), width=34))}
    slide = load_slide(patient_factory("P", patches))
    assert slide.origin_xy == (501, 1001)
    assert slide.cells.tolist() == [[0, 0], [1, 1]]
    mosaic = slide.mosaic()
    assert mosaic.shape == (100, 84, 3)
    assert (mosaic[:50, :50] == [1, 2, 3]).all()
    assert (mosaic[50:100, 50:84] == [4, 5, 6]).all()
    assert (mosaic[:50, 50:] == BACKGROUND).all() and (mosaic[50:, :50] == BACKGROUND).all()


def test_sizes_areas_and_padding_of_edge_patch(patient_factory):
    folder, _ = _mosaic_patient(patient_factory)
    slide = load_slide(folder)
    i = [tuple(xy) for xy in slide.xy.tolist()].index((151, 1))
    assert slide.sizes[i].tolist() == [50, 34]
    assert slide.areas[i] == 50 * 34
    assert (slide.pixels[i, :, :34] == [200, 10, 10]).all()
    assert (slide.pixels[i, :, 34:] == BACKGROUND).all()  # padded to 50x50 with background
    assert slide.pixels.shape == (len(slide), 50, 50, 3)


def test_patches_sorted_by_y_then_x(patient_factory):
    coords = [(101, 51), (1, 101), (51, 1), (1, 51), (101, 1), (1, 1)]
    patches = {xy: (0, solid((i, i, i))) for i, xy in enumerate(coords)}
    slide = load_slide(patient_factory("P", patches))
    xy = [tuple(v) for v in slide.xy.tolist()]
    assert xy == sorted(coords, key=lambda v: (v[1], v[0]))
    # pixels, labels and paths follow the same order
    for i, (x, y) in enumerate(xy):
        assert slide.pixels[i, 0, 0, 0] == coords.index((x, y))
        assert slide.paths[i].name == f"P_idx5_x{x}_y{y}_class0.png"


def test_labels_from_folders(patient_factory):
    patches = {(1, 1): (0, solid((1, 1, 1))), (51, 1): (1, solid((2, 2, 2))), (1, 51): (1, solid((3, 3, 3)))}
    slide = load_slide(patient_factory("P", patches))
    assert slide.labels.tolist() == [0, 1, 1]
    assert slide.labels.dtype == np.int8
    assert slide.has_labels


def test_flat_folder_with_class_in_names_keeps_labels(patient_factory):
    patches = {(1, 1): (1, solid((1, 1, 1))), (51, 1): (0, solid((2, 2, 2)))}
    slide = load_slide(patient_factory("P", patches, layout="flat"))
    assert slide.labels.tolist() == [1, 0]
    assert slide.has_labels


def test_labels_missing_in_flat_folder(patient_factory):
    patches = {(1, 1): (None, solid((1, 1, 1))), (51, 1): (None, solid((2, 2, 2)))}
    slide = load_slide(patient_factory("P", patches, layout="flat"))
    assert slide.labels.tolist() == [-1, -1]
    assert not slide.has_labels


def test_some_labels_missing_means_not_labelled(patient_factory, tmp_path):
    folder = patient_factory("P", {(1, 1): (0, solid((1, 1, 1)))})
    write_png(folder / "P_idx5_x51_y1.png", solid((2, 2, 2)))
    slide = load_slide(folder)
    assert slide.labels.tolist() == [0, -1]
    assert not slide.has_labels


def test_folder_gives_label_when_name_has_none(tmp_path):
    write_png(tmp_path / "P" / "1" / "P_idx5_x1_y1.png", solid((5, 5, 5)))
    slide = load_slide(tmp_path / "P")
    assert slide.labels.tolist() == [1]


# ----------------------------------------------------------------------------------------------
# the real data


@pytest.mark.parametrize("patient, patches, edge_patches", [("8916", 171, 0), ("9124", 465, 3)])
def test_real_patient_mosaic_matches_files(patient, patches, edge_patches):
    folder = real_patient_folder(patient)
    files = sorted(folder.glob("[01]/*.png"))
    slide = load_slide(folder)
    assert len(slide) == len(files) == patches
    assert slide.skipped == []
    assert slide.has_labels
    mosaic = slide.mosaic()
    x0, y0 = slide.origin_xy
    assert x0 % 50 == 1 and y0 % 50 == 1  # the data set's phase: the mosaic starts at a patch edge
    assert mosaic.shape[:2] == slide.mosaic_shape()
    rng = np.random.default_rng(0)
    chosen = [files[i] for i in rng.choice(len(files), 12, replace=False)]
    # also every edge patch (smaller than 50x50) of this patient
    edges = [f for f in files if Image.open(f).size != (50, 50)]
    assert len(edges) == edge_patches
    chosen += edges
    for path in chosen:
        name = parse_patch_name(path.name)
        source = read_png_rgb(path)
        h, w = source.shape[:2]
        np.testing.assert_array_equal(mosaic[name.y - y0 : name.y - y0 + h, name.x - x0 : name.x - x0 + w], source,
                                      err_msg=str(path))
        i = slide.paths.index(path)
        assert slide.sizes[i].tolist() == [h, w]
        assert slide.labels[i] == name.label == int(path.parent.name)
    # pixels no patch covers are background: total non-background coverage = sum of patch areas
    covered = np.zeros(mosaic.shape[:2], bool)
    for (x, y), (h, w) in zip(slide.xy.tolist(), slide.sizes.tolist()):
        covered[y - y0 : y - y0 + h, x - x0 : x - x0 + w] = True
    assert covered.sum() == slide.areas.sum()
    assert (mosaic[~covered] == BACKGROUND).all()


# ----------------------------------------------------------------------------------------------
# odd files


def test_unparseable_names_are_reported_not_loaded(patient_factory):
    folder = patient_factory("P", {(1, 1): (0, solid((1, 1, 1)))})
    write_png(folder / "0" / "P_idx5_x51_y1_class0.png.png", solid((9, 9, 9)))
    write_png(folder / "0" / "thumbnail.png", solid((9, 9, 9)))
    (folder / "0" / "notes.txt").write_text("hello")
    (folder / ".DS_Store").write_text("")
    slide = load_slide(folder)
    assert len(slide) == 1
    assert [p.name for p in slide.paths] == ["P_idx5_x1_y1_class0.png"]
    assert len(slide.skipped) == 3
    joined = "\n".join(slide.skipped)
    for name in ("P_idx5_x51_y1_class0.png.png", "thumbnail.png", "notes.txt"):
        assert str(folder / "0" / name) in joined
    assert ".DS_Store" not in joined


def test_patient_mismatch_names_file(patient_factory):
    folder = patient_factory("P", {(1, 1): (0, solid((1, 1, 1)))})
    stray = write_png(folder / "0" / "Q_idx5_x51_y1_class0.png", solid((2, 2, 2)))
    with pytest.raises(PatientMismatchError) as info:
        load_slide(folder)
    assert str(stray) in str(info.value)


def test_class_disagreeing_with_folder_names_file(patient_factory):
    folder = patient_factory("P", {(1, 1): (0, solid((1, 1, 1)))})
    wrong = write_png(folder / "0" / "P_idx5_x51_y1_class1.png", solid((2, 2, 2)))
    with pytest.raises(PatientMismatchError) as info:
        load_slide(folder)
    assert str(wrong) in str(info.value)


def _bad_file(kind: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "truncated":
        write_png(path, textured(1))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 3)
    elif kind == "jpeg":
        write_png(path, textured(2), format="JPEG")
    elif kind == "16-bit":
        write_png(path, (np.arange(2500).reshape(50, 50) * 25).astype(np.uint16))
        assert Image.open(path).mode.startswith("I;16")
    elif kind == "too-big":
        write_png(path, textured(3, height=50, width=51))
    elif kind == "too-tall":
        write_png(path, textured(4, height=60, width=50))
    else:
        raise ValueError(kind)


@pytest.mark.parametrize("kind", ["truncated", "zero-byte", "garbage", "jpeg", "16-bit", "too-big", "too-tall"])
def test_bad_patch_image_names_file(patient_factory, kind):
    folder = patient_factory("P", {(1, 1): (0, solid((1, 1, 1)))})
    bad = folder / "1" / "P_idx5_x51_y1_class1.png"
    _bad_file(kind, bad)
    with pytest.raises(PatchImageError) as info:
        load_slide(folder)
    assert str(bad) in str(info.value)


def test_rgba_composited_on_white(tmp_path):
    rgba = np.zeros((50, 50, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[:, :10, 3] = 0  # transparent -> white
    rgba[:, 10:20, 3] = 255  # opaque -> the colour
    rgba[:, 20:, 3] = 128  # half -> blend with white
    write_png(tmp_path / "P" / "0" / "P_idx5_x1_y1_class0.png", rgba, mode="RGBA")
    slide = load_slide(tmp_path / "P")
    pixels = slide.pixels[0].astype(int)
    assert (pixels[:, :10] == 255).all()
    assert (pixels[:, 10:20] == [10, 20, 30]).all()
    expected = np.array([10, 20, 30]) * 128 / 255 + 255 * (127 / 255)
    assert np.abs(pixels[:, 20:] - expected).max() <= 1


def test_greyscale_converted_to_rgb(tmp_path):
    grey = np.arange(2500, dtype=np.int64).reshape(50, 50) % 256
    write_png(tmp_path / "P" / "0" / "P_idx5_x1_y1_class0.png", grey.astype(np.uint8), mode="L")
    slide = load_slide(tmp_path / "P")
    assert slide.pixels.shape == (1, 50, 50, 3)
    for channel in range(3):
        np.testing.assert_array_equal(slide.pixels[0, :, :, channel], grey)


def test_palette_converted_to_rgb(tmp_path):
    image = Image.new("P", (50, 50))
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    index = np.zeros((50, 50), np.uint8)
    index[:, 25:] = 1
    image.putdata(index.flatten().tolist())
    path = tmp_path / "P" / "0" / "P_idx5_x1_y1_class0.png"
    path.parent.mkdir(parents=True)
    image.save(path)
    assert Image.open(path).mode == "P"
    slide = load_slide(tmp_path / "P")
    assert (slide.pixels[0, :, :25] == [10, 20, 30]).all()
    assert (slide.pixels[0, :, 25:] == [200, 100, 50]).all()


def test_palette_with_transparency_composited_on_white(tmp_path):
    image = Image.new("P", (50, 50))
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    index = np.zeros((50, 50), np.uint8)
    index[:, 25:] = 1
    image.putdata(index.flatten().tolist())
    path = tmp_path / "P" / "0" / "P_idx5_x1_y1_class0.png"
    path.parent.mkdir(parents=True)
    image.save(path, transparency=0)
    slide = load_slide(tmp_path / "P")
    assert (slide.pixels[0, :, :25] == 255).all()
    assert (slide.pixels[0, :, 25:] == [200, 100, 50]).all()



@pytest.mark.parametrize("mode, key, colour", [("RGB", (1, 2, 3), (1, 2, 3)), ("L", 7, (7, 7, 7))])
def test_colour_keyed_transparency_composited_on_white(tmp_path, mode, key, colour):
    array = np.full((50, 50, 3), 120, np.uint8)
    array[:, :10] = colour  # the PNG's tRNS key: these pixels are transparent
    image = Image.fromarray(array if mode == "RGB" else array[:, :, 0], mode)
    path = tmp_path / "P" / "0" / "P_idx5_x1_y1_class0.png"
    path.parent.mkdir(parents=True)
    image.save(path, transparency=key)
    slide = load_slide(tmp_path / "P")
    assert (slide.pixels[0, :, :10] == 255).all()
    assert (slide.pixels[0, :, 10:] == 120).all()

# ----------------------------------------------------------------------------------------------
# duplicates


def test_identical_duplicate_kept_once(tmp_path):
    pixels = textured(7)
    write_png(tmp_path / "P" / "0" / "P_idx5_x1_y1_class0.png", pixels)
    write_png(tmp_path / "P" / "P_idx5_x1_y1.png", pixels)
    write_png(tmp_path / "P" / "0" / "P_idx5_x51_y1_class0.png", solid((3, 3, 3)))
    slide = load_slide(tmp_path / "P")
    assert len(slide) == 2
    assert [tuple(v) for v in slide.xy.tolist()] == [(1, 1), (51, 1)]
    np.testing.assert_array_equal(slide.pixels[0], pixels)
    assert slide.labels.tolist() == [0, 0]  # the labelled copy's label survives
    assert len(slide.paths) == len(set(slide.paths)) == 2


def test_different_duplicate_raises(tmp_path):
    write_png(tmp_path / "P" / "0" / "P_idx5_x1_y1_class0.png", solid((1, 1, 1)))
    second = write_png(tmp_path / "P" / "P_idx5_x1_y1.png", solid((1, 1, 2)))
    with pytest.raises(DuplicatePatchError) as info:
        load_slide(tmp_path / "P")
    message = str(info.value)
    assert "x=1 y=1" in message
    assert "P_idx5_x1_y1_class0.png" in message and "P_idx5_x1_y1.png" in message
    assert str(second) in message or str(tmp_path / "P" / "0" / "P_idx5_x1_y1_class0.png") in message


def test_identical_duplicate_with_conflicting_labels_raises(tmp_path):
    pixels = textured(8)
    write_png(tmp_path / "P" / "0" / "P_idx5_x1_y1_class0.png", pixels)
    write_png(tmp_path / "P" / "1" / "P_idx5_x1_y1_class1.png", pixels)
    with pytest.raises((DuplicatePatchError, PatientMismatchError)):
        load_slide(tmp_path / "P")


def test_two_patches_in_one_grid_cell_rejected(tmp_path):
    write_png(tmp_path / "P" / "0" / "P_idx5_x1_y1_class0.png", solid((1, 1, 1)))
    write_png(tmp_path / "P" / "0" / "P_idx5_x26_y1_class0.png", solid((2, 2, 2)))
    with pytest.raises(IdcmapError):
        slide = load_slide(tmp_path / "P")
        # if it loads, each patch must at least have its own grid cell
        assert len({tuple(c) for c in slide.cells.tolist()}) == len(slide)


# ----------------------------------------------------------------------------------------------
# sizes of the mosaic


def test_absurd_coordinates_refused_before_decoding(tmp_path, monkeypatch):
    write_png(tmp_path / "P" / "0" / "P_idx5_x1_y1_class0.png", solid((1, 1, 1)))
    write_png(tmp_path / "P" / "0" / f"P_idx5_x{10**9}_y1_class0.png", solid((1, 1, 1)))

    def no_decoding(*args, **kwargs):
        raise AssertionError("patches were decoded before the size check")

    monkeypatch.setattr(loader, "decode_patches", no_decoding)
    with pytest.raises(MosaicTooLargeError) as info:
        load_slide(tmp_path / "P")
    assert str(tmp_path / "P") in str(info.value)


def test_custom_mosaic_limit(patient_factory):
    # patches at x = 1, 101 and y = 1: the mosaic is 150 x 50 = 7,500 pixels
    folder = patient_factory("P", {(1, 1): (0, solid((1, 1, 1))), (101, 1): (0, solid((2, 2, 2)))})
    slide = load_slide(folder, max_mosaic_pixels=150 * 50)
    assert slide.mosaic_shape() == (50, 150)
    with pytest.raises(MosaicTooLargeError):
        load_slide(folder, max_mosaic_pixels=150 * 50 - 1)


# ----------------------------------------------------------------------------------------------
# folders


def test_empty_folder(tmp_path):
    (tmp_path / "P").mkdir()
    with pytest.raises(EmptyFolderError):
        load_slide(tmp_path / "P")


def test_folder_without_patch_names(tmp_path):
    write_png(tmp_path / "P" / "picture.png", solid((1, 1, 1)))
    with pytest.raises(EmptyFolderError):
        load_slide(tmp_path / "P")


def test_missing_folder(tmp_path):
    with pytest.raises(EmptyFolderError):
        load_slide(tmp_path / "nope")


def test_find_patient_folders_nested(tmp_path):
    from conftest import make_patient

    make_patient(tmp_path / "patients", "A", {(1, 1): (0, solid((1, 1, 1)))})
    make_patient(tmp_path / "patients", "B", {(1, 1): (1, solid((1, 1, 1)))})
    make_patient(tmp_path / "sparse" / "deeper", "C", {(1, 1): (None, solid((1, 1, 1)))}, layout="flat")
    (tmp_path / "empty" / "nothing").mkdir(parents=True)
    found = find_patient_folders(tmp_path)
    assert found == [tmp_path / "patients" / "A", tmp_path / "patients" / "B", tmp_path / "sparse" / "deeper" / "C"]
    # a patient folder given directly is found as itself
    assert find_patient_folders(tmp_path / "patients" / "A") == [tmp_path / "patients" / "A"]



def test_find_patient_folders_skips_hidden_folders_below_the_root(tmp_path):
    from conftest import make_patient

    make_patient(tmp_path / "root", "A", {(1, 1): (0, solid((1, 1, 1)))})
    make_patient(tmp_path / "root" / ".snapshot", "B", {(1, 1): (0, solid((1, 1, 1)))})
    assert find_patient_folders(tmp_path / "root") == [tmp_path / "root" / "A"]  # export finds no hidden folder
    hidden = tmp_path / "root" / ".snapshot" / "B"
    assert find_patient_folders(hidden) == [hidden]  # given itself, it is the patient

def test_find_patient_folders_survives_symlink_loop(tmp_path):
    from conftest import make_patient

    make_patient(tmp_path / "root" / "group", "A", {(1, 1): (0, solid((1, 1, 1)))})
    os.symlink(tmp_path / "root", tmp_path / "root" / "group" / "loop")
    os.symlink(tmp_path / "root" / "group", tmp_path / "root" / "group" / "self")
    found = find_patient_folders(tmp_path / "root")
    assert found == [tmp_path / "root" / "group" / "A"]


def test_find_patient_folders_none(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "readme.txt").write_text("no patients here")
    with pytest.raises(EmptyFolderError):
        find_patient_folders(tmp_path)
    with pytest.raises(EmptyFolderError):
        find_patient_folders(tmp_path / "missing")


@pytest.mark.parametrize("layout", ["class", "flat"])
def test_inputs_fingerprint_is_of_the_files_read(patient_factory, layout):
    folder = patient_factory("P", {(0, 0): (0, solid((10, 20, 30))), (50, 0): (1, solid((200, 10, 10))),
                                   (0, 50): (1, solid((90, 90, 90)))}, layout)
    slide = load_slide(folder)
    assert len(slide.inputs_sha256) == 64
    assert slide.inputs_sha256 == inputs_sha256(folder)  # what `render --resume` compares it with
    patch = sorted(folder.rglob("*.png"))[-1]
    os.utime(patch, ns=(patch.stat().st_atime_ns, patch.stat().st_mtime_ns + 10**9))
    assert inputs_sha256(folder) != slide.inputs_sha256
    assert load_slide(folder).inputs_sha256 == inputs_sha256(folder)


def test_inputs_fingerprint_with_skipped_files_is_the_same_however_the_folder_is_named(patient_factory, monkeypatch):
    folder = patient_factory("P", {(0, 0): (0, solid((10, 20, 30)))})
    (folder / "notes.txt").write_text("a skipped file")
    absolute = inputs_sha256(folder.resolve())
    monkeypatch.chdir(folder.parent)
    assert inputs_sha256(Path("P")) == absolute == load_slide(Path("P")).inputs_sha256
