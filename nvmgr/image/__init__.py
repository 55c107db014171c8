"""nvmgr.image."""
