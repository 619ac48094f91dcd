"""idcmap.loader on the folders a user-acceptance test found: stray PNGs and output folders in a
data set root, `.`/`..` and renamed folders, macOS `._*` files, patches in other subfolders,
16-bit PNGs, broken links, upper-case extensions, and the grid's origin."""
from __future__ import annotations

import logging
import os
import signal
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import make_patient, read_png_rgb, real_patient_folder, solid, textured, write_png
from idcmap import loader
from idcmap.errors import (DuplicatePatchError, EmptyFolderError, FolderLayoutError, PatchImageError,
                           PatientMismatchError)
from idcmap.loader import BACKGROUND, find_patient_folders, list_patch_files, load_slide, parse_patch_name

ONE = {(1, 1): (0, solid((1, 2, 3)))}

# ----------------------------------------------------------------------------------------------
# 1. what counts as a patient folder


def test_stray_png_in_data_set_root_does_not_hide_the_patients(tmp_path):
    make_patient(tmp_path, "A", ONE)
    make_patient(tmp_path, "B", ONE)
    write_png(tmp_path / "preview.png", solid((9, 9, 9)))
    write_png(tmp_path / "0" / "thumbnail.png", solid((9, 9, 9)))  # a 0/ without patches
    assert find_patient_folders(tmp_path) == [tmp_path / "A", tmp_path / "B"]
    assert list_patch_files(tmp_path)[0] == []  # the root holds no patch of its own


def test_idcmap_output_folder_is_not_a_patient(tmp_path):
    make_patient(tmp_path / "data", "A", ONE)
    out = tmp_path / "data" / "out"
    for name in ("mosaic.png", "overlay.png"):
        write_png(out / "A" / name, solid((9, 9, 9)))
    for name in ("summary.json", "probabilities.csv", "probabilities.npy", "regions.geojson"):
        (out / "A" / name).write_text("{}")
    (out / "summary.csv").write_text("patient\nA\n")
    assert find_patient_folders(tmp_path / "data") == [tmp_path / "data" / "A"]
    with pytest.raises(EmptyFolderError):
        find_patient_folders(out)
    with pytest.raises(EmptyFolderError, match="no patch PNGs"):
        load_slide(out / "A")


def test_macos_metadata_mirror_is_not_a_patient(tmp_path):
    make_patient(tmp_path, "A", ONE)
    (tmp_path / "__MACOSX" / "A" / "0").mkdir(parents=True)
    (tmp_path / "__MACOSX" / "A" / "0" / "._A_idx5_x1_y1_class0.png").write_bytes(b"\0\5\x16\7")
    assert find_patient_folders(tmp_path) == [tmp_path / "A"]


def test_upper_case_extension_makes_a_patient_folder(tmp_path):
    write_png(tmp_path / "A" / "1" / "A_idx5_x1_y1_class1.PNG", solid((4, 5, 6)))
    assert find_patient_folders(tmp_path) == [tmp_path / "A"]


def test_stray_patch_in_a_class_folder_of_a_data_set_root_does_not_hide_the_patients(tmp_path):
    make_patient(tmp_path, "A", ONE)
    make_patient(tmp_path / "g", "B", ONE)
    write_png(tmp_path / "1" / "S_idx5_x1_y1_class1.png", solid((9, 9, 9)))  # taken alone: a one-patch patient S
    with pytest.raises(FolderLayoutError, match="patient folders below") as info:
        find_patient_folders(tmp_path)
    assert "1/S_idx5_x1_y1_class1.png" in str(info.value) and str(tmp_path / "A") in str(info.value)


