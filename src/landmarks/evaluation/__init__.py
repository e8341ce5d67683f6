"""Evaluation: GAP and the other metrics, `landmarks validate` and the hard protocol (`landmarks validate-hard`)."""
