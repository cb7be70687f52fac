"""Data: the sample schema, readers for every supported format, validation and DriveSim-QA."""
