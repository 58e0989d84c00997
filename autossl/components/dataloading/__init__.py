"""Preprocessed cases, cross-validation splits and the labelled/unlabelled patch loaders."""
