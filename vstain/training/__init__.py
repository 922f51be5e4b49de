"""Training the generator: typed configs, the Lightning machinery, the masked-L1 U-Net (stage 04)
and the WGAN-GP's Algorithm 1 (stage 05).
"""
