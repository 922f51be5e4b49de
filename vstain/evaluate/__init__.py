"""Evaluation: metrics, sharpness, the classifier metric, statistics, segmentation."""
