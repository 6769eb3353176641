"""Per-channel image math against known answers and a numpy oracle; raw-file defects by name."""
import numpy as np
import pytest
import tifffile

from csarm_jax.data.jump import files, preprocess


@pytest.mark.parametrize('n, factor, expected', [
    (1080, 2, np.arange(1, 1080, 2)),     # even: the odd pixels (libvips centre convention)
    (1081, 2, np.arange(0, 1081, 2)),     # odd: round(540.5) = 541 outputs, the even pixels
    (5, 2, [0, 2, 4]),
    (10, 3, [2, 5, 8]),                   # round(3.33) = 3, extra = -1
    (7, 1, np.arange(7)),
])
def test_nearest_indices_known_answers(n, factor, expected):
  np.testing.assert_array_equal(preprocess.nearest_indices(n, factor), expected)
  assert preprocess.downsampled_size(n, factor) == len(expected)


def test_downsample_takes_those_pixels_for_any_shape():
  image = np.arange(11 * 8).reshape(11, 8)
  for factor in (1, 2, 3):
    rows, cols = preprocess.nearest_indices(11, factor), preprocess.nearest_indices(8, factor)
    np.testing.assert_array_equal(preprocess.downsample(image, factor), image[rows][:, cols])
  np.testing.assert_array_equal(preprocess.downsample(image[:10], 2), image[1:10:2, 1::2])


def test_hand_computed_site():
  # The 4x4 image keeps pixels (1,1), (1,3), (3,1), (3,3) = 10, 20, 30, 40; percentile 75 over 4
  # pixels -> the brightest one is the threshold (40); uint8 = floor(x * 255 / 40).
  raw = np.zeros((4, 4), np.uint16)
  raw[1::2, 1::2] = [[10, 20], [30, 40]]
  raw[0, 0] = 60000                                   # not sampled, so it does not matter
  out = preprocess.preprocess_channel(raw, None, 2, 75.0, 'uint8')
  np.testing.assert_array_equal(out, [[63, 127], [191, 255]])
  illum = np.full((4, 4), 2.0)
  illum[3, 3] = 0.5                                   # corrected: 5, 10, 15, 80 -> threshold 80
  out = preprocess.preprocess_channel(raw, illum, 2, 75.0, 'uint16')
  np.testing.assert_array_equal(out, [[4095, 8191], [12287, 65535]])


def test_clip_threshold_is_the_nth_brightest_pixel():
  image = np.zeros((160, 160), np.uint16)              # 25600 pixels: 0.01 % -> round(2.56) = 3
  image.flat[[5, 77, 900, 4000]] = [1000, 900, 800, 700]
  assert preprocess.clip_threshold(image, 99.99) == 800
  assert preprocess.clip_threshold(image, 99.999) == 1000     # round(0.256) -> at least 1
  assert preprocess.clip_threshold(image, 99.98) == 0         # 5th brightest: only 4 are lit


def _oracle(raw, illum, percentile, dtype):
  """An independent numpy oracle: explicit odd-pixel sampling, a full sort for the threshold."""
  x = raw[1::2, 1::2].astype(np.float64)
  if illum is not None:
    x = x / illum[1::2, 1::2]
  n = max(1, int(np.around(x.size * (100 - percentile) / 100)))
  threshold = np.sort(x.ravel())[-n]
  top = {'uint8': 255, 'uint16': 65535}[dtype]
  return np.floor(np.minimum(x * (top / threshold), top)).astype(dtype)


@pytest.mark.parametrize('dtype', ['uint8', 'uint16'])
@pytest.mark.parametrize('with_illum', [False, True])
def test_full_size_channel_matches_oracle(dtype, with_illum):
  rng = np.random.default_rng(1)
  raw = rng.integers(0, 4000, (320, 320)).astype(np.uint16)
  raw.flat[rng.choice(raw.size, 40, replace=False)] = rng.integers(30000, 65535, 40)   # hot pixels
  illum = rng.uniform(0.8, 1.6, (320, 320)) if with_illum else None
  out = preprocess.preprocess_channel(raw, illum, 2, 99.99, dtype)
  expected = _oracle(raw, illum, 99.99, dtype)
  assert out.dtype == dtype and out.shape == (160, 160)
  np.testing.assert_array_equal(out, expected)
  assert (out == np.iinfo(dtype).max).sum() >= 2   # the 2 above the 3rd brightest are clipped


def test_blank_channel_and_crop():
  with pytest.raises(ValueError, match='blank'):
    preprocess.preprocess_channel(np.zeros((8, 8), np.uint16), None, 2, 99.99, 'uint8')
  image = np.arange(7 * 6).reshape(7, 6)
  np.testing.assert_array_equal(preprocess.center_crop(image, 4, 3), image[1:5, 1:4])
  with pytest.raises(ValueError, match='smaller than the crop'):
    preprocess.center_crop(image, 8, 3)


@pytest.fixture
def tiff(tmp_path):
  image = np.random.default_rng(0).integers(1, 5000, (12, 10)).astype(np.uint16)
  path = tmp_path / 'good.tiff'
  tifffile.imwrite(path, image)
  return path, image


def test_good_tiff(tiff):
  path, image = tiff
  np.testing.assert_array_equal(files.read_tiff(str(path)), image)
  assert files.tiff_shape(str(path)) == (12, 10)


@pytest.mark.parametrize('damage, kind', [
    (lambda p, data: p.unlink(), 'missing'),
    (lambda p, data: p.write_bytes(b''), 'empty'),
    (lambda p, data: p.write_bytes(bytes(len(data))), 'zero-filled'),
    (lambda p, data: tifffile.imwrite(p, np.zeros((12, 10), np.uint16)), 'zero-filled'),
    (lambda p, data: p.write_bytes(data[:len(data) - 50]), 'truncated'),
    (lambda p, data: p.write_bytes(b'not a tiff at all'), 'unreadable'),
    (lambda p, data: p.write_bytes(data[:20]), 'unreadable'),
    (lambda p, data: tifffile.imwrite(p, np.ones((4, 4, 3), np.uint8)), 'unexpected-format'),
])
def test_damaged_tiffs_are_named(tiff, damage, kind):
  path, _ = tiff
  damage(path, path.read_bytes())
  with pytest.raises(files.FileProblem) as problem:
    files.read_tiff(str(path))
  assert problem.value.kind == kind
  if kind not in ('truncated', 'zero-filled'):        # a header-only read cannot see those
    with pytest.raises(files.FileProblem):
      files.tiff_shape(str(path))


def test_no_file_listed():
  with pytest.raises(files.FileProblem, match='missing: load_data lists no file'):
    files.read_tiff('')


@pytest.mark.parametrize('illum, kind', [
    (np.full((4, 4), 1.5), None), (np.array([[1.0, 0.0]]), 'invalid'),
    (np.array([[1.0, np.nan]]), 'invalid'), (np.ones((2, 2, 2)), 'unexpected-format')])
def test_illumination_functions(tmp_path, illum, kind):
  path = str(tmp_path / 'Illum.npy')
  np.save(path, illum)
  if kind is None:
    np.testing.assert_array_equal(files.read_illum(path), illum)
  else:
    with pytest.raises(files.FileProblem) as problem:
      files.read_illum(path)
    assert problem.value.kind == kind