@pytest.mark.parametrize("below, layout", [("A", "class"), ("patients/A", "class"), ("A", "flat"), ("B", "flat")])
def test_a_patch_copied_beside_its_own_patients_folder_does_not_hide_it(tmp_path, below, layout):
    """The copy names the same patient as the folder below, which holds more of its patches (or is
    named after it): taken as one patient, the root would be a one-patch slide, the real one unread."""
    make_patient(tmp_path / Path(below).parent, Path(below).name,
                 {(1, 1): (0, solid((1, 1, 1))), (51, 1): (1, solid((2, 2, 2)))}, layout=layout)
    if Path(below).name != "A":  # patch files named A in a folder B
        for path in (tmp_path / below).iterdir():
            path.rename(path.with_name(path.name.replace("B_", "A_", 1)))
    write_png(tmp_path / "A_idx5_x1_y1_class0.png", solid((1, 1, 1)))
    with pytest.raises(FolderLayoutError, match="of the same patient: patches copied beside") as info:
        find_patient_folders(tmp_path)
    assert str(tmp_path / below) in str(info.value)


def test_a_few_of_a_patients_patches_nested_in_its_folder_are_listed_not_passed_over(tmp_path):
    """A backup/ inside a patient folder with fewer of its patches, at any depth, also below 0/:
    the patient is rendered from its own patches, and each nested one is listed as skipped."""
    folder = make_patient(tmp_path, "P", {(1, 1): (0, solid((1, 1, 1))), (51, 1): (1, solid((2, 2, 2)))})
    deep = write_png(folder / "backup" / "0" / "P_idx5_x1_y1_class0.png", solid((1, 1, 1)))
    deeper = write_png(folder / "0" / "extra" / "more" / "P_idx5_x51_y1_class0.png", solid((4, 4, 4)))
    assert find_patient_folders(tmp_path) == [folder]
    slide = load_slide(folder)
    assert len(slide) == 2
    assert sorted(reason.split(": ")[0] for reason in slide.skipped) == sorted([str(deep), str(deeper)])



def test_a_link_loop_inside_a_patient_folder_ends(tmp_path):
    """Subfolders are searched for misplaced patches at any depth, but links below the first level
    are not followed: `0/up -> ..` would otherwise nest for ever (ELOOP)."""
    folder = make_patient(tmp_path, "P", {(1, 1): (0, solid((1, 1, 1))), (51, 1): (1, solid((2, 2, 2)))})
    os.symlink("..", folder / "0" / "up")
    slide = load_slide(folder)
    assert len(slide) == 2 and len(slide.skipped) == 2  # its own two patches, seen once through the link

def test_flat_patient_folder_with_more_of_its_patches_in_a_subfolder_is_one_patient(tmp_path):
    folder = make_patient(tmp_path, "P", ONE, layout="flat")
    extra = write_png(folder / "extra" / "P_idx5_x51_y1.png", solid((4, 4, 4)))
    assert find_patient_folders(folder) == [folder]
    slide = load_slide(folder)
    assert len(slide) == 1 and slide.skipped[0].startswith(f"{extra}: patch in extra/,")


# ----------------------------------------------------------------------------------------------
# 2. the patient id


def test_dot_and_dot_dot_name_the_patient(tmp_path, monkeypatch):
    folder = make_patient(tmp_path, "8916", {(1, 1): (0, solid((1, 1, 1))), (51, 1): (1, solid((2, 2, 2)))})
    monkeypatch.chdir(folder)
    slide = load_slide(".")
    assert slide.patient == "8916" and len(slide) == 2
    monkeypatch.chdir(folder / "0")
    assert load_slide("..").patient == "8916"


def test_renamed_folder_takes_the_id_all_its_files_agree_on(tmp_path, caplog):
    folder = tmp_path / "patient_8916_copy"
    write_png(folder / "0" / "8916_idx5_x1_y1_class0.png", solid((1, 1, 1)))
    write_png(folder / "1" / "8916_idx5_x51_y1_class1.png", solid((2, 2, 2)))
    with caplog.at_level(logging.WARNING, logger="idcmap.loader"):
        slide = load_slide(folder)
    assert slide.patient == "8916" and slide.labels.tolist() == [0, 1]
    assert "'patient_8916_copy' differs from the patient id '8916'" in caplog.text


