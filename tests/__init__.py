"""Tests for dicom-importer (the simulated site they drive is simsite/)."""
