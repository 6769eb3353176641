"""CellProfiler well profiles -> features store: joins, dropped columns with reasons, exact values.
"""
import json

import numpy as np
import pytest

from csarm_jax.data import constants, jump, open_store
from csarm_jax.data.jump import profiles as profiles_lib
from jump_fixture import DMSO, build_mirror

SELECTION = jump.Selection(sources=('source_3', 'source_8', 'source_10'),
                           max_rare_position_images=1)
KEPT = ['Cells_AreaShape_Area', 'Nuclei_Intensity_MeanIntensity_DNA']


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  mirror = build_mirror(tmp_path_factory.mktemp('jump'))
  metadata = jump.read_metadata(mirror.metadata)
  index, report = jump.build_index(mirror.root, metadata, SELECTION)
  info = jump.make_info(SELECTION, metadata, report, mirror.root)
  return mirror, index, info, jump.build_profiles(index, mirror.root)


def test_columns_dropped_with_reasons(built):
  _, _, _, (table, features, names, report) = built
  assert names == KEPT and features.dtype == np.float32 and features.shape == (len(table), 2)
  assert report['nan_or_inf_columns'] == ['Cells_Broken_Feature']
  assert report['zero_variance_columns'] == ['Image_Constant', 'Cells_SourceConstant']  # per source
  assert report['float32_overflow_columns'] == ['Image_Huge']
  assert report['columns_not_in_every_plate'] == ['Cytoplasm_OnlyHere']
  assert 'Metadata_Count_Cells' not in names                      # metadata is not a feature
  assert report['wells_without_profiles'] == [
      'source_10_2021_08_03_U2OS_48_hr_run12_Dest210726-160150_A01',
      'source_10_2021_08_03_U2OS_48_hr_run12_Dest210726-160150_B01', 'source_8_J1_1053601756_D01']
  assert report['plates_without_profiles'][0].endswith('source_10/workspace/profiles/'
                                                       '2021_08_03_U2OS_48_hr_run12/Dest210726-160150/'
                                                       'Dest210726-160150.parquet')
  assert profiles_lib.report_line(report).startswith('profiles: 9 wells x 2 features; dropped')


def test_rows_are_the_index_wells_with_their_values(built):
  mirror, index, _, (table, features, _, _) = built
  assert len(table) == 9 and (table['Metadata_Site'] == 'all').all()
  for row, well in table.iterrows():
    source = mirror.profiles[well['Metadata_Plate']]
    expected = (source.loc[source['Metadata_Well'] == well['Metadata_Well'], KEPT]
                .to_numpy(np.float32))
    np.testing.assert_array_equal(features[row], expected[0])
    sites = index[(index['Metadata_Plate'] == well['Metadata_Plate'])
                  & (index['Metadata_Well'] == well['Metadata_Well'])]
    assert {well['label']} == set(sites['label'])
    assert well['is_control'] == (well['Metadata_JCP2022'] == DMSO)


def test_feature_store_round_trip(built, tmp_path):
  _, _, info, (table, features, names, report) = built
  out = str(tmp_path / 'profiles')
  profiles_lib.write_feature_store(out, table, features, names, info, report, {'tool': 'test'},
                                   shard_items=4)
  store = open_store(out)
  assert store.kind == 'features' and store.channels == KEPT and store.item_shape == (2,)
  assert store.class_ids == [c for c, _ in constants.POSITIVE_CONTROLS]
  np.testing.assert_array_equal(store.read(store.table['row']), features)
  assert set(store.table['Metadata_Plate']) == {'BR00000001', '1053601756', '000321'}
  assert json.loads((tmp_path / 'profiles' / profiles_lib.REPORT_KEY).read_text()) == report
  with pytest.raises(jump.JumpDataError, match='--overwrite'):
    profiles_lib.write_feature_store(out, table, features, names, info, report, {'tool': 'test'})