def test_class_folder_passed_alone_keeps_the_patient_and_labels(tmp_path):
    folder = make_patient(tmp_path, "8916", {(1, 1): (1, solid((1, 1, 1))), (51, 1): (1, solid((2, 2, 2)))})
    slide = load_slide(folder / "1")
    assert slide.patient == "8916" and slide.labels.tolist() == [1, 1]


def test_files_of_several_patients_none_the_folders_name(tmp_path):
    folder = tmp_path / "mixed"
    write_png(folder / "0" / "A_idx5_x1_y1_class0.png", solid((1, 1, 1)))
    b = write_png(folder / "0" / "B_idx5_x51_y1_class0.png", solid((2, 2, 2)))
    with pytest.raises(PatientMismatchError) as info:
        load_slide(folder)
    message = str(info.value)
    assert str(folder) in message and str(b) in message and "'A', 'B'" in message and "'mixed'" in message


def test_stray_file_of_another_patient_in_a_named_folder(tmp_path):
    folder = make_patient(tmp_path, "A", {(1, 1): (0, solid((1, 1, 1))), (51, 1): (0, solid((2, 2, 2)))})
    stray = write_png(folder / "0" / "B_idx5_x101_y1_class0.png", solid((3, 3, 3)))
    with pytest.raises(PatientMismatchError, match="move it to its own patient folder") as info:
        load_slide(folder)
    assert str(stray) in str(info.value)


# ----------------------------------------------------------------------------------------------
# 3. hidden files, 4. patches in other subfolders


def test_apple_double_files_are_skipped_and_listed(tmp_path):
    folder = make_patient(tmp_path, "P", {(1, 1): (0, solid((1, 1, 1))), (51, 1): (1, solid((2, 2, 2)))})
    hidden = [folder / "._P_idx5_x1_y1_class0.png", folder / "0" / "._P_idx5_x1_y1_class0.png",
              folder / "1" / ".P_idx5_x51_y1_class1.png"]
    for path in hidden:
        path.write_bytes(b"\0\5\x16\7\0\2\0\0Mac OS X")  # AppleDouble header, not a PNG
    (folder / "0" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    slide = load_slide(folder)
    assert slide.patient == "P" and len(slide) == 2
    assert [reason.split(": ")[0] for reason in slide.skipped] == [str(p) for p in hidden]
    assert all("hidden file" in reason for reason in slide.skipped)


def test_folder_of_apple_double_files_only_is_empty(tmp_path):
    (tmp_path / "P" / "0").mkdir(parents=True)
    (tmp_path / "P" / "0" / "._P_idx5_x1_y1_class0.png").write_bytes(b"\0\5\x16\7")
    with pytest.raises(EmptyFolderError, match="hidden file"):
        load_slide(tmp_path / "P")


def test_patches_in_other_subfolders_are_skipped_and_listed(tmp_path, caplog):
    folder = make_patient(tmp_path, "P", ONE)
    misplaced = [write_png(folder / "2" / "P_idx5_x51_y1_class1.png", solid((3, 3, 3))),
                 write_png(folder / "extra" / "P_idx5_x1_y51.png", solid((4, 4, 4))),
                 write_png(folder / "0" / "old" / "P_idx5_x101_y1_class0.png", solid((5, 5, 5)))]
    (folder / "extra" / "notes.txt").write_text("not a patch, in a folder idcmap does not read")
    (folder / "extra" / "._P_idx5_x1_y51.png").write_bytes(b"\0\5\x16\7")
    with caplog.at_level(logging.WARNING, logger="idcmap.loader"):
        slide = load_slide(folder)
    assert len(slide) == 1
    assert [reason.split(": ")[0] for reason in slide.skipped] == [str(p) for p in misplaced]
    for reason, where in zip(slide.skipped, ("2/", "extra/", "0/old/")):
        assert f"patch in {where}," in reason and "move it into 0/ or 1/" in reason
        assert reason in caplog.text


def test_unreadable_subfolder_is_listed_not_fatal(tmp_path, monkeypatch):
    folder = make_patient(tmp_path, "P", ONE)
    (folder / "extra").mkdir()
    scandir = os.scandir

    def failing(path):
        if Path(path) == folder / "extra":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(loader.os, "scandir", failing)
    slide = load_slide(folder)
    assert len(slide) == 1
    assert len(slide.skipped) == 1 and slide.skipped[0].startswith(f"{folder / 'extra'}: cannot list")


# ----------------------------------------------------------------------------------------------
# 5. 16-bit PNGs, 6. broken links and upper-case extensions


def _png16(path: Path, colour_type: int, channels: int) -> Path:
    """A 50x50 PNG with 16 bits per channel, written by hand (pillow cannot write 16-bit RGB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\0" + bytes(range(channels * 2)) * 50 for _ in range(50))
    header = struct.pack(">IIBBBBB", 50, 50, 16, colour_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("colour_type, channels", [(2, 3), (6, 4), (0, 1), (4, 2)], ids=["RGB", "RGBA", "grey", "LA"])
def test_16_bit_png_refused_whatever_its_colours(tmp_path, colour_type, channels):
    folder = make_patient(tmp_path, "P", ONE)
    bad = _png16(folder / "0" / "P_idx5_x51_y1_class0.png", colour_type, channels)
    with pytest.raises(PatchImageError) as info:
        load_slide(folder)
    message = str(info.value)
    assert message.startswith(f"{bad}: ") and "16-bit" in message and "save the patch as 8-bit RGB" in message



def _png_claiming(path: Path, width: int, height: int) -> Path:
    """An 8-bit RGB PNG whose (valid, checksummed) header claims width x height, with one row of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 61))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # pillow's, for 12,000^2 px
