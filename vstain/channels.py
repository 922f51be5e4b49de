"""The study's shared vocabulary: the six target channels, their labels, the gene map and the
constants of the Allen Cell hiPSC dataset (Viana et al., Nature 2023; thesis 2.1).

Every other module takes these names from here; this module imports nothing of the project, so it
sits at the root of the import graph.
"""
from __future__ import annotations

# The six target channels of the thesis, in the generator's output order.
TARGETS: tuple[str, ...] = ("dna", "membrane", "mito", "envelope", "actomyosin", "nucleoli")
TARGET_LABELS: dict[str, str] = {
    "dna": "DNA",
    "membrane": "Cell membrane",
    "mito": "Mitochondria",
    "envelope": "Nuclear envelope",
    "actomyosin": "Actomyosin bundles",  # the thesis' "myofibrils"
    "nucleoli": "Nucleoli",
}
# The channels of a FOV's volume in stages 01 and 03: the brightfield input, then the six targets.
VOLUME_CHANNELS: tuple[str, ...] = ("brightfield", *TARGETS)
# The channels of the simulator's true instance labels (uint16 ``[2, Z, Y, X]``, 0 = background):
# cell k and its nucleus share the id k.
LABEL_CHANNELS: tuple[str, ...] = ("cells", "nuclei")
# Gene (metadata column `structure_name`) -> target channel of the FP-tagged structure.
DEFAULT_GENE_MAP: dict[str, str] = {
    "TOMM20": "mito",
    "LMNB1": "envelope",
    "MYH10": "actomyosin",
    "FBL": "nucleoli",
    "NPM1": "nucleoli",  # alternative nucleolar marker
}
# The FP-tagged structures of the thesis, one gene each (NPM1 may replace FBL through `structures`).
DEFAULT_STRUCTURES: tuple[str, ...] = ("TOMM20", "LMNB1", "MYH10", "FBL")

# The package and registry of the real dataset.
ALLEN_PACKAGE = "aics/hipsc_single_cell_image_dataset"
ALLEN_REGISTRY = "s3://allencell"
# Physical pixel sizes of the real 100x FOVs, micrometres.
ALLEN_PIXEL_SIZE_ZYX = (0.29, 0.108, 0.108)
# Metadata columns: 0-based channel indices into each FOV's OME-TIFF.
CHANNEL_COLUMNS = {
    "brightfield": "ChannelNumberBrightfield",
    "struct": "ChannelNumberStruct",
    "dna": "ChannelNumber405",
    "membrane": "ChannelNumber638",
}
