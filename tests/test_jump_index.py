"""JUMP load_data/metadata readers and the site index, on a generated real-format mirror."""
import os

import pandas as pd
import pytest

from csarm_jax.data import constants, jump
from csarm_jax.data.jump import load_data as load_data_lib
from jump_fixture import (AMG900, CHANNELS, DEX, DMSO, FK866, LY, QUIN, TCS, build_mirror)

SOURCES = ('source_3', 'source_8', 'source_10')
SELECTION = jump.Selection(sources=SOURCES, max_rare_position_images=1)
LOAD_DATA = 'cpg0016-jump/{source}/workspace/load_data_csv/{batch}/{plate}/{name}'
# (plate ID, well, compound) of every well the test selection keeps; each has sites 1 and 2.
SELECTED_WELLS = [
    ('source_3_CP59_BR00000001', 'A01', AMG900), ('source_3_CP59_BR00000001', 'B01', FK866),
    ('source_3_CP59_BR00000001', 'C02', DMSO), ('source_3_CP59_BR00000001', 'D02', DMSO),
    ('source_8_J1_1053601756', 'A01', LY), ('source_8_J1_1053601756', 'B24', DEX),
    ('source_8_J1_1053601756', 'C01', DMSO), ('source_8_J1_1053601756', 'D01', DMSO),
    ('source_8_J2_000321', 'A01', TCS), ('source_8_J2_000321', 'P24', DMSO),
    ('source_10_2021_08_03_U2OS_48_hr_run12_Dest210726-160150', 'A01', QUIN),
    ('source_10_2021_08_03_U2OS_48_hr_run12_Dest210726-160150', 'B01', DMSO),
]


@pytest.fixture(scope='module')
def mirror(tmp_path_factory):
  return build_mirror(tmp_path_factory.mktemp('jump'))


@pytest.fixture(scope='module')
def metadata(mirror):
  return jump.read_metadata(mirror.metadata)


@pytest.fixture(scope='module')
def built(mirror, metadata):
  return jump.build_index(mirror.root, metadata, SELECTION)


def _read(mirror, source, batch, plate, name):
  path = os.path.join(mirror.root,
                      LOAD_DATA.format(source=source, batch=batch, plate=plate, name=name))
  return jump.read_load_data(load_data_lib.LoadDataFile(path, source, batch, plate), mirror.root)


@pytest.mark.parametrize('source, batch, plate, name', [
    ('source_3', 'CP59', 'BR00000001', 'load_data.csv'),              # PathName_ + FileName_
    ('source_3', 'CP59', 'BR00000001', 'load_data_with_illum.csv'),
    ('source_8', 'J1', '1053601756', 'load_data.csv.gz'),              # URL_, gzipped
    ('source_8', 'J2', '000321', 'load_data.parquet'),                 # URL_, Parquet, int sites
    ('source_10', '2021_08_03_U2OS_48_hr_run12', 'Dest210726-160150', 'load_data.csv'),
])
def test_channels_are_mapped_by_name_onto_the_mirror(mirror, source, batch, plate, name):
  sites = _read(mirror, source, batch, plate, name)
  assert len(sites) and (sites['Metadata_Plate'] == plate).all()
  for _, site in sites.iterrows():
    for ch in CHANNELS:
      key = mirror.files[(plate, site['Metadata_Well'], site['Metadata_Site'], ch)]
      assert site[f'key_{ch}'] == key
      assert site[f'path_{ch}'] == os.path.join(mirror.root, key)
  with_illum = name == 'load_data_with_illum.csv'
  assert (sites['illum_path_DNA'] != '').all() == with_illum
  if with_illum:
    assert sites['illum_path_Mito'].iloc[0].endswith(
        'cpg0016-jump/source_3/images/CP59/illum/BR00000001/BR00000001_IllumMito.npy')