@pytest.mark.parametrize("side", [60, 12_000, 20_000])  # 20,000^2 px: pillow's decompression-bomb error
def test_a_header_claiming_a_huge_image_is_a_patch_error(tmp_path, side):
    folder = make_patient(tmp_path, "P", ONE)
    bad = _png_claiming(folder / "0" / "P_idx5_x51_y1_class0.png", side, side)
    with pytest.raises(PatchImageError) as info:
        load_slide(folder)
    assert str(info.value).startswith(f"{bad}: ")

def test_an_empty_patch_file_is_called_empty(tmp_path):
    folder = make_patient(tmp_path, "P", ONE)
    empty = folder / "0" / "P_idx5_x51_y1_class0.png"
    empty.write_bytes(b"")
    with pytest.raises(PatchImageError) as info:
        load_slide(folder)
    assert str(info.value) == f"{empty}: an empty file (0 bytes), not an image; replace or delete it"


def test_broken_symlink_is_called_a_broken_link(tmp_path):
    folder = make_patient(tmp_path, "P", ONE)
    link = folder / "0" / "P_idx5_x51_y1_class0.png"
    os.symlink(tmp_path / "gone.png", link)
    with pytest.raises(PatchImageError) as info:
        load_slide(folder)
    message = str(info.value)
    assert message.startswith(f"{link}: broken symbolic link") and str(tmp_path / "gone.png") in message
    assert "vanished" not in message


def test_working_symlink_is_read(tmp_path):
    folder = make_patient(tmp_path, "P", ONE)
    target = write_png(tmp_path / "elsewhere.png", solid((7, 8, 9)))
    os.symlink(target, folder / "0" / "P_idx5_x51_y1_class0.png")
    assert load_slide(folder).pixels[1, 0, 0].tolist() == [7, 8, 9]



