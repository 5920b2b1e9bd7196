"""The synthetic talking-head corpus: a procedural 2.5D face renderer, espeak-ng speech with
phoneme timings, factor trajectories with per-frame ground truth, and the on-disk layout."""
