"""A tiny JUMP-CP mirror in the real file formats, built at test time (about 0.3 MB of files).

``build_mirror(tmp)`` writes ``tmp/mirror`` (the bucket's layout) and ``tmp/metadata`` and returns
a ``Mirror`` holding the ground truth: every raw image by (source, plate, well, site, channel name)
and the illumination functions, so tests never need to parse the files they check.

Layout and deliberate defects (selection used by the tests: sources 3, 8 and 10, rare positions
<= 1):

* source_3 (Opera Phenix names ``r01c01f01p01-ch5sk1fk1fl1.tiff``, DNA=ch5 .. Mito=ch1, 24x24,
  ``PathName_``/``FileName_`` columns, ``load_data.csv`` + ``load_data_with_illum.csv`` + illum
  .npy): plate BR00000001 (COMPOUND, batch CP59): A01 AMG900, B01 FK-866 (site 1 row duplicated),
  C02/D02 DMSO, E05 a library compound, F01 missing from well.csv, G01 AMG900 with one site (a rare
  position); A01 site 2's ER TIFF is missing. BR00000002 (batch CP_33_all_Phenix1, excluded) and
  BR00000003 (TARGET2) have load_data only.
* source_8 (ImageXpress names ``HTS_A01_s1_w5<GUID>.tif``, DNA=w5 .. Mito=w1, 22x20 non-square,
  ``URL_`` columns): plate 1053601756 (all digits, ``load_data.csv.gz``): A01 LY2109761, B24
  dexamethasone, C01/D01 DMSO; C01 site 2's AGP file is zero bytes throughout, D01 site 1's Mito
  TIFF is truncated. Plate 000321 (``load_data.parquet``, sites stored as integers): A01 TC-S-7004,
  P24 DMSO. Plate A9999999 is in load_data but not in plate.csv.
* source_10 (CV8000 names ``<plate>_A01_T0001F001L01A01Z01C01.tif``, DNA=C01 .. Mito=C05, 27x27
  (odd) -> 14x14 after x0.5, ``load_data.csv``, wells written unpadded as 'A1'): plate
  Dest210726-160150: A01 quinidine, B01 DMSO; A01 site 2's RNA file is garbage, B01 site 2's DNA
  image is all zeros.

CellProfiler profiles exist for BR00000001, 1053601756 (without well D01) and 000321.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import tifffile

CHANNELS = ('DNA', 'ER', 'RNA', 'AGP', 'Mito')
BUCKET = 's3://cellpainting-gallery/'
AMG900, FK866, LY, DEX, TCS, QUIN, DMSO = ('JCP2022_037716', 'JCP2022_046054', 'JCP2022_035095',
                                           'JCP2022_025848', 'JCP2022_012818', 'JCP2022_050797',
                                           'JCP2022_033924')
LIBRARY = 'JCP2022_000001'
PHENIX_CH = {'DNA': 5, 'ER': 4, 'RNA': 3, 'AGP': 2, 'Mito': 1}
CV8000_CH = {'DNA': 1, 'ER': 2, 'RNA': 3, 'AGP': 4, 'Mito': 5}

# (source, batch, plate, plate type or None if absent from plate.csv, image folder, load_data file)
PLATES = [
    ('source_3', 'CP59', 'BR00000001', 'COMPOUND',
     'images/CP59/images/BR00000001__2021-01-01T00_00_00-Measurement1/Images', 'load_data.csv'),
    ('source_3', 'CP_33_all_Phenix1', 'BR00000002', 'COMPOUND',
     'images/CP_33_all_Phenix1/images/BR00000002__2021-02-01T00_00_00-Measurement1/Images',
     'load_data.csv'),
    ('source_3', 'CP59', 'BR00000003', 'TARGET2',
     'images/CP59/images/BR00000003__2021-03-01T00_00_00-Measurement1/Images', 'load_data.csv'),
    ('source_8', 'J1', '1053601756', 'COMPOUND', 'images/J1/images/1053601756', 'load_data.csv.gz'),
    ('source_8', 'J2', '000321', 'COMPOUND', 'images/J2/images/000321', 'load_data.parquet'),
    ('source_8', 'J1', 'A9999999', None, 'images/J1/images/A9999999', 'load_data.csv.gz'),
    ('source_10', '2021_08_03_U2OS_48_hr_run12', 'Dest210726-160150', 'COMPOUND',
     'images/2021_08_03_U2OS_48_hr_run12/images/Dest210726-160150', 'load_data.csv'),
]
# plate -> [(well, compound or None if absent from well.csv, sites, write image files)]
WELLS = {
    'BR00000001': [('A01', AMG900, 2, True), ('B01', FK866, 2, True), ('C02', DMSO, 2, True),
                   ('D02', DMSO, 2, True), ('E05', LIBRARY, 2, True), ('F01', None, 2, True),
                   ('G01', AMG900, 1, True)],
    'BR00000002': [('A01', AMG900, 1, False)],
    'BR00000003': [('A01', AMG900, 1, False)],
    '1053601756': [('A01', LY, 2, True), ('B24', DEX, 2, True), ('C01', DMSO, 2, True),
                   ('D01', DMSO, 2, True)],
    '000321': [('A01', TCS, 2, True), ('P24', DMSO, 2, True)],
    'A9999999': [('A01', AMG900, 1, False)],
    'Dest210726-160150': [('A01', QUIN, 2, True), ('B01', DMSO, 2, True)],
}
SHAPES = {'source_3': (24, 24), 'source_8': (22, 20), 'source_10': (27, 27)}
DUPLICATED_SITE = ('BR00000001', 'B01', '1')
# (plate, well, site, channel) -> defect
DEFECTS = {
    ('BR00000001', 'A01', '2', 'ER'): 'missing',
    ('1053601756', 'C01', '2', 'AGP'): 'zero-filled',
    ('1053601756', 'D01', '1', 'Mito'): 'truncated',
    ('Dest210726-160150', 'A01', '2', 'RNA'): 'unreadable',
    ('Dest210726-160150', 'B01', '2', 'DNA'): 'blank',
}
PROFILE_PLATES = ('BR00000001', '1053601756', '000321')


@dataclass
class Mirror:
  root: str
  metadata: str
  raw: dict = field(default_factory=dict)     # (source, plate, well, site) -> {channel: uint16}
  illum: dict = field(default_factory=dict)   # (source, plate) -> {channel: float32 array}
  profiles: dict = field(default_factory=dict)  # plate -> profile DataFrame as written
  files: dict = field(default_factory=dict)   # (plate, well, site, channel) -> bucket key


def _guid(rng) -> str:
  h = ''.join(rng.choice(list('0123456789ABCDEF'), 32))
  return f'{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}'


def _file_name(source: str, plate: str, well: str, site: int, ch: str, rng) -> str:
  if source == 'source_3':
    row, col = ord(well[0]) - ord('A') + 1, int(well[1:])
    return f'r{row:02d}c{col:02d}f{site:02d}p01-ch{PHENIX_CH[ch]}sk1fk1fl1.tiff'
  if source == 'source_8':
    return f'HTS_{well}_s{site}_w{PHENIX_CH[ch]}{_guid(rng)}.tif'
  n = CV8000_CH[ch]
  return f'{plate}_{well}_T0001F{site:03d}L01A{n:02d}Z01C{n:02d}.tif'


def _image(rng, shape) -> np.ndarray:
  image = rng.integers(100, 3000, size=shape).astype(np.uint16)
  image.flat[rng.choice(image.size, 3, replace=False)] = rng.integers(20000, 60000, 3)  # hot pixels
  return image


def _write_defect(path: str, kind: str, rng) -> None:
  data = open(path, 'rb').read()
  if kind == 'missing':
    os.remove(path)
  elif kind == 'zero-filled':
    open(path, 'wb').write(bytes(len(data)))
  elif kind == 'truncated':
    open(path, 'wb').write(data[:len(data) * 2 // 3])
  elif kind == 'unreadable':
    open(path, 'wb').write(b'II*\0' + rng.bytes(len(data) - 4))   # a TIFF magic, then noise


def _write_table(table: pd.DataFrame, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if path.endswith('.parquet'):
    table.to_parquet(path, index=False)
  elif path.endswith('.gz'):
    with gzip.open(path, 'wt') as f:
      table.to_csv(f, index=False)
  else:
    table.to_csv(path, index=False)


def _load_data_rows(mirror: Mirror, source, batch, plate, folder, rng, illum: bool) -> list[dict]:
  rows = []
  for well, _, sites, with_files in WELLS[plate]:
    for site in range(1, sites + 1):
      row = {'Metadata_Source': source, 'Metadata_Batch': batch, 'Metadata_Plate': plate,
             'Metadata_Well': well if source != 'source_10' else well[0] + str(int(well[1:])),
             'Metadata_Site': str(site)}
      for ch in CHANNELS:
        key = mirror.files.setdefault((plate, well, str(site), ch),
                                      f'cpg0016-jump/{source}/{folder}/'
                                      f'{_file_name(source, plate, well, site, ch, rng)}')
        if source == 'source_8':
          row[f'URL_Orig{ch}'] = BUCKET + key
        else:
          row[f'PathName_Orig{ch}'] = BUCKET + os.path.dirname(key) + '/'
          row[f'FileName_Orig{ch}'] = os.path.basename(key)
        if illum:
          row[f'PathName_Illum{ch}'] = (f'{BUCKET}cpg0016-jump/{source}/images/{batch}/illum/'
                                        f'{plate}/')
          row[f'FileName_Illum{ch}'] = f'{plate}_Illum{ch}.npy'
      if source == 'source_3':
        row['FileName_OrigBrightfield'] = 'ignored.tiff'   # extra channels are ignored
      rows.append(row)
      if (plate, well, str(site)) == DUPLICATED_SITE:
        rows.append(dict(row))
  return rows


def _write_images(mirror: Mirror, source, plate, rng) -> None:
  for well, _, sites, with_files in WELLS[plate]:
    for site in range(1, sites + 1) if with_files else ():
      images = mirror.raw.setdefault((source, plate, well, str(site)), {})
      for ch in CHANNELS:
        path = os.path.join(mirror.root, mirror.files[(plate, well, str(site), ch)])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        images[ch] = _image(rng, SHAPES[source])
        defect = DEFECTS.get((plate, well, str(site), ch))
        if defect == 'blank':
          images[ch][:] = 0
        tifffile.imwrite(path, images[ch])
        if defect and defect != 'blank':
          _write_defect(path, defect, rng)


def _write_illum(mirror: Mirror, source, batch, plate, rng) -> None:
  folder = os.path.join(mirror.root, 'cpg0016-jump', source, 'images', batch, 'illum', plate)
  os.makedirs(folder, exist_ok=True)
  functions = mirror.illum.setdefault((source, plate), {})
  for ch in CHANNELS:
    functions[ch] = rng.uniform(0.5, 2.0, SHAPES[source]).astype(np.float32)
    np.save(os.path.join(folder, f'{plate}_Illum{ch}.npy'), functions[ch])


def _write_profiles(mirror: Mirror, rng) -> None:
  for source, batch, plate, *_ in PLATES:
    if plate not in PROFILE_PLATES:
      continue
    wells = [w for w, *_ in WELLS[plate] if (plate, w) != ('1053601756', 'D01')]
    n = len(wells)
    table = pd.DataFrame({
        'Metadata_Source': source, 'Metadata_Plate': plate, 'Metadata_Well': wells,
        'Metadata_Count_Cells': rng.integers(50, 300, n),           # metadata: not a feature
        'Cells_AreaShape_Area': rng.normal(300, 30, n),
        'Nuclei_Intensity_MeanIntensity_DNA': rng.normal(0.2, 0.05, n),
        'Cells_Broken_Feature': rng.normal(size=n),
        'Image_Constant': np.ones(n),
        'Cells_SourceConstant': 7.0 if source == 'source_8' else rng.normal(size=n),
        'Image_Huge': np.full(n, 1e39) if plate == '000321' else rng.normal(size=n),
    })
    if plate == 'BR00000001':
      table.loc[2, 'Cells_Broken_Feature'] = np.nan
      table['Cytoplasm_OnlyHere'] = rng.normal(size=n)
    path = os.path.join(mirror.root, 'cpg0016-jump', source, 'workspace', 'profiles', batch, plate,
                        f'{plate}.parquet')
    _write_table(table, path)
    mirror.profiles[plate] = table


def _write_metadata(directory: str) -> None:
  plates = pd.DataFrame([{'Metadata_Source': s, 'Metadata_Batch': b, 'Metadata_Plate': p,
                          'Metadata_PlateType': t} for s, b, p, t, *_ in PLATES if t is not None])
  plates = pd.concat([plates, pd.DataFrame([{'Metadata_Source': 'source_2', 'Metadata_Batch': 'B',
                                             'Metadata_Plate': '1086292037',
                                             'Metadata_PlateType': 'COMPOUND'}])])
  source_of = {p: s for s, _, p, *_ in PLATES}
  wells = pd.DataFrame([{'Metadata_Source': source_of[p], 'Metadata_Plate': p, 'Metadata_Well': w,
                         'Metadata_JCP2022': c}
                        for p, ws in WELLS.items() for w, c, *_ in ws if c is not None])
  # a row without a well ID (it describes no image: dropped and counted)
  wells = pd.concat([wells, pd.DataFrame([{'Metadata_Source': 'source_3', 'Metadata_Plate': 'X',
                                           'Metadata_Well': None, 'Metadata_JCP2022': DMSO}])])
  controls = pd.DataFrame({
      'Metadata_JCP2022': [DMSO, AMG900, DEX, FK866, LY, 'JCP2022_064022', QUIN, TCS,
                           'JCP2022_085227'],
      'Metadata_pert_type': ['negcon'] + ['poscon'] * 8,
      'Metadata_Name': ['DMSO', 'AMG900', 'dexamethasone', 'FK-866', 'LY2109761', 'NVS-PAK1-1',
                        'quinidine', 'TC-S-7004', 'aloxistatin'],
      'Metadata_modality': 'compound'})
  compounds = pd.DataFrame({'Metadata_JCP2022': [LIBRARY, DMSO], 'Metadata_InChIKey': ['X', 'Y'],
                            'Metadata_InChI': ['x', 'y'], 'Metadata_SMILES': ['C', 'CS(C)=O']})
  _write_table(plates, os.path.join(directory, 'plate.csv.gz'))
  _write_table(wells, os.path.join(directory, 'well.csv.gz'))
  _write_table(compounds, os.path.join(directory, 'compound.csv.gz'))
  _write_table(controls, os.path.join(directory, 'perturbation_control.csv'))


def build_mirror(tmp, seed: int = 0) -> Mirror:
  rng = np.random.default_rng(seed)
  mirror = Mirror(root=os.path.join(str(tmp), 'mirror'),
                  metadata=os.path.join(str(tmp), 'metadata'))
  for source, batch, plate, _, folder, load_data in PLATES:
    base = os.path.join(mirror.root, 'cpg0016-jump', source, 'workspace', 'load_data_csv', batch,
                        plate)
    rows = _load_data_rows(mirror, source, batch, plate, folder, rng, illum=False)
    table = pd.DataFrame(rows)
    if load_data.endswith('.parquet'):
      table['Metadata_Site'] = table['Metadata_Site'].astype(np.int64)
    _write_table(table, os.path.join(base, load_data))
    if plate == 'BR00000001':
      rows = _load_data_rows(mirror, source, batch, plate, folder, rng, illum=True)
      _write_table(pd.DataFrame(rows), os.path.join(base, 'load_data_with_illum.csv'))
      _write_illum(mirror, source, batch, plate, rng)
    _write_images(mirror, source, plate, rng)
  _write_profiles(mirror, rng)
  _write_metadata(mirror.metadata)
  return mirror
