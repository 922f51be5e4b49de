"""Where FOVs come from: the Allen layout through quilt3, the simulated colonies (cells, optics, the
registry writer) and stage 01, which loads them.
"""