@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are a POSIX matter")
def test_a_pipe_named_like_a_patch_is_skipped_not_read(tmp_path):
    """Opening a named pipe waits until something writes to it: the load would hang for ever."""
    folder = make_patient(tmp_path, "P", ONE)
    pipe = folder / "0" / "P_idx5_x51_y1_class0.png"
    os.mkfifo(pipe)
    os.symlink(pipe, folder / "0" / "P_idx5_x101_y1_class0.png")

    def hung(*args):
        raise TimeoutError("load_slide opened the pipe and waited")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        slide = load_slide(folder)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert len(slide) == 1 and len(slide.skipped) == 2
    assert all(reason.endswith("not a regular file (a pipe, socket or device), not a patch")
               for reason in slide.skipped)


def test_upper_case_extension_is_a_patch(tmp_path):
    folder = make_patient(tmp_path, "P", ONE)
    write_png(folder / "1" / "P_idx5_x51_y1_class1.PNG", solid((4, 5, 6)))
    slide = load_slide(folder)
    assert [p.name for p in slide.paths] == ["P_idx5_x1_y1_class0.png", "P_idx5_x51_y1_class1.PNG"]
    assert slide.labels.tolist() == [0, 1] and slide.skipped == []


# ----------------------------------------------------------------------------------------------
# 7. the grid's origin: the patches' own phase


def test_mosaic_starts_with_the_top_left_patch_pixel(tmp_path):
    coords = [(1001, 2051), (1051, 2051), (1101, 2101), (1001, 2151), (1151, 2151)]  # all 1 mod 50
    patches = {xy: (i % 2, textured(i)) for i, xy in enumerate(coords)}
    slide = load_slide(make_patient(tmp_path, "P", patches))
    assert slide.origin_xy == (1001, 2051)
    x0, y0 = slide.origin_xy
    mosaic = slide.mosaic()
    assert mosaic.shape == (150, 200, 3) and slide.mosaic_shape() == (150, 200)
    assert mosaic[0, 0].tolist() == patches[(1001, 2051)][1][0, 0].tolist()
    for (x, y), (_, pixels) in patches.items():
        np.testing.assert_array_equal(mosaic[y - y0 : y - y0 + 50, x - x0 : x - x0 + 50], pixels)
    # the grid note of summary.json holds exactly: cell [r, c] starts at x0 + 50c, y0 + 50r
    assert (slide.cells[:, ::-1] * 50 + [x0, y0] == slide.xy).all()
    assert slide.grid_shape == (3, 4)


def test_origin_takes_smallest_x_and_y_from_different_patches(tmp_path):
    slide = load_slide(make_patient(tmp_path, "P", {(51, 1): (0, solid((1, 1, 1))), (1, 101): (0, solid((2, 2, 2)))}))
    assert slide.origin_xy == (1, 1)
    assert slide.cells.tolist() == [[0, 1], [2, 0]]
    mosaic = slide.mosaic()
    assert mosaic.shape == (150, 100, 3)
    assert (mosaic[:50, 50:] == 1).all() and (mosaic[100:, :50] == 2).all() and (mosaic[:50, :50] == BACKGROUND).all()


def test_patch_off_the_grid_phase_rounds_down_and_stays_at_its_pixels(tmp_path, caplog):
    # x=80 is 29 px off the phase of x=1 and x=101: it starts in cell 1, and its pixels lie at x - origin_x
    slide = load_slide(make_patient(tmp_path, "P", {(1, 1): (0, solid((1, 1, 1))), (80, 1): (0, solid((2, 2, 2))),
                                                    (101, 51): (0, solid((3, 3, 3)))}))
    assert "P_idx5_x80_y1_class0.png: x/y lie off the 50 px grid of the other patches (x, y at 30, 1 mod 50, " \
           "not 1, 1; 1 such patches)" in caplog.text
    assert slide.cells.tolist() == [[0, 0], [0, 1], [1, 2]] and (slide.cells >= 0).all()
    mosaic = slide.mosaic()
    assert mosaic.shape == (100, 150, 3)
    top = mosaic[:50]
    assert (top[:, :50] == 1).all() and (top[:, 50:79] == BACKGROUND).all() and (top[:, 79:129] == 2).all()
    assert (mosaic[50:, 100:] == 3).all()