def test_ids_stay_strings_and_wells_are_padded(mirror):
  parquet = _read(mirror, 'source_8', 'J2', '000321', 'load_data.parquet')
  assert parquet['Metadata_Plate'].tolist() == ['000321'] * 4
  assert parquet['Metadata_Site'].tolist() == ['1', '2', '1', '2']      # stored as int64
  cv8000 = _read(mirror, 'source_10', '2021_08_03_U2OS_48_hr_run12', 'Dest210726-160150',
                 'load_data.csv')
  assert sorted(set(cv8000['Metadata_Well'])) == ['A01', 'B01']          # written 'A1', 'B1'
  table = jump.read_table(os.path.join(mirror.metadata, 'well.csv.gz'))
  assert '1053601756' in set(table['Metadata_Plate']) and '000321' in set(table['Metadata_Plate'])
  assert table['Metadata_Well'].isna().sum() == 1                        # missing stays missing


def test_as_str_keeps_missing_values_missing():
  from csarm_jax.data.jump.tables import as_str
  out = as_str(pd.Series([1.0, None, 30.0]))
  assert out[0] == '1' and out[2] == '30' and pd.isna(out[1])            # never the string 'nan'
  out = as_str(pd.Series(['A01', None], dtype=object))
  assert out[0] == 'A01' and pd.isna(out[1])


def test_find_load_data_prefers_the_illum_variant(mirror):
  files, empty = load_data_lib.find_load_data(mirror.root, ['source_3'])
  assert empty == []
  by_plate = {f.plate: os.path.basename(f.path) for f in files}
  assert by_plate == {'BR00000001': 'load_data_with_illum.csv', 'BR00000002': 'load_data.csv',
                      'BR00000003': 'load_data.csv'}
  with pytest.raises(jump.JumpDataError, match='source_99'):
    load_data_lib.find_load_data(mirror.root, ['source_99'])


def test_bad_load_data_is_named(tmp_path):
  table = pd.DataFrame({'Metadata_Source': ['source_1'], 'Metadata_Batch': ['b'],
                        'Metadata_Plate': ['p'], 'Metadata_Well': ['A01'], 'Metadata_Site': ['1']})
  for ch in CHANNELS:
    table[f'URL_Orig{ch}'] = f's3://cellpainting-gallery/cpg0016-jump/x/{ch}.tif'
  with pytest.raises(jump.JumpDataError, match=r"f.csv: no URL_Orig.*\['RNA'\]"):
    jump.site_table(table.drop(columns='URL_OrigRNA'), str(tmp_path), 'f.csv')
  with pytest.raises(jump.JumpDataError, match='f.csv: OrigAGP holds .*s3://other-bucket'):
    jump.site_table(table.assign(URL_OrigAGP='s3://other-bucket/a.tif'), str(tmp_path), 'f.csv')
  with pytest.raises(jump.JumpDataError, match='f.csv lacks column Metadata_Site'):
    jump.site_table(table.drop(columns='Metadata_Site'), str(tmp_path), 'f.csv')
  (tmp_path / 'broken.csv.gz').write_bytes(b'\x1f\x8b not really gzip')
  with pytest.raises(jump.JumpDataError, match='broken.csv.gz is not a readable table'):
    jump.read_table(str(tmp_path / 'broken.csv.gz'))
  ok = jump.site_table(table.assign(URL_OrigDNA='/data/dna.tif'), '/mirror', 'f.csv')
  assert ok['path_DNA'][0] == '/data/dna.tif' and ok['key_DNA'][0] == ''      # a local path is kept
  assert ok['path_ER'][0] == '/mirror/cpg0016-jump/x/ER.tif'


def test_metadata_tables(metadata, tmp_path):
  assert metadata.compound_names()[DMSO] == 'DMSO'
  assert metadata.compound_names()[AMG900] == 'AMG900'
  assert metadata.compound is not None and metadata.perturbation_control is not None
  with pytest.raises(jump.JumpDataError, match='no plate.csv'):
    jump.read_metadata(str(tmp_path))
  pd.DataFrame({'Metadata_Source': ['s'], 'Metadata_Plate': ['p']}).to_csv(tmp_path / 'plate.csv')
  with pytest.raises(jump.JumpDataError, match=r"plate.csv lacks columns \['Metadata_Batch'"):
    jump.read_metadata(str(tmp_path))


