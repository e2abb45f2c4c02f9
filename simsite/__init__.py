"""The simulated site: receivers (storescp, Orthanc, fault-injecting PACS), writers, a
generator of patient folders, and one installation of the importer.

One home for what the tests, the benchmark, the chaos campaign and `make run` all drive;
none of it is product code (the product is `importer`), and none of it is a test.
"""
