"""JUMP-CP identifiers shared by the synthetic benchmark and the real-data path."""

CHANNELS = ('DNA', 'ER', 'RNA', 'AGP', 'Mito')          # canonical JUMP channel order
CONTROL_ID = 'JCP2022_033924'                          # DMSO, the negative control on every plate
CONTROL_NAME = 'DMSO'

# The 8 JUMP compound positive controls, the classes of CS-ARM-BN, in label order (sorted JCP2022
# ids, as the reference's LabelEncoder orders them).
POSITIVE_CONTROLS = (
    ('JCP2022_012818', 'TC-S-7004'),
    ('JCP2022_025848', 'dexamethasone'),
    ('JCP2022_035095', 'LY2109761'),
    ('JCP2022_037716', 'AMG900'),
    ('JCP2022_046054', 'FK-866'),
    ('JCP2022_050797', 'quinidine'),
    ('JCP2022_064022', 'NVS-PAK1-1'),
    ('JCP2022_085227', 'aloxistatin'),
)