def test_selection_counts_every_drop(built):
  index, report = built
  expected = {f'{p}_{w}_{s}' for p, w, _ in SELECTED_WELLS for s in ('1', '2')}
  assert set(index['Metadata_Sample_ID']) == expected and len(index) == len(expected)
  assert {k: report[k] for k in ('site_rows', 'duplicate_site_rows', 'plate_not_in_plate_table',
                                  'plate_type_not_selected', 'batch_excluded',
                                  'well_not_in_well_table', 'other_compound', 'rare_position',
                                  'selected_sites', 'control_sites',
                                  'well_table_rows_without_ids')} == {
      'site_rows': 33, 'duplicate_site_rows': 1, 'plate_not_in_plate_table': 1,   # A9999999
      'plate_type_not_selected': 1, 'batch_excluded': 1,                          # TARGET2, CP_33
      'well_not_in_well_table': 2, 'other_compound': 2, 'rare_position': 1,      # F01, E05, G01
      'selected_sites': 24, 'control_sites': 12, 'well_table_rows_without_ids': 1}
  assert report['site_rows'] - sum(report[k] for k in (
      'other_source', 'duplicate_site_rows', 'plate_not_in_plate_table', 'plate_type_not_selected',
      'batch_excluded', 'well_not_in_well_table', 'other_compound', 'rare_position')) == len(index)


def test_labels_controls_and_ids(built):
  index, _ = built
  class_ids = [jcp for jcp, _ in constants.POSITIVE_CONTROLS]
  for _, row in index.iterrows():
    if row['Metadata_JCP2022'] == DMSO:
      assert row['is_control'] and row['label'] == -1 and row['Metadata_Compound'] == 'DMSO'
    else:
      assert not row['is_control'] and class_ids[row['label']] == row['Metadata_JCP2022']
    assert row['Metadata_Plate_ID'] == '_'.join(row[['Metadata_Source', 'Metadata_Batch',
                                                      'Metadata_Plate']])
  assert index.loc[index['Metadata_JCP2022'] == QUIN, 'Metadata_Compound'].iloc[0] == 'quinidine'
  assert (index['Metadata_PlateType'] == 'COMPOUND').all()
  for col in [c for c in index.columns if c.startswith('Metadata_')]:
    assert index[col].map(lambda v: isinstance(v, str)).all(), col


def test_default_selection_is_the_papers(mirror, metadata):
  index, report = jump.build_index(mirror.root, metadata)        # sources 3 and 8, positions <= 36
  assert set(index['Metadata_Source']) == {'source_3', 'source_8'}
  assert index['is_control'].all()           # every class position has <= 36 images here
  assert report['rare_position'] == 11 and report['selected_sites'] == 10


def test_object_keys_are_exactly_the_needed_files(mirror, built):
  index, _ = built
  wanted = {key for (plate, well, site, _), key in mirror.files.items()
            if any(p.endswith('_' + plate) and w == well for p, w, _ in SELECTED_WELLS)}
  wanted |= {f'cpg0016-jump/source_3/images/CP59/illum/BR00000001/BR00000001_Illum{ch}.npy'
             for ch in CHANNELS}
  assert jump.object_keys(index) == sorted(wanted)


def test_index_round_trip(tmp_path, mirror, metadata, built):
  index, report = built
  path = str(tmp_path / 'index.parquet')
  jump.write_index(path, index, jump.make_info(SELECTION, metadata, report, mirror.root))
  again, info = jump.read_index(path)
  pd.testing.assert_frame_equal(again, index)
  assert [tuple(c) for c in info['classes']] == list(constants.POSITIVE_CONTROLS)
  assert info['control_id'] == DMSO and info['report'] == report
  pd.DataFrame({'a': [1]}).to_parquet(tmp_path / 'other.parquet')
  with pytest.raises(jump.JumpDataError, match='not a JUMP site index'):
    jump.read_index(str(tmp_path / 'other.parquet'))
