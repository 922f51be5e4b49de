"""From a trained generator to whole-FOV predictions: one pass or layer by layer in tiles,
test-time augmentation, `python -m vstain predict` and the bioimage.io export.
"""
