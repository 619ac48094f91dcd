"""Property-based tests (hypothesis) of the loader and the `render` command.

1. Any valid patch set (distinct cells of the data set's 50 px grid, any origin, edge patches of
   any size, any labels and pixels) reassembles pixel-exactly into the mosaic built here
   independently from the arrays written.
2. No file name next to a valid patch, however odd, makes idcmap crash: the file is skipped and
   listed, used as a patch (if its name is a patch name of this patient), or an IdcmapError names
   the problem; the CLI exits 0, 1 or 2 without a traceback.
"""
from __future__ import annotations

import json

import io
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import run_main, textured, write_png
from idcmap.errors import IdcmapError
from idcmap.loader import load_slide

PATIENT = "P"
VALID_XY = (1, 1)  # the one valid patch of the odd-name tests: cell (0, 0)
SMALL_MOSAIC = 200_000  # --max-mosaic-pixels for the CLI examples, so that no example renders a huge slide
INT64_SAFE = 10**18  # coordinates used by the properties; beyond 10**12 see the tests at the end


# ----------------------------------------------------------------------------------------------
# helpers




def save_patch(path: Path, rgb: np.ndarray, mode: str) -> None:
    """Write an RGB array as a PNG in `mode` (L only for grey arrays; RGBA fully opaque)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        Image.fromarray(np.ascontiguousarray(rgb[:, :, 0]), "L").save(path, format="PNG")
    elif mode == "RGBA":
        alpha = np.full(rgb.shape[:2] + (1,), 255, np.uint8)
        Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA").save(path, format="PNG")
    else:
        Image.fromarray(rgb).save(path, format="PNG")


def pixels(kind: str, seed: int, height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    if kind == "solid":
        return np.broadcast_to(rng.integers(0, 256, size=3, dtype=np.uint8), (height, width, 3)).copy()
    if kind == "white":
        return np.full((height, width, 3), 255, np.uint8)
    grey = rng.integers(0, 256, size=(height, width, 1), dtype=np.uint8)  # "grey": R = G = B
    return np.repeat(grey, 3, axis=2)


# ----------------------------------------------------------------------------------------------
# 1. valid patch sets reassemble exactly


@st.composite
def patch_sets(draw):
    """(patient, layout, [(x, y, label, rgb, mode)]) on distinct cells of a small block of the grid."""
    rows, cols = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    cells = sorted(draw(st.sets(st.tuples(st.integers(0, rows - 1), st.integers(0, cols - 1)),
                                min_size=1, max_size=12)))
    origin_r, origin_c = draw(st.integers(0, 80)), draw(st.integers(0, 80))
    # the data set's patches start 1 px into their cell; any other in-cell offset, shared by the slide, too
    off_x = draw(st.one_of(st.just(1), st.integers(0, 49)))
    off_y = draw(st.one_of(st.just(1), st.integers(0, 49)))
    layout = draw(st.sampled_from(["class", "flat"]))
    # patients named "0"/"1" are left to test_flat_patient_folder_named_like_a_class_folder (a known bug)
    patient = draw(st.from_regex(r"[0-9A-Za-z][0-9A-Za-z_-]{0,7}", fullmatch=True)
                   .filter(lambda name: name not in ("0", "1")))
    last_r, last_c = max(r for r, _ in cells), max(c for _, c in cells)
    patches = []
    for r, c in cells:
        height = draw(st.integers(1, 50)) if r == last_r else 50  # bottom edge: cut tissue
        width = draw(st.integers(1, 50)) if c == last_c else 50  # right edge
        label = draw(st.sampled_from([0, 1] if layout == "class" else [0, 1, None]))
        kind = draw(st.sampled_from(["noise", "solid", "white", "grey"]))
        mode = draw(st.sampled_from(["L", "RGB", "RGBA"] if kind == "grey" else ["RGB", "RGBA"]))
        rgb = pixels(kind, draw(st.integers(0, 2**32 - 1)), height, width)
        patches.append((50 * (origin_c + c) + off_x, 50 * (origin_r + r) + off_y, label, rgb, mode))
    return patient, layout, patches


def reference_mosaic(patches) -> tuple[np.ndarray, tuple[int, int]]:
    """The mosaic built from the written arrays: white, from the top-left occupied grid cell."""
    x0 = min(x for x, *_ in patches)
    y0 = min(y for _, y, *_ in patches)
    height = max(y + rgb.shape[0] for _, y, _, rgb, _ in patches) - y0
    width = max(x + rgb.shape[1] for x, _, _, rgb, _ in patches) - x0
    image = np.full((height, width, 3), 255, np.uint8)
    for x, y, _, rgb, _ in patches:
        image[y - y0 : y - y0 + rgb.shape[0], x - x0 : x - x0 + rgb.shape[1]] = rgb
    return image, (x0, y0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patch_sets())
def test_any_valid_patch_set_reassembles_exactly(case):
    patient, layout, patches = case
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / patient
        for x, y, label, rgb, mode in patches:
            name = f"{patient}_idx5_x{x}_y{y}" + ("" if label is None else f"_class{label}") + ".png"
            save_patch(folder / (str(label) if layout == "class" else "") / name, rgb, mode)
        slide = load_slide(folder)

        expected, (x0, y0) = reference_mosaic(patches)
        order = sorted(patches, key=lambda p: (p[1], p[0]))
        assert slide.patient == patient
        assert slide.skipped == []
        assert len(slide) == len(patches)
        mosaic = slide.mosaic()
        assert mosaic.dtype == np.uint8 and mosaic.shape == expected.shape
        np.testing.assert_array_equal(mosaic, expected)
        assert slide.mosaic_shape() == expected.shape[:2]
        assert slide.origin_xy == (x0, y0)
        assert slide.xy.tolist() == [[x, y] for x, y, *_ in order]
        assert slide.labels.tolist() == [-1 if label is None else label for _, _, label, _, _ in order]
        assert slide.has_labels == all(label is not None for _, _, label, _, _ in patches)
        assert slide.sizes.tolist() == [list(rgb.shape[:2]) for _, _, _, rgb, _ in order]
        assert slide.areas.tolist() == [rgb.shape[0] * rgb.shape[1] for _, _, _, rgb, _ in order]
        assert [p.name for p in slide.paths] == [
            f"{patient}_idx5_x{x}_y{y}" + ("" if label is None else f"_class{label}") + ".png"
            for x, y, label, _, _ in order]
        # each padded patch: its pixels, then white
        for padded, (_, _, _, rgb, _) in zip(slide.pixels, order):
            h, w = rgb.shape[:2]
            np.testing.assert_array_equal(padded[:h, :w], rgb)
            assert (padded[h:] == 255).all() and (padded[:, w:] == 255).all()
        # grid geometry: cells relative to the origin cell, values scattered onto them
        cells = np.array([[(y - y0) // 50, (x - x0) // 50] for x, y, *_ in order])
        np.testing.assert_array_equal(slide.cells, cells)
        assert slide.grid_shape == (int(cells[:, 0].max()) + 1, int(cells[:, 1].max()) + 1)
        grid = slide.grid_values(np.arange(len(slide), dtype=float))
        assert np.isnan(grid).sum() == grid.size - len(slide)
        np.testing.assert_array_equal(grid[cells[:, 0], cells[:, 1]], np.arange(len(slide)))


# ----------------------------------------------------------------------------------------------
# 2. odd file names never crash


_NAME_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00")


def _number():
    return st.one_of(
        st.integers(0, 200).map(str),
        st.integers(-100, -1).map(str),  # negative
        st.integers(0, INT64_SAFE).map(str),  # large, but within int64
        st.integers(0, 60).map(lambda n: f"00{n}"),  # leading zeros
        st.sampled_from(["", "+5", " 5", "5.0", "1e3", "x", "٣", "５", "²"]),  # signs, floats, unicode digits
    )


@st.composite
def near_miss_names(draw):
    """Names close to `<patient>_idx5_x<X>_y<Y>_class<C>.png`: one or more parts off."""
    prefix = draw(st.sampled_from([PATIENT, PATIENT, "Q", "", PATIENT + "x", "." + PATIENT, "._" + PATIENT,
                                   PATIENT.lower(), PATIENT + "_idx5_x1_y1"]))
    idx = draw(st.sampled_from(["_idx5", "_idx5", "_idx4", "_IDX5", "idx5", "", "_idx5_"]))
    x = draw(st.sampled_from(["_x", "_x", "_X", "x", "_x_"])) + draw(_number())
    y = draw(st.sampled_from(["_y", "_y", "_Y", "y"])) + draw(_number())
    klass = draw(st.sampled_from(["", "_class0", "_class1", "_class2", "_class", "_class01", "_Class1",
                                  "_class-1", "_class0_class1"]))
    ext = draw(st.sampled_from([".png", ".png", ".PNG", "", ".png.tmp", ".jpg", ".png ", ".pn", ".png\n",
                                ".Png"]))
    return prefix + idx + x + y + klass + ext


def _random_names():
    return st.text(_NAME_CHARS, min_size=1, max_size=40).flatmap(
        lambda text: st.sampled_from([text, text + ".png", text + ".PNG"]))


file_names = st.one_of(near_miss_names(), _random_names()).filter(
    lambda name: name not in (".", "..") and len(name.encode("utf-8", "surrogateescape")) <= 255)


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


VALID_PIXELS = textured(7)
VALID_BYTES = _png_bytes(VALID_PIXELS)

odd_contents = st.one_of(
    st.just(("copy", VALID_BYTES)),  # an exact copy of the valid patch
    st.tuples(st.just("png"), st.tuples(st.integers(1, 60), st.integers(1, 60), st.integers(0, 2**16)).map(
        lambda hws: _png_bytes(textured(hws[2], height=hws[0], width=hws[1])))),  # any size, >50 too
    st.tuples(st.just("bytes"), st.binary(max_size=64)),  # empty or garbage
    st.just(("jpeg", None)),
)


def _content(kind_bytes) -> bytes:
    kind, data = kind_bytes
    if kind == "jpeg":
        buffer = io.BytesIO()
        Image.fromarray(textured(3)).save(buffer, format="JPEG")
        return buffer.getvalue()
    return data


def _write_case(root: Path, name: str, where: str, content: bytes) -> tuple[Path, Path]:
    """Patient folder with the valid patch in 0/ and the odd file in `where` ('' = the folder itself)."""
    folder = root / PATIENT
    valid = folder / "0" / f"{PATIENT}_idx5_x{VALID_XY[0]}_y{VALID_XY[1]}_class0.png"
    valid.parent.mkdir(parents=True)
    valid.write_bytes(VALID_BYTES)
    odd = folder / where / name if where else folder / name
    odd.parent.mkdir(parents=True, exist_ok=True)
    odd.write_bytes(content)
    return folder, odd


def _usable(where: str, name: str) -> bool:
    if where == "" and name in ("0", "1"):
        return False  # would be the class folder itself
    return not (where == "0" and name == f"{PATIENT}_idx5_x{VALID_XY[0]}_y{VALID_XY[1]}_class0.png")


OWN_PATCH_NAME = re.compile(rf"{re.escape(PATIENT)}_idx5_x\d+_y\d+(_class[01])?\.(?i:png)")


def check_load(folder: Path, odd: Path, content: bytes, max_pixels: int | None = None) -> bool:
    """Load the folder; check the odd file was skipped (and listed), used, or refused with an
    IdcmapError. Any other exception propagates (= the bug). Returns whether it loaded."""
    valid = folder / "0" / f"{PATIENT}_idx5_x{VALID_XY[0]}_y{VALID_XY[1]}_class0.png"
    try:
        slide = load_slide(folder) if max_pixels is None else load_slide(folder, max_mosaic_pixels=max_pixels)
    except IdcmapError as err:
        assert str(err).strip(), "an IdcmapError without a message"
        return False
    listed = [reason for reason in slide.skipped if reason.startswith(f"{odd}: ")]
    used = odd in slide.paths
    assert len(listed) <= 1, slide.skipped
    assert not (used and listed), (slide.paths, slide.skipped)
    assert set(slide.paths) <= {valid, odd}
    if used:
        assert OWN_PATCH_NAME.fullmatch(odd.name), f"{odd.name!r} used as a patch"
    elif not listed:
        hidden_non_png = odd.name.startswith(".") and not odd.name.lower().endswith(".png")
        duplicate = content == VALID_BYTES and slide.paths == [valid]  # exact copy of the patch, kept once
        assert hidden_non_png or duplicate, f"{odd.name!r} neither used nor listed in skipped: {slide.skipped}"
    if odd.name.lower().endswith(".png") and not OWN_PATCH_NAME.fullmatch(odd.name):
        assert listed, f"{odd.name!r}: not a patch name, yet not listed in skipped"
    assert valid in slide.paths or (used and content == VALID_BYTES)
    return True


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=file_names, where=st.sampled_from(["", "0", "1"]), content=odd_contents)
@example(name=f"{PATIENT}_idx5_x-51_y1_class0.png", where="0", content=("png", VALID_BYTES))
@example(name=f"{PATIENT}_idx5_x51_y1_class2.png", where="0", content=("png", VALID_BYTES))
@example(name=f"{PATIENT}_idx5_x51_y1_class0", where="0", content=("png", VALID_BYTES))
@example(name="Q_idx5_x51_y1_class0.png", where="0", content=("png", VALID_BYTES))
@example(name=f"{PATIENT}_idx5_x51_y1_class1.png", where="0", content=("png", VALID_BYTES))
@example(name=f"{PATIENT}_idx5_x1_y1_class0.png", where="", content=("copy", VALID_BYTES))
@example(name=f"{PATIENT}_idx5_x2_y1_class0.png", where="0", content=("copy", VALID_BYTES))
@example(name=f"{PATIENT}_idx5_x51_y1_class0.png", where="1", content=("copy", VALID_BYTES))
@example(name=f"{PATIENT}_idx5_x{10**12}_y1_class0.png", where="0", content=("copy", VALID_BYTES))
@example(name=f"{PATIENT}_idx5_x51_y1_class0.png", where="0", content=("bytes", b""))
@example(name=f"{PATIENT}_idx5_x51_y1_class0.png", where="0", content=("jpeg", None))
@example(name="._" + f"{PATIENT}_idx5_x51_y1_class0.png", where="0", content=("bytes", b"\0\5\0"))
@example(name=".DS_Store", where="", content=("bytes", b"\0\0\0\1Bud1"))
@example(name="Thumbs.db", where="1", content=("bytes", b""))
def test_odd_file_names_never_crash_the_loader(name, where, content):
    assume(_usable(where, name))
    with tempfile.TemporaryDirectory() as tmp:
        folder, odd = _write_case(Path(tmp), name, where, _content(content))
        check_load(folder, odd, _content(content))


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(name=file_names, where=st.sampled_from(["", "0", "1"]), content=odd_contents)
@example(name=f"{PATIENT}_idx5_x51_y1_class0.png", where="0", content=("png", VALID_BYTES))  # renders: 0
@example(name=f"{PATIENT}_idx5_x51_y1_class0.png", where="1", content=("png", VALID_BYTES))  # mismatch: 1
def test_odd_file_names_never_crash_the_cli(tiny_weights, name, where, content):
    assume(_usable(where, name))
    data = _content(content)
    with tempfile.TemporaryDirectory() as tmp:
        folder, odd = _write_case(Path(tmp), name, where, data)
        loads = check_load(folder, odd, data, max_pixels=SMALL_MOSAIC)
        code, out, err = run_main(["-q", "render", str(folder), "-o", str(Path(tmp) / "out"), "--weights",
                                   str(tiny_weights), "--device", "cpu", "--max-mosaic-pixels",
                                   str(SMALL_MOSAIC)])
        assert "Traceback" not in out + err
        assert code in (0, 1, 2), (code, err)
        # a patient that loads renders (0); one the loader refuses is a failed patient (1)
        assert code == (0 if loads else 1), (code, err)
        if code == 0:
            assert (Path(tmp) / "out" / PATIENT / "summary.json").is_file()
        else:
            assert "idcmap: failed: P:" in err


@pytest.mark.parametrize("patient", ["0", "1"])
def test_flat_patient_folder_named_like_a_class_folder(tmp_path, patient):
    folder = tmp_path / patient
    write_png(folder / f"{patient}_idx5_x1_y1.png", textured(1))  # unlabelled
    write_png(folder / f"{patient}_idx5_x51_y1_class0.png", textured(2))
    write_png(folder / f"{patient}_idx5_x101_y1_class1.png", textured(3))
    slide = load_slide(folder)
    assert slide.labels.tolist() == [-1, 0, 1]


# ----------------------------------------------------------------------------------------------
# coordinates beyond any slide (kept out of the properties above, which draw them below 10**18)


HUGE = [pytest.param(10**20, id="x-beyond-int64"), pytest.param(2**63 - 10, id="x-just-below-int64-max")]


@pytest.mark.parametrize("x", HUGE)
@pytest.mark.parametrize("axis", ["x", "y"])
def test_huge_coordinate_is_reported_and_skipped(tmp_path, x, axis):
    name = f"{PATIENT}_idx5_x{x}_y1_class0.png" if axis == "x" else f"{PATIENT}_idx5_x1_y{x}_class0.png"
    folder, odd = _write_case(tmp_path, name, "0", VALID_BYTES)
    slide = load_slide(folder)
    assert len(slide) == 1 and slide.mosaic().shape == (50, 50, 3)  # origin at the patch's own x, y
    assert len(slide.skipped) == 1 and str(odd) in slide.skipped[0] and "larger than any slide" in slide.skipped[0]


@pytest.mark.parametrize("x", HUGE)
def test_huge_coordinate_alone_is_an_idcmap_error(tmp_path, x):
    folder = tmp_path / PATIENT
    (folder / "0").mkdir(parents=True)
    (folder / "0" / f"{PATIENT}_idx5_x{x}_y1_class0.png").write_bytes(VALID_BYTES)
    with pytest.raises(IdcmapError, match="larger than any slide"):
        load_slide(folder)


@pytest.mark.parametrize("x", HUGE)
def test_huge_coordinate_cli_exits_without_traceback(tmp_path, tiny_weights, x):
    folder, odd = _write_case(tmp_path, f"{PATIENT}_idx5_x{x}_y1_class0.png", "0", VALID_BYTES)
    code, out, err = run_main(["-q", "render", str(folder), "-o", str(tmp_path / "out"), "--weights",
                               str(tiny_weights), "--device", "cpu"])
    assert code == 0 and "Traceback" not in err
    summary = json.loads((tmp_path / "out" / PATIENT / "summary.json").read_text())
    assert summary["patches"] == 1 and summary["skipped_files"] == 1 and str(odd) in summary["skipped"][0]
