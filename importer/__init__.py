"""dicom-importer: patient folders -> PACS, over DCMTK."""
