"""A fault campaign: seeded random scenarios against the real importer, checked by an oracle.

`scenario.py` turns a seed into a site and a timeline (pure: the same seed, the same
scenario), `share.py` writes its folders as people and `smbd` do, `pacs.py` runs its
receivers and their faults, `runner.py` plays the timeline against `importer watch` or
`run-once` and then lets the importer run to quiescence, `oracle.py` holds the product's
promises and checks them against what every place says, `__main__.py` is `make chaos`.
"""
