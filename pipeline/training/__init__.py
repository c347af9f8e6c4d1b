"""`asr train`: the split, the run, Ray Data feeding and Ray Train workers."""
