"""Real data: JUMP-CP (cpg0016) site index, image conversion and CellProfiler profiles.

    index, report = build_index(root, read_metadata(dir), Selection())  # sites, labels, files
    write_index(path, index, make_info(...)); object_keys(index)          # + the keys to fetch
    convert_sites(index_path, store_path, ConvertOptions(), workers=8)   # resumable, QC report
    build_profiles(index, root) -> write_feature_store(...)              # well-level features

CLIs: data_prep/jump_index.py, data_prep/jump_convert.py, data_prep/jump_profiles.py.
"""
from csarm_jax.data.jump.convert import ConvertError, ConvertOptions, convert_sites
from csarm_jax.data.jump.index import (Selection, build_index, make_info, object_keys, read_index,
                                       select_sites, write_index)
from csarm_jax.data.jump.load_data import find_load_data, read_load_data, site_table
from csarm_jax.data.jump.metadata import Metadata, read_metadata
from csarm_jax.data.jump.profiles import build_profiles, write_feature_store
from csarm_jax.data.jump.tables import JumpDataError, read_table
