"""Reading raw JUMP files with every defect named: ``FileProblem(kind, detail)`` instead of a crash.

Kinds: ``missing`` (no file, or load_data lists none), ``empty`` (0 bytes), ``zero-filled`` (all
bytes zero, or a valid image whose pixels are all zero), ``truncated`` (pixel data runs past the end
of the file), ``unreadable`` (anything the TIFF/npy reader rejects), ``unexpected-format`` (not one
2-D grey image), ``invalid`` (an illumination function with non-finite or non-positive values).
"""
from __future__ import annotations

import os

import numpy as np
import tifffile


class FileProblem(Exception):
  def __init__(self, kind: str, detail: str):
    super().__init__(f'{kind}: {detail}')
    self.kind, self.detail = kind, detail


def _check_size(path: str) -> int:
  if not path:
    raise FileProblem('missing', 'load_data lists no file')
  try:
    size = os.path.getsize(path)
  except OSError:
    raise FileProblem('missing', 'no such file') from None
  if size == 0:
    raise FileProblem('empty', '0 bytes')
  return size


def _all_zero_bytes(path: str) -> bool:
  with open(path, 'rb') as f:
    while chunk := f.read(1 << 20):
      if chunk.count(0) != len(chunk):
        return False
  return True


def _open_tiff(path: str) -> tuple[tifffile.TiffFile, int]:
  size = _check_size(path)
  try:
    return tifffile.TiffFile(path), size
  except Exception as e:  # tifffile raises several types for a bad header or IFD
    if _all_zero_bytes(path):
      raise FileProblem('zero-filled', f'all {size} bytes are zero') from None
    raise FileProblem('unreadable', f'{type(e).__name__}: {e}') from None


def _first_page(tif: tifffile.TiffFile) -> tifffile.TiffPage:
  try:
    page = tif.pages[0]
  except Exception as e:  # e.g. an IFD offset past the end: no pages
    raise FileProblem('unreadable', f'no readable first page ({type(e).__name__}: {e})') from None
  if len(page.shape) != 2:
    raise FileProblem('unexpected-format',
                      f'first page has shape {page.shape}, expected one grey plane')
  return page


def tiff_shape(path: str) -> tuple[int, int]:
  """(height, width) of a TIFF's first page, from its header only."""
  tif, _ = _open_tiff(path)
  with tif:
    return _first_page(tif).shape


def read_tiff(path: str) -> np.ndarray:
  """The first page of a single-channel TIFF as a 2-D array, or FileProblem naming the defect."""
  tif, size = _open_tiff(path)
  with tif:
    page = _first_page(tif)
    ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts)]
    if ends and max(ends) > size:
      raise FileProblem('truncated', f'pixel data ends at byte {max(ends)}, the file has {size}')
    try:
      image = page.asarray()
    except Exception as e:
      raise FileProblem('unreadable', f'{type(e).__name__}: {e}') from None
  if not image.any():
    raise FileProblem('zero-filled', 'all pixels are zero')
  return image


def read_illum(path: str) -> np.ndarray:
  """A CellProfiler illumination function (.npy, 2-D, finite and positive) as float64."""
  _check_size(path)
  try:
    illum = np.load(path, allow_pickle=False)
  except Exception as e:
    raise FileProblem('unreadable', f'{type(e).__name__}: {e}') from None
  if illum.ndim != 2 or not np.issubdtype(illum.dtype, np.number):
    raise FileProblem('unexpected-format', f'illumination function of shape {illum.shape} '
                      f'and dtype {illum.dtype}, expected a 2-D number array')
  illum = illum.astype(np.float64)
  if not (np.isfinite(illum).all() and (illum > 0).all()):
    raise FileProblem('invalid', 'non-finite or non-positive values (division would fail)')
  return illum
