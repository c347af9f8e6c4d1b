"""MFCC features, their normalisation and their config."""
