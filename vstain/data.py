"""The Allen Cell hiPSC single-cell image dataset layout (Viana et al., Nature 2023; thesis 2.1).

One FOV becomes a brightfield stack ``[1, Z, Y, X]`` and a six-channel target ``[6, Z, Y, X]`` that
holds NaN in the channels the FOV does not carry (each FOV is one cell line: one FP-tagged
structure plus the DNA and membrane dyes).
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
# Gene (metadata column `structure_name`) -> target channel of the FP-tagged structure.
DEFAULT_GENE_MAP: dict[str, str] = {
    "TOMM20": "mito",
    "LMNB1": "envelope",
    "MYH10": "actomyosin",
    "FBL": "nucleoli",
    "NPM1": "nucleoli",  # alternative nucleolar marker
}
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
