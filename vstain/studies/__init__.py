"""Experiments that train and score several models: the U-Net's ablation and the adversarial-weight
sweep.
"""
