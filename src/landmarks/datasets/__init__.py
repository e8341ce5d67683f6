"""Datasets: the Kaggle-layout CSV rules, image decoding, the demo generator, importers of real photo sets and holdout splits."""