def test_a_patch_off_the_phase_at_the_smallest_x_does_not_move_the_others(tmp_path, caplog):
    on_phase = {(51, 1): (0, textured(1)), (101, 1): (1, textured(2)), (51, 51): (0, textured(3))}
    slide = load_slide(make_patient(tmp_path, "P", {**on_phase, (30, 101): (0, solid((7, 7, 7)))}))
    assert "P_idx5_x30_y101_class0.png: x/y lie off the 50 px grid" in caplog.text
    assert slide.origin_xy == (1, 1)  # the grid line before x=30, not x=30 itself
    x0, y0 = slide.origin_xy
    on = [i for i, (x, y) in enumerate(slide.xy.tolist()) if (x, y) in on_phase]
    assert (slide.cells[on, ::-1] * 50 + [x0, y0] == slide.xy[on]).all()  # their cells span their own pixels
    assert slide.cells.tolist() == [[0, 1], [0, 2], [1, 1], [2, 0]]
    mosaic = slide.mosaic()
    for (x, y), (_, pixels) in on_phase.items():
        np.testing.assert_array_equal(mosaic[y - y0 : y - y0 + 50, x - x0 : x - x0 + 50], pixels)
    assert (mosaic[100:150, 29:79] == 7).all() and (mosaic[100:150, :29] == BACKGROUND).all()


def test_patches_in_one_cell_of_the_phased_grid_are_refused(tmp_path):
    # x=1 and x=50 overlap by 49 px: one cell counted from x=1 (though two counted from x=0)
    write_png(tmp_path / "P" / "0" / "P_idx5_x1_y1_class0.png", solid((1, 1, 1)))
    write_png(tmp_path / "P" / "0" / "P_idx5_x50_y1_class0.png", solid((2, 2, 2)))
    with pytest.raises(DuplicatePatchError, match="same 50 px grid cell"):
        load_slide(tmp_path / "P")


def test_real_patient_mosaic_has_no_blank_margin():
    folder = real_patient_folder("8916")
    slide = load_slide(folder)
    x0, y0 = slide.origin_xy
    mosaic = slide.mosaic()
    assert not (mosaic[0] == BACKGROUND).all() and not (mosaic[:, 0] == BACKGROUND).all()
    assert (slide.cells[:, ::-1] * 50 + [x0, y0] == slide.xy).all()  # every real patch on the phased grid
    top_left = min(slide.paths, key=lambda p: (parse_patch_name(p.name).y, parse_patch_name(p.name).x))
    name = parse_patch_name(top_left.name)
    source = read_png_rgb(top_left)
    np.testing.assert_array_equal(mosaic[name.y - y0 : name.y - y0 + 50, name.x - x0 : name.x - x0 + 50], source)


def test_a_folder_that_cannot_be_listed_is_named_not_passed_over(tmp_path, monkeypatch, caplog):
    """Permissions that hide a patient folder (simulated: tests may run as root) give a warning
    naming it, or, when no patient is found at all, the error names it."""
    make_patient(tmp_path / "root", "A", {(1, 1): (0, solid((1, 2, 3)))})
    make_patient(tmp_path / "root", "B", {(1, 1): (0, solid((1, 2, 3)))})
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(os.fsdecode(path)).name == "B":
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level(logging.WARNING, logger="idcmap"):
        assert find_patient_folders(tmp_path / "root") == [tmp_path / "root" / "A"]
    assert f"{tmp_path / 'root' / 'B'}: cannot list this folder (Permission denied)" in caplog.text
    make_patient(tmp_path / "only", "B", {(1, 1): (0, solid((1, 2, 3)))})
    with pytest.raises(EmptyFolderError, match=r"only/B: cannot list this folder \(Permission denied\); fix its"):
        find_patient_folders(tmp_path / "only")
