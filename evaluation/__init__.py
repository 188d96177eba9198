"""Evaluation: datasets in VLMEvalKit TSV format, generation, scorers."""
