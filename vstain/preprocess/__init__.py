"""From FOVs to the processed set: focus selection (PLLS), Noise2Void and its classical baselines,
stages 02 and 03, and the processed set's manifest, split and crops.
"""
