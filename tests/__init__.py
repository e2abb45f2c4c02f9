"""Tests for dicom-importer; a package so ``python -m tests.receivers`` works."""
