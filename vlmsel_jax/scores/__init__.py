"""Training-free scores between a candidate's features and the paired text features.

Every function here is pure: arrays in, a number or a small result record out.
"""
