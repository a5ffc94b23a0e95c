"""Publishing bundles to collaborators as verified, checksummed archives (``medsr publish`` / ``medsr fetch-bundle``)."""
